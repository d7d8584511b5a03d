"""CPU rewrites (Winograd 3³ convs in fp32; tap-wise and phase-batched dilated convs and an fp32 stem under
bf16): same function, gradients and keys."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from medcli.engine.cpu_kernels import (
    Bf16SafeConv3d,
    CentreTapConv3d,
    Float32Conv3d,
    PhaseBatchedConv3d,
    describe,
    fp32_kernels_for,
    fp32_kernels_here,
    rewrite_for_cpu,
)
from medcli.engine.tap_conv import TapwiseConv3d
from medcli.engine.winograd import WinogradConv3d
from medcli.models import create_model


def _gemm_settings() -> str:
    """What decides the precision of fp32 matrix products on this CPU (for a failure message)."""
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    env = {k: v for k, v in os.environ.items() if k.startswith(("ONEDNN", "DNNL", "MKL", "OMP", "KMP"))}
    return (
        f"torch {torch.__version__}, CPU {torch.backends.cpu.get_cpu_capability()}, "
        f"float32_matmul_precision {torch.get_float32_matmul_precision()}, "
        f"mkldnn matmul fp32_precision {getattr(mkldnn, 'fp32_precision', 'n/a')}, env {env}"
    )


def _relu_to_silu(model: torch.nn.Module) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.ReLU):
                setattr(module, name, torch.nn.SiLU())


def _count(model, cls) -> int:
    return sum(type(m) is cls for m in model.modules())


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32-rewrites", "bf16-rewrites"])
# 16: layer3's grid is 2³ (phase split and Winograd fall back); 64: layer3's convs run by Winograd.
@pytest.mark.parametrize("size", [16, 32, 64])
def test_rewritten_model_trains_identically_in_fp32(size, bf16):
    torch.manual_seed(0)
    model = create_model("tiny", in_channels=2, zero_init_last=False, dropout=0.0).train()
    # SiLU for ReLU: the kernels are under test, not ReLU's kink.  With ReLU, a pre-activation within float
    # rounding of 0 can fall on either side in the two models and switch its whole gradient path on or off
    # (seen on an AVX-512 Xeon at 64³: conv1.weight's gradient ~4e-3 off while every kernel agreed to 1e-6).
    _relu_to_silu(model)
    fast = rewrite_for_cpu(copy.deepcopy(model), bf16=bf16, fp32_kernels="all")
    # The tiny model has seven stride-1 3³ convs: three undilated (layer1, layer2), two at dilation 2
    # (layer3) and two at dilation 4 (layer4).
    if bf16:
        assert isinstance(fast.conv1, Float32Conv3d)
        assert _count(fast, PhaseBatchedConv3d) == 2 and _count(fast, TapwiseConv3d) == 2
        assert _count(fast, WinogradConv3d) == 0
    else:
        assert type(fast.conv1) is torch.nn.Conv3d
        assert _count(fast, WinogradConv3d) == 7 and _count(fast, TapwiseConv3d) == 0
    assert list(fast.state_dict()) == list(model.state_dict())  # checkpoints cannot tell them apart

    x = torch.randn(2, 2, size, size, size)
    y = torch.tensor([0, 1])
    for net in (model, fast):
        torch.nn.functional.cross_entropy(net(x), y).backward()
    torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)
    # Before pooling too, where an error in some voxels would not average out (as a whole: single voxels
    # near ReLU's zero differ relatively by float rounding; here ~1e-5 of the norm, as in float64 checks).
    with torch.no_grad():
        got, want = fast.forward_features(x), model.forward_features(x)
    assert float((got - want).norm() / want.norm()) < 1e-4
    for (name, p), q in zip(model.named_parameters(), fast.parameters(), strict=True):
        # The message keeps torch's mismatch figures and the settings that could make fp32 GEMMs round to
        # bf16 (an AVX-512 Xeon with torch 2.11 failed at 64³ here, ~4e-3 off: bf16's unit roundoff).
        torch.testing.assert_close(
            q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}\n{_gemm_settings()}"
        )
    # BN running statistics moved the same way (same batches, same function).
    torch.testing.assert_close(fast.layer4[0].bn2.running_var, model.layer4[0].bn2.running_var)


def test_rewrite_keeps_the_parameter_objects():
    """An optimiser or EMA built before or after the rewrite updates the same tensors."""
    model = create_model("tiny")
    before = {name: p for name, p in model.named_parameters()}
    rewrite_for_cpu(model, bf16=True)
    assert all(p is before[name] for name, p in model.named_parameters())
    plain = create_model("tiny")
    plain.load_state_dict(model.state_dict())  # and a plain model loads what it saves


def test_bf16_autocast_keeps_the_stem_in_float32():
    model = rewrite_for_cpu(create_model("tiny").eval(), bf16=True)
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = output.dtype

        return hook

    model.conv1.register_forward_hook(record("stem"))
    model.layer1[0].conv1.register_forward_hook(record("block"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(1, 1, 16, 16, 16))
    assert seen == {"stem": torch.float32, "block": torch.bfloat16}


def test_describe_reads_what_was_rewritten_from_the_model():
    assert describe(create_model("tiny")) is None  # nothing rewritten
    fp32 = rewrite_for_cpu(create_model("tiny"), bf16=False, fp32_kernels="all")
    assert describe(fp32) == "3³ convs by Winograd F(4,3)"
    assert describe(rewrite_for_cpu(create_model("tiny"), bf16=False, fp32_kernels="onednn")) == (
        "dilation-2/4 convs as their centre tap on grids within the dilation"
    )
    assert describe(rewrite_for_cpu(create_model("tiny"), bf16=True)) == (
        "fp32 stem, dilation-4 convs tap by tap, dilation-2 convs phase-batched"
    )


@pytest.mark.parametrize("bf16", [False, True])
def test_medcli_cpu_kernels_0_keeps_onednns_convs_in_training_and_predict(monkeypatch, bf16):
    from medcli.engine.predictor import synthetic_predictor

    monkeypatch.setenv("MEDCLI_CPU_KERNELS", "0")
    model = rewrite_for_cpu(create_model("tiny"), bf16=bf16)
    assert describe(model) is None
    # oneDNN's convs; bf16 training keeps the weight-gradient guard, a correctness fix (still oneDNN's conv)
    kept = Bf16SafeConv3d if bf16 else torch.nn.Conv3d
    assert all(type(m) is kept for m in model.modules() if isinstance(m, torch.nn.Conv3d))
    # Both precisions: which one ``auto`` picks depends on the CPU (bf16 where it is native).
    for precision in ("fp32", "bf16"):
        predictor = synthetic_predictor("tiny", members=1, input_size=32, device="cpu", precision=precision)
        assert describe(predictor.models[0]) is None
    monkeypatch.setenv("MEDCLI_CPU_KERNELS", "1")
    predictor = synthetic_predictor("tiny", members=1, input_size=32, device="cpu", precision="fp32")
    wanted = WinogradConv3d if fp32_kernels_here() == "all" else CentreTapConv3d
    assert any(type(m) is wanted for m in predictor.models[0].modules())


@pytest.mark.parametrize("fmt", [torch.channels_last_3d, torch.contiguous_format])
def test_pointwise_conv_as_gemm_equals_the_conv(fmt):
    """Values, memory format and gradients of the GEMM path (channels_last_3d) and the fallback."""
    from medcli.engine.cpu_kernels import PointwiseConv3d

    torch.manual_seed(0)
    conv = torch.nn.Conv3d(16, 24, 1)
    fast = PointwiseConv3d(16, 24, 1)
    fast.load_state_dict(conv.state_dict())
    x = torch.randn(2, 16, 5, 6, 7).contiguous(memory_format=fmt)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = fast(xa), conv(xb)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.is_contiguous(memory_format=fmt)
    # channels_last_3d takes the GEMM (no convolution node in the graph); other layouts the conv.
    assert ("Convolution" in type(got.grad_fn).__name__) is (fmt is torch.contiguous_format)
    g = torch.randn_like(want)
    (got * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.weight.grad, conv.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.bias.grad, conv.bias.grad, atol=1e-4, rtol=1e-4)


def test_only_large_stride_one_pointwise_convs_become_gemms():
    from medcli.engine.cpu_kernels import PointwiseConv3d

    net = torch.nn.Sequential(
        torch.nn.Conv3d(256, 512, 1),  # layer3-sized: a GEMM
        torch.nn.Conv3d(64, 256, 1),  # layer1-sized: oneDNN was faster
        torch.nn.Conv3d(256, 512, 1, stride=2),  # a strided downsample
    )
    keys = list(net.state_dict())
    rewrite_for_cpu(net, bf16=False, fp32_kernels="all")
    assert [type(m) for m in net] == [PointwiseConv3d, torch.nn.Conv3d, torch.nn.Conv3d]
    assert list(net.state_dict()) == keys
    assert describe(net) == "large 1³ convs as GEMMs"
    bf16 = rewrite_for_cpu(torch.nn.Sequential(torch.nn.Conv3d(256, 512, 1)), bf16=True)
    assert type(bf16[0]) is Bf16SafeConv3d  # bf16 keeps oneDNN's conv (guarded for training), not a GEMM


def _poison_freed_memory() -> None:
    """Free NaN-filled blocks, so that a kernel reading memory it never wrote is likely to read NaN."""
    sizes = (1 << 10, 1 << 14, 1 << 16, 1 << 18)
    junk = [torch.full((n,), float("nan"), dtype=torch.bfloat16) for n in sizes]
    del junk


# A depth-2 volume under a 3³ kernel: oneDNN's AVX512-BF16 backward-weights kernel (CPUs with bf16 but
# no AMX, e.g. AMD Zen 5) returned wrong or NaN weight gradients for it.  Phase batching at dilation 2
# turns layer3's 4³ grid (a 32³ input) into such 2³ sub-grids.
@pytest.mark.parametrize(
    "cls, shape, dilation",
    [(Bf16SafeConv3d, (2, 4, 4), 1), (Bf16SafeConv3d, (2, 2, 2), 1), (PhaseBatchedConv3d, (4, 8, 8), 2)],
    ids=["depth2", "grid2", "phase-batched-4"],
)
def test_bf16_weight_gradient_is_right_on_volumes_shallower_than_the_kernel(cls, shape, dilation):
    for seed in range(4):
        torch.manual_seed(seed)
        conv = cls(16, 16, 3, padding=dilation, dilation=dilation)
        x, grad_out = torch.randn(2, 16, *shape), torch.randn(2, 16, *shape)
        w64 = conv.weight.detach().double().requires_grad_()
        F.conv3d(x.double(), w64, None, 1, dilation, dilation).backward(grad_out.double())
        _poison_freed_memory()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        y.backward(grad_out.to(y.dtype))
        got = conv.weight.grad.double()
        assert torch.isfinite(got).all()
        assert (got - w64.grad).norm() / w64.grad.norm() < 0.02


@pytest.mark.parametrize("kernels", ["1", "0"], ids=["cpu-kernels", "MEDCLI_CPU_KERNELS=0"])
def test_bf16_training_on_a_16_cube_gets_the_fp32_gradients(monkeypatch, kernels):
    """The trainer's CPU bf16 placement on an input whose layer2 grid is 2³: every conv's weight gradient
    points where float32's does (before the guard, layer2's was off, or NaN, on a Zen 5)."""
    from medcli.engine.trainer import Precision, autocast, place_model

    monkeypatch.setenv("MEDCLI_CPU_KERNELS", kernels)
    torch.manual_seed(0)
    model = create_model("tiny", zero_init_last=False, dropout=0.0).train()
    _relu_to_silu(model)  # no kinks: bf16 rounding cannot switch a gradient path on or off
    fast = copy.deepcopy(model)
    cpu = torch.device("cpu")
    place_model(fast, cpu, Precision(torch.bfloat16, False, True))
    assert _count(fast, torch.nn.Conv3d) == 0  # each plain conv guarded or rewritten
    x, y = torch.randn(2, 1, 16, 16, 16), torch.tensor([0, 1])
    F.cross_entropy(model(x), y).backward()
    _poison_freed_memory()
    with autocast(cpu, Precision(torch.bfloat16, False, True)):
        logits = fast(x.contiguous(memory_format=torch.channels_last_3d))
    F.cross_entropy(logits.float(), y).backward()
    for (name, p), q in zip(model.named_parameters(), fast.parameters(), strict=True):
        if p.dim() == 5:
            assert torch.isfinite(q.grad).all(), name
            cos = F.cosine_similarity(q.grad.flatten().double(), p.grad.flatten().double(), dim=0)
            assert cos > 0.98, name


def test_fp32_kernels_follow_the_cpu():
    """MKL (Winograd's products, the 1³ GEMMs) runs its AVX2 code on AMD's AVX-512 CPUs, where oneDNN's convs
    were faster; elsewhere medcli's fp32 kernels stay."""
    assert fp32_kernels_for("AuthenticAMD", "AVX512") == "onednn"
    assert fp32_kernels_for("AuthenticAMD", "AVX2") == "all"
    assert fp32_kernels_for("GenuineIntel", "AVX512") == "all"
    assert fp32_kernels_for("", "DEFAULT") == "all"
    # The default is this CPU's plan.
    here = rewrite_for_cpu(create_model("tiny"), bf16=False, fp32_kernels=fp32_kernels_here())
    assert describe(rewrite_for_cpu(create_model("tiny"), bf16=False)) == describe(here)
    with pytest.raises(ValueError, match="fp32_kernels"):
        rewrite_for_cpu(create_model("tiny"), bf16=False, fp32_kernels="fast")


def test_medcli_fp32_kernels_chooses_the_plan(monkeypatch):
    from medcli.errors import UsageError

    for plan, kind in (("all", WinogradConv3d), ("onednn", CentreTapConv3d)):
        monkeypatch.setenv("MEDCLI_FP32_KERNELS", plan.upper())
        assert fp32_kernels_here() == plan
        assert _count(rewrite_for_cpu(create_model("tiny"), bf16=False), kind) > 0
    monkeypatch.setenv("MEDCLI_FP32_KERNELS", "fast")
    with pytest.raises(UsageError, match="MEDCLI_FP32_KERNELS=fast is not one of all, onednn"):
        rewrite_for_cpu(create_model("tiny"), bf16=False)


# 16: every dilated conv sees a 2³ grid (centre tap only); 32: layer4's 4³ grid at dilation 4 is centre-only,
# layer3's at dilation 2 is not (oneDNN's conv); 64: no conv is centre-only.
@pytest.mark.parametrize("size, centre_only", [(16, 4), (32, 2), (64, 0)])
def test_onednn_plan_trains_identically_and_runs_centre_only_convs_as_one_tap(size, centre_only):
    torch.manual_seed(0)
    model = create_model("tiny", zero_init_last=False, dropout=0.0).train()
    _relu_to_silu(model)
    fast = rewrite_for_cpu(copy.deepcopy(model), bf16=False, fp32_kernels="onednn")
    assert _count(fast, CentreTapConv3d) == 4 and _count(fast, WinogradConv3d) == 0
    assert list(fast.state_dict()) == list(model.state_dict())
    ran = []  # per CentreTapConv3d call: did its input fit within the dilation (one tap)?

    def record(module, inputs, output):
        ran.append(max(inputs[0].shape[2:]) <= module.dilation[0])

    hooks = [m.register_forward_hook(record) for m in fast.modules() if type(m) is CentreTapConv3d]
    x, y = torch.randn(2, 1, size, size, size), torch.tensor([0, 1])
    for net in (model, fast):
        torch.nn.functional.cross_entropy(net(x), y).backward()
    for hook in hooks:
        hook.remove()
    assert sum(ran) == centre_only and len(ran) == 4
    torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(
            q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )
