"""LDAM / LDAM-DRW reproduce the worked numbers of reference/ldam.md and the paper's limiting cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medcli.errors import DataError, UsageError
from medcli.losses import get_loss
from medcli.losses.base import effective_number_weights

COUNTS = (76, 259)  # training-fold LGG, HGG of the worked example
Z = torch.tensor([[0.3, 0.1], [0.2, 0.4]])  # sample A (LGG), sample B (HGG): cosine logits
Y = torch.tensor([0, 1])


def ldam(**opts):
    return get_loss("ldam", num_classes=2, class_counts=COUNTS, **opts)


def ldam_drw(**opts):
    return get_loss("ldam-drw", num_classes=2, class_counts=COUNTS, **opts)


def test_margins_match_worked_example():
    assert ldam().margins.tolist() == pytest.approx([0.500000, 0.368001], abs=1e-6)


def test_drw_weights_match_worked_example_and_sum_to_k():
    w = effective_number_weights(COUNTS, 0.9999)
    assert w.tolist() == pytest.approx([1.543060, 0.456940], abs=1e-6)
    assert w.sum().item() == pytest.approx(2.0)


def test_per_sample_losses():
    loss = ldam()
    assert loss(Z[:1], Y[:1]).item() == pytest.approx(9.000123, abs=1e-6)  # ℓ_A
    assert loss(Z[1:], Y[1:]).item() == pytest.approx(5.046469, abs=1e-6)  # ℓ_B


def test_ldam_batch_mean():
    assert ldam()(Z, Y).item() == pytest.approx(7.023296, abs=1e-6)


def test_ldam_drw_before_and_after_the_switch():
    loss = ldam_drw(drw_start=5)
    loss.on_epoch_start(4, 10)
    assert not loss.drw_active
    assert loss(Z, Y).item() == pytest.approx(7.023296, abs=1e-6)  # unweighted before: plain LDAM
    loss.on_epoch_start(5, 10)
    assert loss.drw_active
    assert loss(Z, Y).item() == pytest.approx(8.096831, abs=1e-6)


def test_max_m_zero_is_cross_entropy_of_scaled_logits():
    z = torch.tensor([[0.9, -0.2], [0.1, 0.3], [-0.5, 0.5], [0.0, 0.05]])
    y = torch.tensor([0, 1, 0, 1])
    assert torch.allclose(ldam(max_m=0.0)(z, y), F.cross_entropy(30 * z, y))
    assert torch.allclose(ldam(max_m=0.0, s=10)(z, y), F.cross_entropy(10 * z, y))


def test_only_the_true_class_logit_is_shifted():
    # Shifting the other logit instead would give CE(30·[0.3, 0.1 - m]) = CE([9, 3 - 15]) ≈ 1.7e-9.
    loss = ldam()
    expected = F.cross_entropy(30 * torch.tensor([[0.3 - 0.5, 0.1]]), torch.tensor([0]))
    assert loss(Z[:1], Y[:1]).item() == pytest.approx(expected.item(), rel=1e-6)


def test_beta_zero_weights_are_exactly_one():
    assert torch.equal(effective_number_weights(COUNTS, 0.0), torch.ones(2))
    assert torch.equal(effective_number_weights((3, 1000), 0.0), torch.ones(2))
    loss = ldam_drw()
    assert torch.equal(loss.weight, torch.ones(2))  # before the switch


def test_single_sample_batch_cancels_weights():
    loss = ldam_drw()
    loss.set_drw(True)
    assert loss(Z[:1], Y[:1]).item() == pytest.approx(9.000123, abs=1e-6)


def test_drw_switch_by_fraction():
    loss = ldam_drw()  # default: 0.8 of training, the official 160 of 200
    assert loss.drw_epoch(200) == 160
    loss.on_epoch_start(159, 200)
    assert not loss.drw_active
    loss.on_epoch_start(160, 200)
    assert loss.drw_active
    assert torch.allclose(loss.weight, effective_number_weights(COUNTS, 0.9999))
    # resuming at an earlier epoch turns it back off (the hook is stateless in the epoch)
    loss.on_epoch_start(3, 200)
    assert not loss.drw_active and torch.equal(loss.weight, torch.ones(2))
    assert ldam_drw(drw_start=0.5).drw_epoch(10) == 5
    assert ldam_drw(drw_start=0.01).drw_epoch(10) == 1  # deferred: never from epoch 0


@pytest.mark.parametrize("value, expected", [(160, 160), ("160", 160), ("0.8", 0.8), (3.0, 3), (0.25, 0.25)])
def test_drw_start_parses_epochs_and_fractions(value, expected):
    assert ldam_drw(drw_start=value).drw_start == expected


@pytest.mark.parametrize("value", [0, -1, 1.5, "abc", True, float("nan")])
def test_bad_drw_start_is_a_usage_error(value):
    with pytest.raises(UsageError, match="drw_start"):
        ldam_drw(drw_start=value)


@pytest.mark.parametrize("opts", [{"beta": 1.0}, {"beta": -0.1}, {"s": 0}, {"max_m": -0.1}])
def test_bad_values_are_usage_errors(opts):
    with pytest.raises(UsageError, match=next(iter(opts))):
        ldam_drw(**opts)


def test_needs_cosine_head_and_rejects_unbounded_logits():
    loss = ldam()
    assert loss.needs_cosine_head and ldam_drw().needs_cosine_head
    with pytest.raises(UsageError, match="cosine"):
        loss(torch.tensor([[4.0, -2.0]]), torch.tensor([0]))


def test_low_precision_rounding_above_one_is_tolerated():
    # bf16 has 8 significant bits: a cosine of 0.999 may round to 1 + 2^-7.
    z = torch.tensor([[1.0 + 2**-7, -0.5]], dtype=torch.bfloat16)
    assert z[0, 0].item() > 1.0
    assert torch.isfinite(ldam()(z, torch.tensor([0])))
    with pytest.raises(UsageError, match="cosine"):
        ldam()(torch.tensor([[1.05, 0.0]]), torch.tensor([0]))


def test_empty_class_is_a_data_error_naming_it():
    with pytest.raises(DataError, match="class LGG has no subjects in the training fold"):
        get_loss("ldam", class_counts=(0, 40))
    with pytest.raises(UsageError, match="class counts"):
        get_loss("ldam-drw")


def test_half_precision_logits_are_computed_in_fp32():
    loss = ldam()
    out = loss(Z.half(), Y)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(loss(Z.half().float(), Y).item(), rel=1e-7)


def test_weights_are_a_buffer_that_moves_with_the_module():
    loss = ldam_drw()
    assert {"margins", "weight"} <= dict(loss.named_buffers()).keys()


def test_describe_names_margins_and_switch():
    text = ldam_drw(drw_start=160).describe()
    assert "0.368" in text and "epoch 160" in text and "1.543" in text


@pytest.mark.slow  # the first 3D convolution of a process pays a one-off warm-up of several seconds
def test_trains_a_cosine_head_model():
    """Real forward/backward through the tiny MedicalNet-topology model with a cosine head."""
    models = pytest.importorskip("medcli.models")
    torch.manual_seed(0)
    model = models.create_model(depth="tiny", head="cosine")
    x = torch.randn(4, 1, 16, 16, 16)
    y = torch.tensor([0, 1, 1, 1])
    loss_fn = ldam_drw(drw_start=1)
    loss_fn.on_epoch_start(1, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
