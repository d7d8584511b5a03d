"""Optimiser/param groups, LR schedules, gradient accumulation, clipping after unscale, EMA."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from medcli.engine.ema import create_ema, effective_decay, ema_checkpoint, restore_ema
from medcli.engine.optim import create_optimizer, create_schedule, param_groups, warmup_cosine
from medcli.engine.trainer import Precision, TrainState, optimizer_step, train_one_epoch
from medcli.errors import UnknownNameError

CPU = torch.device("cpu")
FP32 = Precision(None, False, False)


class Toy(nn.Module):
    """BN-free: a conv 'backbone' and an fc head, so batch composition does not change the function."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv1(x)).mean(dim=(2, 3, 4)))


def _batches(x, y, size):
    return [
        (x[i : i + size], y[i : i + size], [f"s{j}" for j in range(i, i + size)])
        for i in range(0, len(x), size)
    ]


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, 6, generator=g), torch.tensor([0, 1] * (n // 2) + [0] * (n % 2))


def test_param_groups_head_lr_and_no_decay_on_norms_and_biases():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv3d(1, 4, 3))
    model.add_module("bn1", nn.BatchNorm3d(4))
    model.add_module("fc", nn.Linear(4, 2))
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.05, head_lr_mult=10)}
    assert set(groups) == {"backbone/decay", "backbone/no_decay", "head/decay", "head/no_decay"}
    assert groups["head/decay"]["lr"] == pytest.approx(1e-2)
    assert groups["backbone/decay"]["lr"] == pytest.approx(1e-3)
    assert groups["backbone/decay"]["weight_decay"] == 0.05
    assert groups["backbone/no_decay"]["weight_decay"] == 0.0
    ids = {id(p) for p in groups["backbone/no_decay"]["params"]}
    assert {id(model.bn1.weight), id(model.bn1.bias), id(model.conv1.bias)} == ids
    opt = create_optimizer("SGD", model, lr=1e-3, weight_decay=0.05, head_lr_mult=10)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"]
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([1e-3, 1e-3, 1e-2, 1e-2])


def test_unknown_optimizer_suggests():
    with pytest.raises(UnknownNameError, match="adamw"):
        create_optimizer("adamww", Toy(), lr=1e-3)


def test_cosine_warmup_values_per_optimizer_step():
    f = warmup_cosine(total_steps=10, warmup_steps=2, min_ratio=0.0)
    assert [f(0), f(1)] == pytest.approx([1 / 3, 2 / 3])
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert f(10) == pytest.approx(0.0)

    model = Toy()
    opt = create_optimizer("adam", model, lr=1.0, head_lr_mult=10)
    sched = create_schedule("cosine", opt, epochs=5, steps_per_epoch=2, warmup_epochs=1)
    seen = []
    for _ in range(10):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.scheduler.step()
    assert sched.interval == "step"
    expected = warmup_cosine(10, 2, 0.0)
    assert [s[0] for s in seen] == pytest.approx([expected(i) for i in range(10)])
    assert [s[-1] for s in seen] == pytest.approx([10 * expected(i) for i in range(10)])  # head × 10


def test_accumulation_two_micro_batches_equal_one_big_batch():
    x, y = _data(4)
    torch.manual_seed(0)
    a = Toy()
    b = copy.deepcopy(a)
    for model, size, accum in ((a, 4, 1), (b, 2, 2)):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        state = TrainState()
        train_one_epoch(
            model,
            _batches(x, y, size),
            nn.CrossEntropyLoss(),
            opt,
            torch.amp.GradScaler("cpu", enabled=False),
            device=CPU,
            precision=FP32,
            accumulation=accum,
            state=state,
        )
        assert state.global_step == 1
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_partial_last_group_is_flushed_and_scaled_by_its_own_size():
    x, y = _data(6)
    torch.manual_seed(0)
    model = Toy()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    state = TrainState()
    # 3 micro-batches of 2 with accumulation 2: groups [b0, b1] and [b2] → 2 optimiser steps.
    train_one_epoch(
        model,
        _batches(x, y, 2),
        nn.CrossEntropyLoss(),
        opt,
        torch.amp.GradScaler("cpu", enabled=False),
        device=CPU,
        precision=FP32,
        accumulation=2,
        state=state,
    )
    assert state.global_step == 2
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for chunk in (slice(0, 4), slice(4, 6)):  # step 1: mean over 4 samples; step 2: the 2 left over
        ref_opt.zero_grad()
        nn.CrossEntropyLoss()(ref(x[chunk]), y[chunk]).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clipping_sees_unscaled_gradients():
    x, y = _data(4)
    torch.manual_seed(0)
    model = Toy()
    ref = copy.deepcopy(model)
    nn.CrossEntropyLoss()(ref(x), y).backward()
    true_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).item()

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(nn.CrossEntropyLoss()(model(x), y)).backward()
    clip = true_norm / 4
    norm = optimizer_step(opt, scaler, list(model.parameters()), grad_clip=clip)
    assert norm == pytest.approx(true_norm, rel=1e-4)  # the scaled norm would be 4096× larger
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters(), strict=True)])
    assert step.norm().item() == pytest.approx(clip, rel=1e-3)  # lr 1: the update is the clipped gradient


def test_ema_follows_the_warmup_formula():
    torch.manual_seed(0)
    model = nn.Linear(1, 1, bias=False)
    ema = create_ema(model, decay=0.9)
    expected = model.weight.detach().clone()
    values = []
    for n in range(5):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update_parameters(model)
        w = model.weight.detach()
        if n == 0:
            expected = w.clone()  # the first update copies
        else:
            d = effective_decay(0.9, n)
            expected = d * expected + (1 - d) * w
        values.append(ema.module.weight.detach().clone())
        torch.testing.assert_close(ema.module.weight, expected)
    assert effective_decay(0.9, 1) == pytest.approx(2 / 11)
    assert effective_decay(0.9, 1000) == 0.9


def test_ema_averages_batchnorm_buffers():
    bn = nn.BatchNorm1d(2)
    ema = create_ema(bn, decay=0.5)
    bn.train()
    bn(torch.randn(8, 2) + 3)
    ema.update_parameters(bn)  # copy
    before = ema.module.running_mean.clone()
    bn(torch.randn(8, 2) + 3)
    ema.update_parameters(bn)
    d = effective_decay(0.5, 1)
    torch.testing.assert_close(ema.module.running_mean, d * before + (1 - d) * bn.running_mean)


def test_frozen_backbone_trains_only_the_head():
    from medcli.engine.optim import set_backbone_frozen

    x, y = _data(4)
    torch.manual_seed(0)
    model = Toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = create_optimizer("adam", model, lr=1e-2, head_lr_mult=10)
    set_backbone_frozen(model, True)
    loader = _batches(x, y, 2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_one_epoch(model, loader, nn.CrossEntropyLoss(), opt, scaler, device=CPU, precision=FP32)
    assert torch.equal(model.conv1.weight, before["conv1.weight"])
    assert not torch.equal(model.fc.weight, before["fc.weight"])
    set_backbone_frozen(model, False)
    train_one_epoch(model, loader, nn.CrossEntropyLoss(), opt, scaler, device=CPU, precision=FP32)
    assert not torch.equal(model.conv1.weight, before["conv1.weight"])


def test_steps_skipped_by_the_grad_scaler_do_not_advance_schedule_or_ema(recwarn):
    """fp16 AMP skips optimiser steps whose gradients overflowed; the LR schedule and EMA must not move
    (and torch's "lr_scheduler.step() before optimizer.step()" warning must not appear)."""
    x, y = _data(4)
    torch.manual_seed(0)
    model = Toy()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = create_schedule("cosine", opt, epochs=2, steps_per_epoch=2, warmup_epochs=1)
    ema = create_ema(model, decay=0.9)

    class Huge(nn.Module):  # gradients ~1e3 × a 1e38 scale overflow fp32: every step is skipped
        def forward(self, logits, target):
            return nn.functional.cross_entropy(logits, target) * 1e3

    scaler = torch.amp.GradScaler("cpu", init_scale=1e38, growth_interval=10**6)
    kwargs = dict(device=CPU, precision=FP32, schedule=sched, ema=ema)
    train_one_epoch(model, _batches(x, y, 2), Huge(), opt, scaler, **kwargs)
    assert scaler.get_scale() < 1e38  # both steps overflowed and the scale backed off
    for k, v in before.items():
        torch.testing.assert_close(model.state_dict()[k], v)
    assert sched.scheduler.last_epoch == 0 and int(ema.n_averaged) == 0
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]

    # With a sane scale the same loop steps: the schedule and the EMA advance once per optimiser step.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    train_one_epoch(model, _batches(x, y, 2), nn.CrossEntropyLoss(), opt, scaler, **kwargs)
    assert sched.scheduler.last_epoch == 2 and int(ema.n_averaged) == 2
    assert not torch.equal(model.fc.weight, before["fc.weight"])


def test_a_resumed_ema_keeps_its_own_update_count_when_steps_were_skipped():
    """After skipped fp16 steps the EMA has fewer updates than the run has steps; the checkpoint keeps the
    EMA's count, so a resumed EMA continues with the same decay and equals the uninterrupted one."""
    x, y = _data(4)
    torch.manual_seed(0)
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = create_ema(model, decay=0.99)
    state = TrainState()
    kwargs = dict(device=CPU, precision=FP32, ema=ema, state=state)
    # The first step overflows (gradients ~1e3 at a 1e38 scale) and is skipped; the scale backs off to
    # 100 and the second step is taken.
    scaler = torch.amp.GradScaler("cpu", init_scale=1e38, backoff_factor=1e-36, growth_interval=10**6)
    loss = lambda logits, target: nn.functional.cross_entropy(logits, target) * 1e3  # noqa: E731
    train_one_epoch(model, _batches(x, y, 2), loss, opt, scaler, **kwargs)
    assert state.global_step == 2 and int(ema.n_averaged) == 1

    saved = {**ema_checkpoint(ema), "global_step": state.global_step}
    resumed = create_ema(copy.deepcopy(model), decay=0.99)
    restore_ema(resumed, saved)
    assert int(resumed.n_averaged) == 1
    for target in (ema, resumed):  # one more update of each from the same weights
        target.update_parameters(model)
    for a, b in zip(ema.module.state_dict().values(), resumed.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # A file from before "ema_updates" existed: the step count stands in for it.
    legacy = {"ema": saved["ema"], "global_step": 5}
    restore_ema(resumed, legacy)
    assert int(resumed.n_averaged) == 5
