"""The stem's max-pool: native on the CPU, a fixed-order backward on CUDA under deterministic algorithms;
the same forward and the same gradient either way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medcli.models import create_model
from medcli.models.maxpool import MaxPool3d, _MaxPool3dFixedOrder


def _native(x, grad, k=3, s=2, p=1):
    x = x.detach().requires_grad_()
    out = F.max_pool3d(x, k, s, p)
    out.backward(grad)
    return out, x.grad


def _fixed_order(x, grad, k=3, s=2, p=1):
    x = x.detach().requires_grad_()
    out = _MaxPool3dFixedOrder.apply(x, k, s, p)
    out.backward(grad)
    return out, x.grad


# (.., 4, 2, 2): a padding voxel's flat index names a real voxel of the same window (a row behind)
@pytest.mark.parametrize("shape", [(2, 3, 8, 8, 8), (1, 2, 7, 9, 6), (1, 1, 2, 3, 5), (1, 2, 4, 2, 2)])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "relu-ties"])
def test_fixed_order_backward_equals_the_native_one(shape, ties):
    torch.manual_seed(0)
    x = torch.randn(shape)
    if ties:  # after the stem's ReLU many windows are all zeros: the argmax picks one, so must we
        x = torch.relu(x)
    out_ref = F.max_pool3d(x, 3, 2, 1)
    # Integer gradients sum exactly in any order, so the two gradients must be equal bit for bit.
    grad = torch.randint(-8, 9, out_ref.shape).float()
    out_a, gx_a = _native(x, grad)
    out_b, gx_b = _fixed_order(x, grad)
    assert torch.equal(out_a, out_b)
    assert torch.equal(gx_a, gx_b)
    assert gx_b.shape == x.shape


def test_other_geometries_match_too():
    torch.manual_seed(1)
    x = torch.randn(1, 2, 9, 10, 11)
    for k, s, p in ((2, 2, 0), (3, 1, 1), (5, 3, 2)):
        grad = torch.randint(-4, 5, F.max_pool3d(x, k, s, p).shape).float()
        assert torch.equal(_native(x, grad, k, s, p)[1], _fixed_order(x, grad, k, s, p)[1]), (k, s, p)


def test_the_module_is_a_keyless_max_pool():
    model = create_model("tiny")
    assert isinstance(model.maxpool, MaxPool3d) and isinstance(model.maxpool, torch.nn.MaxPool3d)
    assert not any(k.startswith("maxpool") for k in model.state_dict())
    x = torch.randn(1, 8, 6, 6, 6)
    assert torch.equal(model.maxpool(x), F.max_pool3d(x, 3, 2, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_deterministic_cuda_training_steps_repeat_bit_for_bit():
    """Under deterministic algorithms two identical backward passes on CUDA give identical gradients (the
    native max-pool backward's atomic adds made them differ), and the fixed-order path is the one taken."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        grads = []
        for _ in range(2):
            torch.manual_seed(0)
            model = create_model("tiny", in_channels=1, zero_init_last=False).cuda()
            x = torch.randn(2, 1, 32, 32, 32, device="cuda")
            F.cross_entropy(model(x), torch.tensor([0, 1], device="cuda")).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
        x = torch.randn(2, 4, 16, 16, 16, device="cuda")
        grad = torch.randint(-8, 9, (2, 4, 8, 8, 8), device="cuda").float()
        assert torch.equal(_native(x, grad)[1], _fixed_order(x, grad)[1])
    finally:
        torch.use_deterministic_algorithms(was)
