"""The ResNet-3D family: MedicalNet's topology, key names, parameter counts, heads, and real passes.

Big models are built on the meta device (shapes only, no memory, no init cost); real forward/backward
passes use the tiny model on 16³-32³ volumes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers_models import REFERENCE_TABLE, reference_keys
from torch import nn

from medcli.errors import UnknownNameError
from medcli.models import DEPTHS, MODELS, create_model
from medcli.models.resnet3d import ArchSpec, ResNet3D, ZeroPadShortcut


def meta_model(depth, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return create_model(depth, **kwargs)


@pytest.fixture
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return create_model("tiny", num_classes=2)


# ------------------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("depth", sorted(REFERENCE_TABLE))
def test_counts_match_medicalnet_reference_table(depth):
    entries, without_nbt, backbone_params, with_fc = REFERENCE_TABLE[depth]
    model = meta_model(depth, num_classes=2)
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    assert len(backbone) == entries
    assert sum(not k.endswith("num_batches_tracked") for k in backbone) == without_nbt
    params = dict(model.named_parameters())
    assert sum(p.numel() for k, p in params.items() if not k.startswith("fc.")) == backbone_params
    assert sum(p.numel() for p in params.values()) == with_fc
    assert list(model.state_dict())[-2:] == ["fc.weight", "fc.bias"]


def test_resnet50_keys_and_shapes_equal_the_released_file():
    expected = [(key.removeprefix("module."), shape) for key, shape in reference_keys()]
    assert all(key.startswith("module.") for key, _ in reference_keys())
    model = meta_model(50)
    actual = [(k, list(v.shape)) for k, v in model.state_dict().items() if not k.startswith("fc.")]
    assert actual == expected  # same names, same order, same shapes


def test_registry_and_depth_resolution():
    assert set(MODELS.names()) == {f"resnet{d}" for d in (10, 18, 34, 50, 101, 152, 200)} | {"tiny"}
    assert DEPTHS == (10, 18, 34, 50, 101, 152, 200)
    for spelling in (18, "18", "resnet18", "ResNet18"):
        model = meta_model(spelling)
        assert model.depth == 18 and model.arch == "resnet18"
    with pytest.raises(UnknownNameError, match=r"resnet42.*resnet10.*tiny"):
        create_model(42)
    with pytest.raises(UnknownNameError, match="unknown head 'arcface'"):
        create_model("tiny", head="arcface")


@pytest.mark.parametrize(
    ("depth", "block", "feature_dim"),
    [(10, "BasicBlock", 512), (18, "BasicBlock", 512), (34, "BasicBlock", 512), (50, "Bottleneck", 2048),
     (101, "Bottleneck", 2048), ("tiny", "BasicBlock", 64)],
)  # fmt: skip
def test_attributes_block_type_and_feature_dim(depth, block, feature_dim):
    model = meta_model(depth, in_channels=3, num_classes=5, dropout=0.25, head="cosine")
    assert type(model.layer1[0]).__name__ == block
    assert (model.in_channels, model.num_classes, model.head_type) == (3, 5, "cosine")
    assert model.feature_dim == feature_dim
    assert model.dropout.p == 0.25
    assert model.conv1.weight.shape[1] == 3


def test_stem_strides_and_dilations_follow_medicalnet():
    model = meta_model(50)
    conv1 = model.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding, conv1.bias) == (
        (7, 7, 7),
        (2, 2, 2),
        (3, 3, 3),
        None,
    )
    pool = model.maxpool
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    for name, stride, dilation in (("layer1", 1, 1), ("layer2", 2, 1), ("layer3", 1, 2), ("layer4", 1, 4)):
        stage = getattr(model, name)
        first = stage[0]
        assert first.conv2.stride == (stride,) * 3, name  # Bottleneck: the 3³ conv carries stride/dilation
        assert first.downsample[0].stride == (stride,) * 3
        for block in stage:  # every block of a dilated stage is dilated, as in MedicalNet
            assert block.conv2.dilation == (dilation,) * 3
            assert block.conv2.padding == (dilation,) * 3
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv3d))


def test_shortcut_a_has_no_keys_and_shortcut_b_has_a_conv_bn():
    r18, r10 = meta_model(18), meta_model(10)
    assert not any("downsample" in k for k in r18.state_dict())
    assert isinstance(r18.layer2[0].downsample, ZeroPadShortcut)
    assert r18.layer1[0].downsample is None  # 64 -> 64, stride 1: plain identity
    assert isinstance(r10.layer2[0].downsample, nn.Sequential)
    assert [k for k in r10.state_dict() if "layer2.0.downsample" in k][:2] == [
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.weight",
    ]


def test_zero_pad_shortcut_equals_medicalnet_downsample_basic_block():
    x = torch.randn(2, 3, 6, 5, 4)
    out = ZeroPadShortcut(8, stride=2)(x)
    # MedicalNet's downsample_basic_block: avg_pool3d(kernel 1, stride), then concatenated zero channels.
    sub = F.avg_pool3d(x, kernel_size=1, stride=2)
    expected = torch.cat([sub, torch.zeros(2, 5, *sub.shape[2:])], dim=1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("depth", [50, 18])
def test_output_stride_is_8(depth):
    """Shapes of every stage for a 64³ input: stride 2 (conv1), 2 (maxpool), 2 (layer2), then dilation."""
    model = meta_model(depth)
    seen = {}
    for name in ("maxpool", "layer1", "layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.shape))
    x = torch.empty(1, 1, 64, 64, 64, device="meta")
    features = model.forward_features(x)
    width = 4 if depth == 50 else 1
    assert seen["maxpool"][2:] == (16, 16, 16)
    assert seen["layer1"][1:] == (64 * width, 16, 16, 16)
    assert seen["layer2"][1:] == (128 * width, 8, 8, 8)
    assert seen["layer3"][1:] == (256 * width, 8, 8, 8)
    assert tuple(features.shape) == (1, 512 * width, 8, 8, 8)
    assert tuple(model(x).shape) == (1, 2)


# ------------------------------------------------------------------------------------- init, heads
def test_kaiming_init_like_medicalnet():
    torch.manual_seed(0)
    model = create_model(10)
    w = model.layer4[0].conv2.weight  # 512 x 512 x 3³: 7M samples, std estimate is tight
    expected_std = math.sqrt(2.0 / (w.shape[0] * 27))  # kaiming normal, fan_out, ReLU gain
    assert w.std().item() == pytest.approx(expected_std, rel=0.02)
    assert torch.all(model.bn1.weight == 1) and torch.all(model.bn1.bias == 0)


def test_cosine_head_gives_cosines_and_has_weight_only(tiny):
    model = create_model("tiny", head="cosine", num_classes=3)
    assert [k for k in model.state_dict() if k.startswith("fc.")] == ["fc.weight"]
    assert model.head_keys() == ["fc.weight"]
    model.eval()
    x = torch.randn(4, 1, 16, 16, 16)
    with torch.no_grad():
        logits = model(x)
        pooled = model.forward_features(x).mean(dim=(2, 3, 4))
    expected = F.normalize(pooled, dim=1) @ F.normalize(model.fc.weight, dim=1).T
    assert logits.shape == (4, 3)
    assert torch.allclose(logits, expected, atol=1e-6)
    assert logits.abs().max() <= 1 + 1e-6


def test_linear_head_keys(tiny):
    assert tiny.head_keys() == ["fc.weight", "fc.bias"]
    assert isinstance(tiny.fc, nn.Linear) and tiny.fc.in_features == 64


def test_classify_of_features_equals_forward(tiny):
    tiny.eval()
    x = torch.randn(2, 1, 24, 24, 24)
    with torch.no_grad():
        assert torch.allclose(tiny.classify(tiny.forward_features(x)), tiny(x))


def test_dropout_is_active_in_train_mode_only():
    model = create_model("tiny", dropout=0.5)
    features = torch.randn(8, 64, 2, 2, 2)
    model.train()
    torch.manual_seed(1)
    a = model.classify(features)
    torch.manual_seed(2)
    b = model.classify(features)
    assert not torch.allclose(a, b)
    model.eval()
    assert torch.equal(model.classify(features), model.classify(features))


# ------------------------------------------------------------------------------------ real passes
def test_tiny_model_trains(tiny):
    """Real SGD steps on separable volumes: the loss goes down and every parameter gets a gradient."""
    x = torch.randn(4, 1, 16, 16, 16)
    x[2:] += 1.0
    y = torch.tensor([0, 0, 1, 1])
    opt = torch.optim.SGD(tiny.parameters(), lr=0.05, momentum=0.9)
    tiny.train()
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = F.cross_entropy(tiny(x), y)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny.parameters())
    assert losses[-1] < losses[0]


def test_multichannel_input(tiny):
    model = create_model("tiny", in_channels=4, num_classes=2)
    out = model(torch.randn(2, 4, 16, 16, 16))
    out.sum().backward()
    assert out.shape == (2, 2) and model.conv1.weight.grad.shape == (8, 4, 7, 7, 7)


TINY_A = ArchSpec("tiny-a", "tiny", "basic", (2, 1, 1, 1), "A", widths=(8, 16, 32, 64), stem_width=8)


@pytest.mark.parametrize("shortcut", ["B", "A"])
def test_channels_last_3d_matches_contiguous(shortcut):
    torch.manual_seed(0)
    # Two channels: with one, channels-last and contiguous strides coincide and nothing would be tested.
    # zero_init_last=False: every residual branch contributes, so its convs' layouts are really compared.
    kw = {"in_channels": 2, "zero_init_last": False}
    model = create_model("tiny", **kw) if shortcut == "B" else ResNet3D(TINY_A, **kw)
    model.eval()
    x = torch.randn(2, 2, 24, 24, 24)
    with torch.no_grad():
        ref = model(x)
        model_cl = model.to(memory_format=torch.channels_last_3d)
        x_cl = x.to(memory_format=torch.channels_last_3d)
        assert x_cl.is_contiguous(memory_format=torch.channels_last_3d) and not x_cl.is_contiguous()
        out = model_cl(x_cl)
    assert torch.allclose(out, ref, atol=1e-4)
    # and backward, in train mode, on the non-contiguous layout
    model_cl.train()
    model_cl(x_cl).sum().backward()
    assert model_cl.conv1.weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_autocast_channels_last_train_step():
    torch.manual_seed(0)
    model = create_model("tiny", in_channels=2).cuda().to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 2, 32, 32, 32, device="cuda").to(memory_format=torch.channels_last_3d)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), torch.tensor([0, 1], device="cuda"))
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert model.conv1.weight.grad is not None and torch.isfinite(model.conv1.weight.grad).all()


@pytest.mark.parametrize("depth, last", [("tiny", "bn2"), (50, "bn3")])
def test_residual_branches_start_at_zero_unless_turned_off(depth, last):
    """zero_init_last (timm's name): each block's last BN gamma is 0, so a fresh block is its shortcut."""
    torch.manual_seed(0)
    model = create_model(depth)
    blocks = [m for m in model.modules() if hasattr(m, "last_bn")]
    assert blocks and all(m.last_bn is getattr(m, last) for m in blocks)
    assert all(not m.last_bn.weight.any() for m in blocks)
    assert all(m.bn1.weight.eq(1).all() for m in blocks)  # only the last BN of a branch
    plain = create_model(depth, zero_init_last=False)
    assert all(m.last_bn.weight.eq(1).all() for m in plain.modules() if hasattr(m, "last_bn"))


def test_a_fresh_block_without_downsample_is_its_shortcut():
    block = create_model("tiny").layer1[0].eval()  # 8 -> 8 channels, stride 1: identity shortcut
    assert block.downsample is None
    x = torch.randn(1, 8, 4, 4, 4)
    torch.testing.assert_close(block(x), torch.relu(x))


def test_zero_init_last_is_a_training_setting():
    from medcli.engine.config import TrainConfig

    assert TrainConfig().zero_init_last is True
    cfg = TrainConfig.from_dict({**TrainConfig(loss="ce").to_dict(), "zero_init_last": False})
    assert cfg.zero_init_last is False


@pytest.mark.parametrize("depth", ["tiny", 10, 50])
def test_the_configs_feature_map_arithmetic_is_the_models(depth):
    """TrainConfig refuses input sizes that leave layer4 one voxel without building a model (the CLI stays
    torch-free at --help), so it restates the stem's and layer2's strides: they must be the model's."""
    from medcli.engine.config import _deepest_feature_map

    model = create_model(depth=depth, num_classes=2).eval()
    seen = {}
    model.layer4.register_forward_hook(lambda m, i, o: seen.__setitem__("shape", tuple(o.shape[2:])))
    for size in [(8, 8, 8), (9, 9, 9), (16, 16, 8), (15, 20, 33)]:
        with torch.no_grad():
            model(torch.zeros(1, 1, *size))
        assert seen["shape"] == _deepest_feature_map(size), size
