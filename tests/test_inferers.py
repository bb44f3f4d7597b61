"""AutocastInferer and check_precision: the one autocast used by the bundles and batch segmentation."""

import pytest
import torch
from monai.inferers import SimpleInferer, SlidingWindowInferer

from pipeline.inferers import PRECISIONS, AutocastInferer, check_precision
from pipeline.nets import UNetPlusPlus


class Recorder(torch.nn.Module):
    """A 1x1 convolution that records the autocast state and the dtype it computes in."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 1)
        self.seen = []

    def forward(self, x):
        y = self.conv(x)
        self.seen.append((torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type), y.dtype))
        return {"logits": y, "heads": [y, y], "count": torch.tensor(3)}


def test_bf16_on_cpu_runs_the_network_under_autocast_and_returns_float32():
    network = Recorder()
    outputs = AutocastInferer(SimpleInferer(), "bf16")(torch.rand(1, 1, 8, 8), network)
    assert network.seen == [(True, torch.bfloat16, torch.bfloat16)]
    assert outputs["logits"].dtype == torch.float32
    assert [head.dtype for head in outputs["heads"]] == [torch.float32, torch.float32]
    assert outputs["count"].dtype == torch.int64  # integer outputs are left alone
    assert not torch.is_autocast_enabled("cpu")  # nothing leaks out of the call


def test_fp32_runs_the_inferer_unchanged():
    network = Recorder()
    outputs = AutocastInferer(SimpleInferer(), "fp32")(torch.rand(1, 1, 8, 8), network)
    assert network.seen[0][0] is False and network.seen[0][2] == torch.float32
    assert outputs["logits"].dtype == torch.float32


def test_bf16_sliding_window_is_close_to_fp32():
    net = UNetPlusPlus(2, 1, 1, features=(4, 8, 16), depth=2).eval()
    x = torch.rand(1, 1, 40, 40)
    window = SlidingWindowInferer(roi_size=(32, 32), overlap=0.25, mode="gaussian")
    with torch.no_grad():
        reference = AutocastInferer(window, "fp32")(x, net)
        bf16 = AutocastInferer(window, "bf16")(x, net)
    assert bf16.dtype == torch.float32 and bf16.shape == reference.shape
    assert torch.allclose(bf16, reference, atol=0.1, rtol=0.1)


def test_cpu_inference_keeps_freed_memory_and_a_training_step_does_not():
    """Inside the inferer glibc's mmap is off during inference only (pipeline.cpu.keep_freed_memory).

    A fresh interpreter (glibc's state depends on what a process did before) runs a "network" that
    allocates and frees the same 64 MB tensor over and over, like the windows of one volume, and
    prints the page faults of the last four: first as a training step, then as inference.
    """
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import resource, torch
        from monai.inferers import SimpleInferer
        from pipeline.inferers import AutocastInferer

        def network(_):
            for index in range(12):
                if index == 8:  # the first few grow the heap
                    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                torch.empty(16 << 20).fill_(1.0)
            return torch.tensor([(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4])

        inferer = AutocastInferer(SimpleInferer(), "fp32")
        training = inferer(torch.zeros(1), network).item()
        with torch.no_grad():
            inference = inferer(torch.zeros(1), network).item()
        print(training, inference)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, encoding="utf-8", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    training, inference = (float(value) for value in result.stdout.split())
    assert inference < 1000 < training, (inference, training)  # 64 MB is 16,384 pages


def test_check_precision_names_what_to_use_instead():
    assert PRECISIONS == ("fp32", "bf16", "fp16")
    check_precision("fp32", "cpu")
    check_precision("bf16", torch.device("cpu"))
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        check_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        check_precision("fp8", "cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        AutocastInferer(SimpleInferer(), "half")


def test_bf16_on_a_gpu_without_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    with pytest.raises(ValueError, match="not supported by this GPU"):
        check_precision("bf16", "cuda:0")
    check_precision("fp16", "cuda:0")  # the device itself is not needed to check the name


# --------------------------------------------------------------------------------------------
# mirroring test-time augmentation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation,channels", [("sigmoid", 1), ("softmax", 3)])
def test_mirror_tta_thresholds_the_mean_probability_of_every_flip(activation, channels):
    from pipeline.inferers import MirrorTTAInferer

    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, channels, 3, padding=1)  # not flip-equivariant: each flip differs
    image = torch.rand(1, 1, 6, 7, 5)
    probability = (lambda z: torch.sigmoid(z)) if activation == "sigmoid" else (lambda z: torch.softmax(z, 1))
    expected = []
    for flips in [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]:
        x = torch.flip(image, flips) if flips else image
        y = network(x)
        expected.append(probability(torch.flip(y, flips) if flips else y))
    expected = torch.stack(expected).mean(0)

    with torch.no_grad():
        logits = MirrorTTAInferer(SimpleInferer(), activation)(image, network)

    assert logits.shape == (1, channels, 6, 7, 5)
    torch.testing.assert_close(probability(logits), expected.detach(), atol=1e-5, rtol=1e-4)
    plain = probability(network(image))
    assert (plain - expected).abs().max() > 1e-3  # the augmentation changed something


def test_mirror_tta_on_selected_axes_runs_one_pass_per_flip_combination():
    from pipeline.inferers import MirrorTTAInferer

    calls = []

    def counting(x):
        calls.append(x.shape)
        return x

    MirrorTTAInferer(SimpleInferer(), "sigmoid", axes=(0, 1))(torch.rand(1, 1, 4, 4, 4), counting)
    assert len(calls) == 4
    with pytest.raises(ValueError, match="sigmoid' or 'softmax"):
        MirrorTTAInferer(SimpleInferer(), "relu")


@pytest.mark.parametrize("dims", [2, 3])
def test_air_far_from_the_body_is_background_whatever_the_network_says(dims):
    """A network that calls everything foreground (as 2D networks do on slices of air) keeps it only on
    the body and within ``margin`` voxels of it, through MONAI's slice and sliding-window inferers."""
    from pipeline.inferers import AirIsBackground, BodySliceInferer, BodySlidingWindowInferer

    image = torch.full((1, 1, 24, 30, 6), -5.0)  # the MRI preset's value outside the body
    image[:, :, 8:12, 10:20, 2:4] = torch.randn(1, 1, 4, 10, 2)  # body on slices 2-3 only

    def everything_is_class_2(x):
        logits = torch.zeros(x.shape[0], 3, *x.shape[2:])
        logits[:, 2] = 5.0
        return logits

    rule = AirIsBackground(-5.0, margin=2)
    if dims == 2:
        inferer = BodySliceInferer(roi_size=(16, 16), spatial_dim=2, cval=-5.0, mode="gaussian", overlap=0.5, air=rule)
    else:
        inferer = BodySlidingWindowInferer(roi_size=(16, 16, 4), cval=-5.0, mode="gaussian", overlap=0.5, air=rule)
    labels = inferer(image, everything_is_class_2).argmax(1)[0]
    expected = torch.zeros(24, 30, 6, dtype=torch.long)
    expected[6:14, 8:22, 0:6] = 2  # the body grown by 2 voxels (a box), on every axis
    assert torch.equal(labels, expected)
    plain = (BodySliceInferer(roi_size=(16, 16), spatial_dim=2) if dims == 2 else BodySlidingWindowInferer(roi_size=(16, 16, 4)))
    assert bool((plain(image, everything_is_class_2).argmax(1) == 2).all())  # air=None: the network's word
    sigmoid = rule(torch.full((1, 1, 24, 30, 6), 5.0), image)  # one channel: air gets a negative logit
    assert bool((sigmoid[0, 0, 0, 0] < 0).all()) and bool((sigmoid[0, 0, 10, 15] > 0).all())
