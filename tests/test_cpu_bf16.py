"""CPU bf16 rewrites (fp32 stem, phase-batched dilated convs): same function, gradients and keys."""

from __future__ import annotations

import copy

import pytest
import torch

from medcli.engine.cpu_bf16 import Float32Conv3d, PhaseBatchedConv3d, rewrite_for_cpu_bf16
from medcli.models import create_model


@pytest.mark.parametrize("size", [16, 32])  # 16: layer4's dilation-4 convs fall back; 32: phase path
def test_rewritten_model_trains_identically_in_fp32(size):
    torch.manual_seed(0)
    model = create_model("tiny", in_channels=2, zero_init_last=False, dropout=0.0).train()
    fast = rewrite_for_cpu_bf16(copy.deepcopy(model))
    assert isinstance(fast.conv1, Float32Conv3d)
    # Both 3³ convs of the one block in layer3 (dilation 2) and in layer4 (dilation 4).
    assert sum(isinstance(m, PhaseBatchedConv3d) for m in fast.modules()) == 4
    assert list(fast.state_dict()) == list(model.state_dict())  # checkpoints cannot tell them apart

    x = torch.randn(2, 2, size, size, size)
    y = torch.tensor([0, 1])
    for net in (model, fast):
        torch.nn.functional.cross_entropy(net(x), y).backward()
    torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    # BN running statistics moved the same way (same batches, same function).
    torch.testing.assert_close(fast.layer4[0].bn2.running_var, model.layer4[0].bn2.running_var)


def test_rewrite_keeps_the_parameter_objects():
    """An optimiser or EMA built before or after the rewrite updates the same tensors."""
    model = create_model("tiny")
    before = {name: p for name, p in model.named_parameters()}
    rewrite_for_cpu_bf16(model)
    assert all(p is before[name] for name, p in model.named_parameters())
    plain = create_model("tiny")
    plain.load_state_dict(model.state_dict())  # and a plain model loads what it saves


def test_bf16_autocast_keeps_the_stem_in_float32():
    model = rewrite_for_cpu_bf16(create_model("tiny").eval())
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
