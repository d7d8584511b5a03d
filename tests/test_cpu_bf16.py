"""The predictor's fused bf16 CPU path (medcli.engine.cpu_bf16): same function as the model, up to bf16.

The fused oneDNN ops run only where the CPU computes bf16 natively (elsewhere the predictor keeps the
autocast path), so most tests here skip on such CPUs; CI's machine has AMX and runs them.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medcli.engine import cpu_bf16
from medcli.engine.cpu_kernels import describe, rewrite_for_cpu
from medcli.engine.predictor import fuse_conv_bn, synthetic_predictor
from medcli.engine.speed import cpu_has_fast_bf16
from medcli.models import create_model

native = pytest.mark.skipif(not cpu_has_fast_bf16(), reason="needs a CPU with native bf16 (AMX/AVX512-BF16)")
CL = torch.channels_last_3d


def _trained_looking(depth: str, in_channels: int = 1, head: str = "linear") -> torch.nn.Module:
    """A model whose BNs do something when folded (running stats and affine away from identity)."""
    torch.manual_seed(0)
    model = create_model(depth, in_channels=in_channels, head=head, zero_init_last=False).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@native
@pytest.mark.parametrize(
    ("depth", "in_channels", "size", "head"),
    [("tiny", 2, 32, "linear"), ("tiny", 1, 33, "cosine"), ("18", 1, 24, "linear"), ("50", 4, 20, "linear")],
    ids=["tiny-2ch-32", "tiny-odd-33-cosine-head", "resnet18-zero-pad-shortcuts", "resnet50-4ch"],
)
def test_fused_bf16_model_computes_the_models_function(depth, in_channels, size, head):
    """Features and logits against the float64 model: within bf16's rounding (the autocast path's error is
    the yardstick), and the ReLUs, residual sums and the space-to-depth stem really happen."""
    model = _trained_looking(depth, in_channels, head)
    x = torch.randn(2, in_channels, size, size + 1, size - 1)  # three different extents, two odd
    with torch.inference_mode():
        ref_feats = copy.deepcopy(model).double().forward_features(x.double())
        ref = model.classify(ref_feats.float()).double()
        fast = rewrite_for_cpu(fuse_conv_bn(copy.deepcopy(model), CL), bf16=True, inference=True)
        assert cpu_bf16.is_rewritten(fast) and describe(fast) == cpu_bf16.DESCRIPTION
        feats = fast.forward_features(x.contiguous(memory_format=CL))
        logits = fast(x.contiguous(memory_format=CL))
        auto = rewrite_for_cpu(fuse_conv_bn(copy.deepcopy(model), CL), bf16=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto_feats = auto.forward_features(x.contiguous(memory_format=CL))
    assert feats.dtype == torch.bfloat16 and logits.dtype == torch.float32
    assert feats.shape == ref_feats.shape
    assert _rel(feats, ref_feats) < max(0.03, 2 * _rel(auto_feats, ref_feats))
    assert _rel(logits, ref) < 0.05
    np.testing.assert_allclose(logits.softmax(1).numpy(), ref.softmax(1).numpy(), atol=0.01)


@native
@pytest.mark.parametrize("size", [16, 17, 31])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_space_to_depth_stem_is_the_stride_2_conv_and_relu(size, in_channels):
    torch.manual_seed(size)
    conv = torch.nn.Conv3d(in_channels, 8, 7, stride=2, padding=3, bias=True)
    x = torch.randn(2, in_channels, size, size + 2, size - 1)
    want = torch.relu(F.conv3d(x.double(), conv.weight.double(), conv.bias.double(), stride=2, padding=3))
    got = cpu_bf16.SpaceToDepthStem(conv)(x)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert _rel(got, want) < 0.01
    assert (got == 0).any() and (got > 0).any()  # the fused ReLU, not a copy of the conv


def test_the_rewrite_needs_a_folded_eval_mode_resnet():
    model = create_model("tiny").eval()
    assert not cpu_bf16.applies(model)  # BNs not folded: the fused convs would skip them
    assert cpu_bf16.applies(fuse_conv_bn(copy.deepcopy(model)))
    assert not cpu_bf16.applies(fuse_conv_bn(copy.deepcopy(model)).train())
    model = rewrite_for_cpu(model, bf16=True, inference=True)  # not folded: the autocast path's rewrites
    assert not cpu_bf16.is_rewritten(model)


@native
def test_predictor_runs_bf16_on_fused_ops_and_agrees_with_fp32():
    """The predictor's bf16 path (explicit here: auto picks bf16 from 64³ only) against plain fp32, with TTA
    and two members, as `predict` runs it."""
    x = torch.randn(1, 1, 32, 32, 32)
    kw = {"members": 2, "input_size": 32, "device": "cpu", "tta": True}
    bf16 = synthetic_predictor("tiny", precision="bf16", **kw)
    fp32 = synthetic_predictor("tiny", precision="fp32", fuse=False, channels_last=False, **kw)
    assert all(cpu_bf16.is_rewritten(m) for m in bf16.models)
    got, want = bf16.probabilities(x), fp32.probabilities(x)
    assert got.shape == want.shape == (2, 8, 1)
    np.testing.assert_allclose(got, want, atol=0.01)
    assert np.ptp(want) > 1e-4  # members and flips differ: the comparison is not of constants


@native
def test_grad_cam_runs_on_a_fused_bf16_model():
    from medcli.engine.saliency import grad_cam

    model = _trained_looking("tiny")
    x = torch.randn(1, 1, 32, 32, 32)
    want = grad_cam(copy.deepcopy(model), x, target=1)
    fast = rewrite_for_cpu(fuse_conv_bn(copy.deepcopy(model), CL), bf16=True, inference=True)
    got = grad_cam(fast, x.contiguous(memory_format=CL), target=1)
    assert got.shape == want.shape == (1, 32, 32, 32)
    assert float(torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1]) > 0.95


@native  # elsewhere the autocast path is kept anyway: the switch would be untested
def test_medcli_cpu_kernels_0_keeps_the_autocast_path(monkeypatch):
    monkeypatch.setenv("MEDCLI_CPU_KERNELS", "0")
    model = rewrite_for_cpu(fuse_conv_bn(create_model("tiny").eval()), bf16=True, inference=True)
    assert not cpu_bf16.is_rewritten(model) and describe(model) is None
