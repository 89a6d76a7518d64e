"""The learning-rate schedule: linear warm-up, then cosine or linear decay to a floor, or none.

A small stateful object rather than a torch ``LRScheduler``: the LR of step ``k`` is a pure
function of ``k`` and the flags, so a resumed run (or one resumed under another layout) sets
exactly the LR the uninterrupted run would have; the state it saves is only the last step it
applied, to check against the run's own step when a checkpoint is loaded.
"""

import math

DECAYS = ("none", "cosine", "linear")


class LRSchedule:
    """``lr(step)`` for steps ``1..total``: ``lr * step / warmup`` during the first ``warmup``
    steps, then ``lr`` decaying (``cosine`` or ``linear``) to ``min_lr`` at step ``total``, or
    staying at ``lr`` (``none``). With no warm-up and no decay it is the constant ``lr``."""

    def __init__(self, lr: float, total_steps: int, warmup_steps: int = 0, decay: str = "none",
                 min_lr: float = 0.0):
        check_schedule(lr, total_steps, warmup_steps, decay, min_lr)
        self.lr, self.total, self.warmup, self.decay, self.min_lr = lr, total_steps, warmup_steps, decay, min_lr
        self.last_step = 0

    def __call__(self, step: int) -> float:
        if step <= self.warmup:
            return self.lr * step / self.warmup
        if self.decay == "none":
            return self.lr
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        if self.decay == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = 1.0 - progress
        return self.min_lr + (self.lr - self.min_lr) * factor

    def apply(self, optimizer, step: int) -> float:
        """Set step `step`'s LR on every parameter group of `optimizer`; returns it."""
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.last_step = step
        return lr

    def state_dict(self) -> dict:
        return {"lr": self.lr, "total_steps": self.total, "warmup_steps": self.warmup,
                "decay": self.decay, "min_lr": self.min_lr, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        """Restores the step reached. The schedule's shape comes from this run's flags (a resumed
        run may extend --steps or change the decay on purpose); only the step is carried over."""
        self.last_step = int(state["last_step"])


def check_schedule(lr, total_steps, warmup_steps, decay, min_lr) -> None:
    """ValueError naming the flag at fault (a pure function of the flags: same on every rank)."""
    if not lr > 0:
        raise ValueError(f"--lr must be positive, got {lr}")
    if decay not in DECAYS:
        raise ValueError(f"--lr-decay must be one of {', '.join(DECAYS)}, got {decay!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"--warmup-steps must be a non-negative int, got {warmup_steps!r}")
    if warmup_steps > total_steps:
        raise ValueError(f"--warmup-steps ({warmup_steps}) must not exceed --steps ({total_steps})")
    if not 0 <= min_lr <= lr:
        raise ValueError(f"--min-lr must be in [0, --lr] = [0, {lr}], got {min_lr}")
