"""The network contract of UNetPlusPlus (see DESIGN.md) and the U-Net baselines."""

import pytest
import torch

import pipeline.nets
from pipeline.nets import UNet, UNetPlusPlus, WideUNet, node_order

PAPER_WIDTHS = (32, 64, 128, 256, 512)
TINY_WIDTHS = (4, 8, 16, 32, 64, 128)


# every network pipeline.nets exports: a new one is held to the contract as soon as it is exported
NETWORKS = [
    cls
    for cls in (getattr(pipeline.nets, name) for name in pipeline.nets.__all__)
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module)
]


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def test_every_paper_network_is_exported():
    assert {UNetPlusPlus, UNet, WideUNet} <= set(NETWORKS)


@pytest.mark.parametrize("out_channels", [1, 3])
@pytest.mark.parametrize("spatial_dims, shape", [(2, (13, 10)), (3, (9, 12, 10))])  # odd sizes: padded and cropped back
@pytest.mark.parametrize("network", NETWORKS, ids=lambda cls: cls.__name__)
def test_network_contract(network, spatial_dims, shape, out_channels):
    """The contract in pipeline/nets/__init__.py: int attributes, one (B, out_channels, *S) tensor in eval."""
    net = network(spatial_dims, 2, out_channels, features=(4, 8, 16), depth=2)
    for name, value in (("spatial_dims", spatial_dims), ("in_channels", 2), ("out_channels", out_channels)):
        assert type(getattr(net, name)) is int and getattr(net, name) == value, name
    with torch.no_grad():
        out = net.eval()(torch.rand(2, 2, *shape))
    assert isinstance(out, torch.Tensor) and out.shape == (2, out_channels, *shape)


def test_paper_parameter_counts_2d():
    # Zhou et al. 2018, Table 1: U-Net 7.76M, Wide U-Net 9.13M, UNet++ 9.04M.
    unetpp = UNetPlusPlus(2, 1, 1, features=PAPER_WIDTHS, depth=4)
    assert count(unetpp) == pytest.approx(9.04e6, rel=0.02)
    assert count(UNet(2, 1, 1, features=PAPER_WIDTHS)) == pytest.approx(7.76e6, rel=0.02)
    assert count(WideUNet(2, 1, 1)) == pytest.approx(9.13e6, rel=0.02)
    # The paper's pruned L1..L4 (Fig. 6): about 0.1, 0.5, 2.2 and 9.0 million parameters.
    pruned = [count(unetpp.prune(level)) for level in (1, 2, 3, 4)]
    for got, expected in zip(pruned, (0.1e6, 0.5e6, 2.2e6, 9.0e6)):
        assert got == pytest.approx(expected, rel=0.03)
    assert pruned == sorted(pruned)


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_configurable_depth_training_heads_deepest_first(depth):
    net = UNetPlusPlus(2, 2, 3, features=TINY_WIDTHS, depth=depth)
    x = torch.rand(2, 2, 64, 48)
    heads = net(x)
    assert isinstance(heads, list) and len(heads) == depth
    assert all(h.shape == (2, 3, 64, 48) for h in heads)
    assert len(net.nodes) == (depth + 1) * (depth + 2) // 2
    # Deepest first: head 0 is X(0,depth), i.e. the fast-mode output at the full level.
    net.eval()
    net.mode = "fast"
    net.prune_level = depth
    torch.testing.assert_close(net(x), heads[0].detach(), atol=1e-5, rtol=1e-5)


def test_fast_mode_level_k_equals_head_k_of_full_network_3d():
    net = UNetPlusPlus(3, 1, 2, features=TINY_WIDTHS, depth=3)
    x = torch.rand(1, 1, 16, 24, 16)
    heads_deepest_first = [h.detach() for h in net(x)]
    net.eval()
    for level in (1, 2, 3):
        net.mode, net.prune_level = "fast", level
        torch.testing.assert_close(net(x), heads_deepest_first[3 - level], atol=1e-5, rtol=1e-5)


def test_fast_mode_computes_only_the_pruned_subgraph():
    net = UNetPlusPlus(2, 1, 1, features=TINY_WIDTHS, depth=4, mode="fast", prune_level=2).eval()
    called = []
    for name, node in net.nodes.items():
        node.register_forward_hook(lambda module, args, out, name=name: called.append(name))
    net(torch.rand(1, 1, 32, 32))
    expected = [f"x{i}_{j}" for i, j in node_order(2)]
    assert called == expected  # X(i,j) with i+j <= 2 only, in dependency order
    assert {"x3_0", "x0_3", "x0_4", "x4_0"}.isdisjoint(called)


def test_fast_mode_flops_shrink_with_level():
    from torch.utils.flop_counter import FlopCounterMode

    net = UNetPlusPlus(3, 1, 1, features=TINY_WIDTHS, depth=4).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    flops = []
    for level in (1, 2, 3, 4):
        net.mode, net.prune_level = "fast", level
        with FlopCounterMode(display=False) as counter:
            net(x)
        flops.append(counter.get_total_flops())
    assert flops == sorted(flops) and flops[0] < 0.3 * flops[-1]


def test_prune_gives_same_output_with_fewer_parameters():
    net = UNetPlusPlus(3, 1, 2, features=TINY_WIDTHS, depth=3).eval()
    x = torch.rand(1, 1, 19, 24, 17)  # odd sizes: the pruned net must pad exactly like the full one
    for level in (1, 2, 3):
        net.mode, net.prune_level = "fast", level
        pruned = net.prune(level).eval()
        assert pruned.depth == level and count(pruned) < count(net)
        assert not any(key.startswith(f"nodes.x{level + 1}_0") for key in pruned.state_dict())
        torch.testing.assert_close(pruned(x), net(x), atol=1e-5, rtol=1e-5)


def test_accurate_mode_is_weighted_mean_of_heads():
    weights = [1.0, 0.0, 3.0]
    net = UNetPlusPlus(2, 1, 2, features=TINY_WIDTHS, depth=3, head_weights=weights)
    x = torch.rand(2, 1, 24, 40)
    deepest_first = [h.detach() for h in net(x)]
    x01, x02, x03 = deepest_first[::-1]
    expected = (1.0 * x01 + 0.0 * x02 + 3.0 * x03) / 4.0
    out = net.eval()(x)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_without_deep_supervision_one_tensor_and_one_head():
    net = UNetPlusPlus(2, 1, 1, features=TINY_WIDTHS, depth=3, deep_supervision=False)
    out = net(torch.rand(1, 1, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 1, 32, 32)
    assert list(net.heads.keys()) == ["x0_3"]
    with pytest.raises(ValueError, match="deep_supervision=True"):
        UNetPlusPlus(2, 1, 1, features=TINY_WIDTHS, depth=3, deep_supervision=False, mode="fast", prune_level=1)


def test_gradients_reach_every_head_and_every_node():
    net = UNetPlusPlus(3, 1, 1, features=TINY_WIDTHS, depth=3)
    heads = net(torch.rand(1, 1, 16, 16, 16))
    sum(h.square().mean() for h in heads).backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("spatial_dims, shape", [(2, (37, 45)), (3, (37, 45, 29))])
def test_odd_sizes_round_trip(spatial_dims, shape):
    net = UNetPlusPlus(spatial_dims, 1, 2, features=(4, 8, 16, 32), depth=3)
    x = torch.rand(1, 1, *shape)
    assert all(h.shape == (1, 2, *shape) for h in net(x))
    assert net.eval()(x).shape == (1, 2, *shape)
    assert UNet(spatial_dims, 1, 2, features=(4, 8, 16, 32), depth=3)(x).shape == (1, 2, *shape)


def test_too_small_input_and_bad_arguments_give_clear_errors():
    net = UNetPlusPlus(3, 1, 1, features=TINY_WIDTHS, depth=4)
    with pytest.raises(ValueError, match=r"too small for depth 4.*at least 16"):
        net(torch.rand(1, 1, 8, 32, 32))
    with pytest.raises(ValueError, match="too small"):  # deepest level would be a single voxel
        net(torch.rand(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="widths"):
        UNetPlusPlus(3, 1, 1, features=(8, 16), depth=4)
    with pytest.raises(ValueError, match="prune_level"):
        UNetPlusPlus(3, 1, 1, features=TINY_WIDTHS, depth=3, mode="fast", prune_level=4)
    with pytest.raises(ValueError, match="mode"):
        UNetPlusPlus(3, 1, 1, features=TINY_WIDTHS, depth=3, mode="fastest")
    with pytest.raises(ValueError, match="head_weights"):
        UNetPlusPlus(3, 1, 1, features=TINY_WIDTHS, depth=3, head_weights=[1.0, 1.0])


@pytest.mark.parametrize("mode, level", [("accurate", None), ("fast", 2)])
def test_torchscript_export_matches_eager(tmp_path, mode, level):
    net = UNetPlusPlus(3, 1, 2, features=TINY_WIDTHS, depth=3, mode=mode, prune_level=level).eval()
    path = tmp_path / "net.ts"
    torch.jit.script(net).save(str(path))
    loaded = torch.jit.load(str(path))
    x = torch.rand(1, 1, 20, 16, 24)
    torch.testing.assert_close(loaded(x), net(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape, gradients", [((1, 1, 32, 48), True), ((1, 1, 16, 24, 16), False)])
def test_onnx_export_matches_eager(tmp_path, shape, gradients):
    """Also in 3D without gradients, where inference takes the CPU kernels of pipeline.nets.blocks."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    net = UNetPlusPlus(len(shape) - 2, 1, 2, features=TINY_WIDTHS, depth=3).eval()
    x = torch.rand(*shape)
    path = tmp_path / "net.onnx"
    with torch.set_grad_enabled(gradients):
        torch.onnx.export(net, (x,), str(path), dynamo=False, input_names=["image"], output_names=["logits"])
    onnx.checker.check_model(onnx.load(str(path)))
    (got,) = ort.InferenceSession(str(path)).run(None, {"image": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), net(x), atol=1e-4, rtol=1e-4)


def test_norm_act_dropout_upsample_choices():
    x = torch.rand(2, 1, 32, 32)
    for upsample in ("deconv", "nontrainable", "pixelshuffle"):
        net = UNetPlusPlus(2, 1, 1, features=TINY_WIDTHS, depth=2, norm="batch", act="relu", dropout=0.1, upsample=upsample)
        assert net.eval()(x).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="upsample"):
        UNetPlusPlus(2, 1, 1, features=TINY_WIDTHS, depth=2, upsample="bicubic")


def test_instance_norm_runs_as_identical_group_norm():
    from pipeline.nets.blocks import ConvBlock

    block = ConvBlock(3, 2, 6, act="relu", norm=("instance", {"affine": True}), dropout=0.0)
    norm = block.conv0.adn.N
    assert isinstance(norm, torch.nn.GroupNorm) and norm.num_groups == 6
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(3, 6, 5, 7, 4)
    expected = torch.nn.functional.instance_norm(x, weight=norm.weight, bias=norm.bias, eps=norm.eps)
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)
    # Running statistics have no group-norm equivalent: real instance norm is kept.
    block = ConvBlock(3, 2, 6, act="relu", norm=("instance", {"track_running_stats": True}), dropout=0.0)
    assert isinstance(block.conv0.adn.N, torch.nn.InstanceNorm3d)


@pytest.mark.parametrize("shape", [(2, 3, 8, 6, 4), (2, 3, 8, 6), (1, 2, 10), (1, 2, 7, 6, 4)])
def test_inference_pooling_equals_pytorch_max_pooling(shape):
    from pipeline.nets.blocks import MaxPool2x

    pool = MaxPool2x(len(shape) - 2)
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(pool(x), pool.pool(x))  # odd sizes go to PyTorch's pooling


def test_pointwise_head_and_onednn_convolution_equal_pytorch_convolutions():
    from pipeline.nets.blocks import ConvBlock, OneDNNConv3d, PointwiseHead

    head = PointwiseHead(3, 16, 3)
    x = torch.randn(2, 16, 6, 5, 4)
    expected = torch.nn.functional.conv3d(x, head.conv.weight, head.conv.bias)
    torch.testing.assert_close(head(x), expected, atol=1e-5, rtol=1e-5)
    conv = ConvBlock(3, 1, 4, act="relu", norm="batch", dropout=0.0).conv0.conv
    assert isinstance(conv, OneDNNConv3d)
    x = torch.randn(1, 1, 12, 10, 8)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape, bias", [((1, 6, 5, 4, 3), True), ((2, 6, 5, 4, 3), False), ((2, 6, 7, 5), True)])
def test_blockwise_transposed_convolution_equals_pytorchs(shape, bias):
    from pipeline.nets.blocks import BlockwiseConvTranspose2d, BlockwiseConvTranspose3d, make_upsample

    spatial_dims = len(shape) - 2
    up = make_upsample(spatial_dims, shape[1], 4, "deconv")
    deconv = up.deconv
    assert isinstance(deconv, BlockwiseConvTranspose3d if spatial_dims == 3 else BlockwiseConvTranspose2d)
    assert sorted(up.state_dict()) == ["deconv.bias", "deconv.weight"]  # MONAI's keys: checkpoints still load
    if not bias:
        deconv.bias = None
    x = torch.randn(*shape)
    convolve = torch.nn.functional.conv_transpose3d if spatial_dims == 3 else torch.nn.functional.conv_transpose2d
    with torch.no_grad():
        expected = convolve(x, deconv.weight, deconv.bias, stride=2)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = up(x)
    assert not {"aten::conv_transpose3d", "aten::conv_transpose2d"} & {event.key for event in prof.key_averages()}
    assert out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(up(x), expected, atol=1e-5, rtol=1e-5)  # with gradients: PyTorch's own kernel


def test_cpu_inference_avoids_pytorchs_slow_kernels():
    """Without gradients no reference convolution (batch of one, one channel) and no indexed pooling run."""
    net = UNetPlusPlus(3, 1, 1, features=TINY_WIDTHS, depth=2, mode="fast", prune_level=1).eval()
    x = torch.rand(1, 1, 32, 32, 32)

    def kernels(grad: bool) -> set:
        with torch.set_grad_enabled(grad), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            net(x)
        return {event.key for event in prof.key_averages()}

    slow = {"aten::slow_conv3d_forward", "aten::max_pool3d_with_indices"}
    assert slow <= kernels(grad=True)  # what PyTorch picks on its own: the check can fail
    assert not slow & kernels(grad=False)


def test_scripted_network_runs_under_cpu_autocast():
    net = UNetPlusPlus(3, 1, 2, features=TINY_WIDTHS, depth=2).eval()
    scripted = torch.jit.script(net)
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        expected = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = scripted(x)
    torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=0.05)
