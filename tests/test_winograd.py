"""Winograd F(4³, 3³) convs (medcli.engine.winograd): the same function and gradients as F.conv3d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medcli.engine.winograd import WinogradConv3d, winograd_conv3d

CASES = [
    (4, (16, 16, 16)),  # MedicalNet's layer4 at 128³: 4³ phases, one tile each
    (2, (16, 16, 16)),  # layer3: 8³ phases, two tiles per axis
    (1, (8, 8, 8)),  # an undilated conv: two overlapping tiles per axis
    (2, (9, 10, 11)),  # sizes neither r nor 4 divide: tiles reach past the volume
    (1, (7, 4, 5)),
    (3, (12, 13, 12)),
]


@pytest.mark.parametrize(("r", "shape"), CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_equal_the_conv_in_float64(r, shape, bias):
    torch.manual_seed(r)
    x = torch.randn(2, 5, *shape, dtype=torch.double, requires_grad=True)
    w = torch.randn(4, 5, 3, 3, 3, dtype=torch.double, requires_grad=True)
    b = torch.randn(4, dtype=torch.double, requires_grad=True) if bias else None
    got, want = winograd_conv3d(x, w, b, r), F.conv3d(x, w, b, 1, r, r)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)  # exact up to rounding
    g = torch.randn_like(want)
    inputs = (x, w, b) if bias else (x, w)
    got_grads = torch.autograd.grad((got * g).sum(), inputs)
    want_grads = torch.autograd.grad((want * g).sum(), inputs)
    for name, a, e in zip(("input", "weight", "bias")[: len(inputs)], got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


def test_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 6, 4, dtype=torch.double, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, 3, dtype=torch.double, requires_grad=True)
    b = torch.randn(3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: winograd_conv3d(x, w, b, 1), (x, w, b))


def test_float32_error_is_that_of_a_float32_conv():
    """The transforms scale by up to 8 and 1/24: the float32 error grows, but stays ~1e-5 relative."""
    torch.manual_seed(0)
    x = torch.randn(1, 64, 16, 16, 16)
    w = torch.randn(64, 64, 3, 3, 3) * (2 / (27 * 64)) ** 0.5
    exact = F.conv3d(x.double(), w.double(), None, 1, 4, 4)

    def rel(y: torch.Tensor) -> float:
        return float((y.double() - exact).norm() / exact.norm())

    assert rel(winograd_conv3d(x, w, None, 4)) < 5e-5
    assert rel(F.conv3d(x, w, None, 1, 4, 4)) < 5e-6  # oneDNN, for scale


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last_3d])
def test_output_keeps_the_input_memory_format(fmt):
    x = torch.randn(2, 4, 8, 8, 8).contiguous(memory_format=fmt)
    w = torch.randn(6, 4, 3, 3, 3) / 108**0.5  # outputs of unit scale
    y = winograd_conv3d(x, w, None, 1)
    assert y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y, F.conv3d(x, w, None, 1, 1, 1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "applies"),
    [
        ({"padding": 1}, True),
        ({"padding": 4, "dilation": 4}, True),
        ({"padding": 1, "stride": 2}, False),  # stride 2: not a Winograd tile
        ({"padding": 0}, False),  # "valid" conv: other geometry
        ({"padding": 1, "groups": 2}, False),
        ({"padding": 1, "padding_mode": "reflect"}, False),
    ],
)
def test_applies_to_stride_one_padded_3x3x3_convs_only(kwargs, applies):
    assert WinogradConv3d.applies(torch.nn.Conv3d(4, 4, 3, **kwargs)) is applies
    assert WinogradConv3d.applies(torch.nn.Conv3d(4, 4, 1)) is False


@pytest.mark.parametrize(("r", "size"), [(4, 8), (2, 6), (1, 3)])
def test_module_falls_back_where_the_volume_is_smaller_than_a_tile(r, size):
    """Fewer than 4 voxels per phase: tap by tap (dilated) or oneDNN; same function either way."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 5, 3, padding=r, dilation=r)
    fast = WinogradConv3d(3, 5, 3, padding=r, dilation=r)
    fast.load_state_dict(conv.state_dict())
    for shape in ((2, 3, size, size, size), (3, size, size, size)):  # batched and unbatched
        x = torch.randn(*shape)
        y = fast(x)
        torch.testing.assert_close(y, conv(x), atol=1e-5, rtol=1e-5)
        assert "_WinogradConvBackward" not in _backward_ops(y)
    big = torch.randn(1, 3, 4 * r, 4 * r, 4 * r)  # one full tile per phase: Winograd's own path
    assert "_WinogradConvBackward" in _backward_ops(fast(big))


def _backward_ops(y: torch.Tensor) -> set[str]:
    """The names of the autograd nodes that produced ``y``: which kernel ran."""
    seen, todo = set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in seen:
            seen.add(type(node).__name__)
            todo.extend(n for n, _ in node.next_functions)
    return seen


def test_module_under_bf16_autocast_runs_the_plain_conv():
    conv = WinogradConv3d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype is torch.bfloat16  # autocast's conv, not the float32 transforms


def test_kept_transform_is_reused_and_follows_weight_updates():
    """At inference the transformed weight is kept; an in-place weight update (e.g. load_state_dict)
    invalidates it, and with gradients on it is never used (the weight must get its gradient)."""
    from medcli.engine.winograd import keep_transformed_weights, transformed_weight_bytes

    torch.manual_seed(0)
    model = torch.nn.Sequential(WinogradConv3d(4, 6, 3, padding=2, dilation=2, bias=False))
    conv = model[0]
    assert transformed_weight_bytes(model) == conv.weight.nbytes * 8
    keep_transformed_weights(model)
    x = torch.randn(1, 4, 8, 8, 8)
    with torch.no_grad():
        first = model(x)
        kept = conv._kept
        torch.testing.assert_close(model(x), first)
        assert conv._kept is kept  # reused, not recomputed
        conv.weight.mul_(2)  # an in-place update
        torch.testing.assert_close(model(x), 2 * first, atol=1e-5, rtol=1e-5)
        assert conv._kept is not kept
    model(x).sum().backward()  # with gradients: transformed afresh, and the weight gets its gradient
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_weight_gradient_made_in_blocks_of_output_channels_is_exact():
    """With 512 input channels the weight gradient is built 64 output channels at a time; 130 of them
    leave a short last block."""
    torch.manual_seed(1)
    x = torch.randn(1, 512, 4, 5, 4, dtype=torch.double, requires_grad=True)
    w = torch.randn(130, 512, 3, 3, 3, dtype=torch.double, requires_grad=True)
    got, want = winograd_conv3d(x, w, None, 1), F.conv3d(x, w, None, 1, 1, 1)
    g = torch.randn_like(want)
    got_w = torch.autograd.grad((got * g).sum(), w)[0]
    want_w = torch.autograd.grad((want * g).sum(), w)[0]
    torch.testing.assert_close(got_w, want_w, rtol=1e-10, atol=1e-10)
