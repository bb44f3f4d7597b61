"""Network speed, parameters and FLOPs: our UNetPlusPlus against MONAI's BasicUNetPlusPlus, side by side.

Usage::

    python benchmarks/bench_network.py                 # real sizes (3D 1x1x64^3, 2D 4x1x256^2), a few minutes on CPU
    python benchmarks/bench_network.py --quick         # tiny sizes, a smoke run
    python benchmarks/bench_network.py --output bench.json

Both networks get the same input, widths (32, 32, 64, 128, 256 by default, MONAI's default), norm,
activation and upsampling, with deep supervision on. Runs of the two are interleaved and the median
is reported, so background load hits both alike. Ratios are ours / MONAI (below 1.0 = ours faster).
For fast mode L1..L4 the time share of L4 is printed next to the FLOP share: a real sub-graph spends
time in proportion to its FLOPs, a masked full pass would not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch
from monai.networks.nets import BasicUNetPlusPlus
from torch.utils.flop_counter import FlopCounterMode

from pipeline.losses import BCEDiceLoss, DeepSupervisionLoss
from pipeline.nets import UNetPlusPlus


def build_pair(spatial_dims: int, features: tuple, out_channels: int = 2):
    torch.manual_seed(0)
    ours = UNetPlusPlus(spatial_dims, 1, out_channels, features=features, depth=len(features) - 1, deep_supervision=True)
    # MONAI takes one extra width for the last decoder node at level 0; give it the same as ours.
    reference = BasicUNetPlusPlus(spatial_dims, 1, out_channels, features=(*features, features[0]), deep_supervision=True)
    return ours, reference


def precision_context(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_fn(net, x, precision):
    def run():
        with torch.no_grad(), precision_context(precision):
            net(x)

    return run


def train_step_fn(net, x, precision):
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4)
    loss_fn = DeepSupervisionLoss(BCEDiceLoss())
    target = (torch.rand_like(x.expand(-1, 2, *x.shape[2:])) > 0.5).float()

    def run():
        optimizer.zero_grad(set_to_none=True)
        with precision_context(precision):
            outputs = net(x)
        loss = loss_fn([o.float() for o in outputs], target)
        loss.backward()
        optimizer.step()

    return run


def time_interleaved(functions: dict, repeats: int) -> dict:
    """Median seconds per call for each function, calls interleaved round-robin after one warm-up each."""
    for run in functions.values():
        run()
    samples = {name: [] for name in functions}
    for _ in range(repeats):
        for name, run in functions.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def flops_of(net, x) -> int:
    """FLOPs of one forward pass. With gradients on, the network takes PyTorch's standard
    convolution and pooling, whose FLOPs the counter knows (inference without gradients calls
    oneDNN directly, which it does not count)."""
    with torch.enable_grad(), FlopCounterMode(display=False) as counter:
        net(x)
    return counter.get_total_flops()


def parameters(net) -> int:
    return sum(p.numel() for p in net.parameters())


def compare(name: str, spatial_dims: int, shape: tuple, features: tuple, repeats: int) -> dict:
    ours, reference = build_pair(spatial_dims, features)
    x = torch.rand(*shape)
    result = {
        "case": name,
        "input_shape": list(shape),
        "features": list(features),
        "parameters": {"ours": parameters(ours), "monai": parameters(reference)},
    }
    ours.eval(), reference.eval()
    result["flops_forward"] = {"ours": flops_of(ours, x), "monai": flops_of(reference, x)}
    for precision in ("fp32", "bf16"):
        ours.eval(), reference.eval()
        times = time_interleaved(
            {"ours": forward_fn(ours, x, precision), "monai": forward_fn(reference, x, precision)}, repeats
        )
        result[f"inference_{precision}_s"] = times
        result[f"inference_{precision}_ratio"] = times["ours"] / times["monai"]
        ours.train(), reference.train()
        times = time_interleaved(
            {"ours": train_step_fn(ours, x, precision), "monai": train_step_fn(reference, x, precision)}, repeats
        )
        result[f"train_step_{precision}_s"] = times
        result[f"train_step_{precision}_ratio"] = times["ours"] / times["monai"]
    return result


def pruning(spatial_dims: int, shape: tuple, features: tuple, repeats: int) -> dict:
    """Fast-mode L1..L(depth): time share of the full network next to its FLOP share."""
    torch.manual_seed(0)
    depth = len(features) - 1
    net = UNetPlusPlus(spatial_dims, 1, 2, features=features, depth=depth).eval()
    x = torch.rand(*shape)
    levels = {}
    for level in range(1, depth + 1):
        pruned = net.prune(level).eval()
        levels[f"L{level}"] = {"parameters": parameters(pruned), "flops": flops_of(pruned, x), "net": pruned}
    # Time the fast mode of the full network (what the bundle runs) and the standalone pruned module.
    functions = {}
    for level in range(1, depth + 1):
        fast = UNetPlusPlus(spatial_dims, 1, 2, features=features, depth=depth, mode="fast", prune_level=level).eval()
        fast.load_state_dict(net.state_dict())
        functions[f"L{level}"] = forward_fn(fast, x, "fp32")
        functions[f"L{level}_pruned_module"] = forward_fn(levels[f"L{level}"]["net"], x, "fp32")
    times = time_interleaved(functions, repeats)
    full = f"L{depth}"
    out = {"input_shape": list(shape), "features": list(features)}
    for level in range(1, depth + 1):
        key = f"L{level}"
        time_share = times[key] / times[full]
        flop_share = levels[key]["flops"] / levels[full]["flops"]
        out[key] = {
            "parameters": levels[key]["parameters"],
            "flops": levels[key]["flops"],
            "flop_share": flop_share,
            "fast_mode_s": times[key],
            "pruned_module_s": times[f"{key}_pruned_module"],
            "time_share": time_share,
            "time_share_over_flop_share": time_share / flop_share,
        }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per network (median reported)")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args(argv)

    features = (32, 32, 64, 128, 256)
    shape_3d, shape_2d, repeats = (1, 1, 64, 64, 64), (4, 1, 256, 256), 5
    if args.quick:
        features, shape_3d, shape_2d, repeats = (4, 4, 8, 16, 32), (1, 1, 32, 32, 32), (2, 1, 64, 64), 2
    repeats = args.repeats or repeats

    report = {
        "benchmark": "network",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "comparisons": [
            compare("3d", 3, shape_3d, features, repeats),
            compare("2d", 2, shape_2d, features, repeats),
        ],
        "pruning_3d": pruning(3, shape_3d, features, repeats),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
