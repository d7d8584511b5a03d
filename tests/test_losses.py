"""Built-in losses (ce, weighted-ce, focal) against direct formulas and torch references; get_loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medcli.errors import DataError, UnknownNameError, UsageError
from medcli.losses import LOSSES, available_losses, check_loss_name, get_loss, parse_loss_options

LOGITS = torch.tensor([[2.0, -1.0], [0.5, 0.25], [-3.0, 1.0], [0.1, 0.2], [1.5, 1.0]])
TARGET = torch.tensor([0, 1, 0, 1, 1])
COUNTS = (10, 30)
BUILTINS = ["ce", "weighted-ce", "focal", "ldam", "ldam-drw"]


def _p_true(logits, target):
    """Softmax probability of the true class per sample, in float64 via math (independent of torch)."""
    out = []
    for row, t in zip(logits.tolist(), target.tolist(), strict=True):
        out.append(math.exp(row[t]) / sum(math.exp(v) for v in row))
    return out


def test_builtins_are_registered():
    assert sorted(BUILTINS) == LOSSES.names()
    assert set(BUILTINS) <= set(available_losses())


@pytest.mark.parametrize("spelling", ["CE", "Weighted_CE", "weighted-ce", " FOCAL ", "LDAM", "ldam_drw"])
def test_names_are_case_and_separator_insensitive(spelling):
    loss = get_loss(spelling, class_counts=COUNTS)
    assert type(loss) is LOSSES.get(spelling)


def test_ce_matches_torch():
    assert torch.allclose(get_loss("ce")(LOGITS, TARGET), F.cross_entropy(LOGITS, TARGET))
    smoothed = get_loss("ce", label_smoothing=0.1)(LOGITS, TARGET)
    assert torch.allclose(smoothed, F.cross_entropy(LOGITS, TARGET, label_smoothing=0.1))
    assert not torch.allclose(smoothed, F.cross_entropy(LOGITS, TARGET))


def test_weighted_ce_weights_and_weighted_mean():
    loss = get_loss("weighted-ce", class_counts=COUNTS)
    # 1/10 : 1/30 = 3 : 1, normalised to sum 2 → 1.5, 0.5
    assert loss.weight.tolist() == pytest.approx([1.5, 0.5])
    w = [1.5 if t == 0 else 0.5 for t in TARGET.tolist()]
    nll = [-math.log(p) for p in _p_true(LOGITS, TARGET)]
    expected = sum(wi * li for wi, li in zip(w, nll, strict=True)) / sum(w)
    assert loss(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(
        loss(LOGITS, TARGET), F.cross_entropy(LOGITS, TARGET, weight=torch.tensor([1.5, 0.5]))
    )


def test_weighted_ce_balanced_counts_is_plain_ce():
    loss = get_loss("weighted-ce", class_counts=(20, 20))
    assert torch.allclose(loss(LOGITS, TARGET), F.cross_entropy(LOGITS, TARGET))


@pytest.mark.parametrize("gamma", [0.5, 2.0, 3.0])
def test_focal_matches_formula(gamma):
    loss = get_loss("focal", gamma=gamma)
    expected = sum(-((1 - p) ** gamma) * math.log(p) for p in _p_true(LOGITS, TARGET)) / len(TARGET)
    assert loss(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-5)


def test_focal_gamma_zero_is_cross_entropy():
    assert torch.allclose(get_loss("focal", gamma=0)(LOGITS, TARGET), F.cross_entropy(LOGITS, TARGET))


def test_focal_balanced_alpha_is_a_weighted_mean():
    loss = get_loss("focal", class_counts=COUNTS, gamma=2.0, alpha="balanced")
    w = [1.5 if t == 0 else 0.5 for t in TARGET.tolist()]
    terms = [-((1 - p) ** 2) * math.log(p) for p in _p_true(LOGITS, TARGET)]
    expected = sum(wi * ti for wi, ti in zip(w, terms, strict=True)) / sum(w)
    assert loss(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-5)
    explicit = get_loss("focal", gamma=2.0, alpha=[3, 1])  # same ratio, any scale
    assert explicit(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-5)


def test_focal_bad_values():
    with pytest.raises(UsageError, match="alpha"):
        get_loss("focal", alpha="heavy")
    with pytest.raises(UsageError, match="gamma"):
        get_loss("focal", gamma=-1)
    with pytest.raises(UsageError, match="class counts"):
        get_loss("focal", alpha="balanced")  # balanced needs the training fold's counts


def test_focal_gradient_finite_for_saturated_logits():
    logits = torch.tensor([[60.0, -60.0]], requires_grad=True)
    get_loss("focal", gamma=0.5)(logits, torch.tensor([0])).backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", BUILTINS)
def test_gradients_flow(name):
    logits = torch.tanh(LOGITS).clone().requires_grad_(True)  # cosine range, valid for LDAM too
    loss = get_loss(name, class_counts=COUNTS)
    loss.on_epoch_start(9, 10)
    out = loss(logits, TARGET)
    assert out.dim() == 0 and torch.isfinite(out)
    out.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", BUILTINS)
def test_interface_every_loss_has(name):
    loss = get_loss(name, class_counts=COUNTS)
    assert isinstance(loss.needs_cosine_head, bool)
    assert loss.needs_cosine_head == name.startswith("ldam")
    assert isinstance(loss.describe(), str) and loss.describe().startswith(name)


@pytest.mark.parametrize("name", BUILTINS)
def test_fp32_under_autocast(name):
    """bf16 logits from an autocast region are computed in fp32, with the same value as fp32 logits."""
    loss = get_loss(name, class_counts=COUNTS)
    layer = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.tanh(layer(x))
        assert logits.dtype == torch.bfloat16
        out = loss(logits, TARGET)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(loss(logits.float(), TARGET).item(), rel=1e-6)


def test_check_loss_name_canonicalises_builtins():
    assert check_loss_name("Weighted_CE") == "weighted-ce"
    assert check_loss_name("LDAM") == "ldam"


@pytest.mark.parametrize("fails", [get_loss, check_loss_name])
def test_unknown_name_suggests_closest(fails):
    with pytest.raises(UnknownNameError) as info:
        fails("ldma")
    assert "did you mean 'ldam'" in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("bad", [None, "", 3])
def test_non_string_name_is_a_usage_error(bad):
    with pytest.raises(UsageError, match="loss name"):
        get_loss(bad)


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(UsageError) as info:
        get_loss("focal", gama=2)
    text = str(info.value)
    assert "'gama'" in text and "gamma" in text and "alpha" in text and "did you mean 'gamma'" in text


def test_option_keys_accept_dashes():
    assert get_loss("ldam-drw", class_counts=COUNTS, **{"drw-start": 7}).drw_start == 7


def test_class_counts_are_checked_for_every_loss():
    with pytest.raises(DataError, match="class HGG has no subjects in the training fold"):
        get_loss("ce", class_counts=(12, 0))
    with pytest.raises(UsageError, match="3 entries"):
        get_loss("weighted-ce", class_counts=(1, 2, 3))
    with pytest.raises(UsageError, match="class counts"):
        get_loss("weighted-ce")


def test_parse_loss_options():
    opts = parse_loss_options(["gamma=2", "alpha=balanced", "drw-start=0.8", "flag=true", "x=none"])
    assert opts == {"gamma": 2, "alpha": "balanced", "drw_start": 0.8, "flag": True, "x": None}
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_loss_options(["gamma"])


def test_weighted_ce_trains_a_linear_model():
    """A few real optimiser steps on separable, imbalanced data lower the loss."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=gen)
    y = (x[:, 0] > 0.8).long()
    counts = (int((y == 0).sum()), int((y == 1).sum()))
    model = torch.nn.Linear(4, 2)
    loss_fn = get_loss("weighted-ce", class_counts=counts)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    first = loss_fn(model(x), y).item()
    for _ in range(20):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    assert loss_fn(model(x), y).item() < 0.7 * first
