"""The learning-rate schedule: warm-up, cosine and linear decay against their formulas, the
constant LR without flags, and bad flags rejected by name."""

import math

import pytest
import torch

from hybridpar_ext.train.lr_schedule import LRSchedule


def test_no_flags_is_the_constant_lr():
    schedule = LRSchedule(3e-3, total_steps=7)
    assert [schedule(k) for k in range(1, 8)] == [3e-3] * 7


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_warmup_then_decay_to_min_lr(decay):
    lr, min_lr, warmup, total = 1.0, 0.1, 3, 11
    schedule = LRSchedule(lr, total, warmup, decay, min_lr)
    assert [schedule(k) for k in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    for k in range(warmup, total + 1):
        progress = (k - warmup) / (total - warmup)
        factor = 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1 - progress
        assert schedule(k) == pytest.approx(min_lr + (lr - min_lr) * factor)
    assert schedule(total) == pytest.approx(min_lr)
    assert schedule(total + 5) == pytest.approx(min_lr)   # a run extended past --steps stays at the floor


def test_apply_sets_every_group_and_the_state_round_trips():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=5.0)
    schedule = LRSchedule(2.0, 10, warmup_steps=4)
    assert schedule.apply(opt, 2) == 1.0
    assert [g["lr"] for g in opt.param_groups] == [1.0, 1.0]
    resumed = LRSchedule(2.0, 10, warmup_steps=4)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.last_step == 2 and resumed(3) == schedule(3)


@pytest.mark.parametrize("kwargs,flag", [
    (dict(lr=0.0), "--lr"), (dict(decay="exp"), "--lr-decay"), (dict(warmup_steps=-1), "--warmup-steps"),
    (dict(warmup_steps=11), "--warmup-steps"), (dict(min_lr=2.0), "--min-lr"),
])
def test_bad_flags_name_themselves(kwargs, flag):
    args = dict(lr=1.0, total_steps=10, warmup_steps=0, decay="cosine", min_lr=0.0) | kwargs
    with pytest.raises(ValueError, match=flag):
        LRSchedule(**args)
