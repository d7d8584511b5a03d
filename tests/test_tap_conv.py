"""Tap-wise dilated convs (medcli.engine.tap_conv): the same function and gradients as F.conv3d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medcli.engine.tap_conv import TapwiseConv3d, tapwise_conv3d

SHAPES = [
    (8, 8, 8),  # dilation 4: offsets reach half-way into the volume
    (4, 4, 4),  # dilation 4: every off-centre tap lies in padding (only the centre remains)
    (5, 7, 6),  # sizes no phase split would divide
    (3, 9, 2),  # dilation 2 on an axis of 2: the off-centre taps along it fall out
]


@pytest.mark.parametrize("r", [2, 4])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [1, 2])
def test_values_and_gradients_equal_the_dilated_conv(r, shape, batch):
    torch.manual_seed(r + batch)
    x = torch.randn(batch, 6, *shape, dtype=torch.double, requires_grad=True)
    w = torch.randn(5, 6, 3, 3, 3, dtype=torch.double, requires_grad=True)
    b = torch.randn(5, dtype=torch.double, requires_grad=True)
    got, want = tapwise_conv3d(x, w, b, r), F.conv3d(x, w, b, 1, r, r)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    got_grads = torch.autograd.grad((got * g).sum(), (x, w, b))
    want_grads = torch.autograd.grad((want * g).sum(), (x, w, b))
    for name, a, e in zip(("input", "weight", "bias"), got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, e, msg=name)


def test_gradcheck_without_bias():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 4, 6, dtype=torch.double, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: tapwise_conv3d(x, w, None, 2), (x, w))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last_3d])
def test_output_keeps_the_input_memory_format(fmt):
    x = torch.randn(2, 4, 8, 8, 8).contiguous(memory_format=fmt)
    w = torch.randn(4, 4, 3, 3, 3)
    y = tapwise_conv3d(x, w, None, 2)
    assert y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y, F.conv3d(x, w, None, 1, 2, 2), atol=1e-4, rtol=1e-4)


def test_bf16_autocast_runs_the_gemms_in_bf16_close_to_fp32():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(16, 8, 3, padding=4, dilation=4)
    fast = TapwiseConv3d(16, 8, 3, padding=4, dilation=4)
    fast.load_state_dict(conv.state_dict())
    x = torch.randn(1, 16, 8, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(x)
    assert y.dtype is torch.bfloat16  # as the conv's output would be
    want = conv(x).detach()
    assert (y.float() - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize(
    ("kwargs", "applies"),
    [
        ({"padding": 2, "dilation": 2}, True),
        ({"padding": 4, "dilation": 4}, True),
        ({"padding": 1}, False),  # undilated: oneDNN's own kernel
        ({"padding": 2, "dilation": 2, "stride": 2}, False),
        ({"padding": 1, "dilation": 2}, False),  # padding other than the dilation shrinks the output
        ({"padding": 2, "dilation": 2, "groups": 2}, False),
    ],
)
def test_applies_only_to_what_it_computes(kwargs, applies):
    assert TapwiseConv3d.applies(torch.nn.Conv3d(4, 4, 3, **kwargs)) is applies


def test_unbatched_input_falls_back_to_the_conv():
    fast = TapwiseConv3d(2, 3, 3, padding=2, dilation=2)
    x = torch.randn(2, 6, 6, 6)
    torch.testing.assert_close(fast(x), F.conv3d(x, fast.weight, fast.bias, 1, 2, 2))
