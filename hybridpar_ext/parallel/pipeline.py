"""Pipeline parallelism: the 1F1B schedule over point-to-point sends.

Stage ``s`` of ``p`` runs ``min(p - s - 1, m)`` warm-up forwards, then alternates one forward
and one backward, then drains the remaining backwards (Narayanan et al., 2021). At most
``p - s`` microbatches' activations are alive on stage ``s`` at once, instead of ``m`` with
all-forward-then-all-backward. The order is a pure function of ``(s, p, m)``; sends are
non-blocking and receives blocking, which cannot deadlock for this order.

The idle fraction of a step on ``p`` stages of equal cost is ``(p - 1) / (m + p - 1)``;
:meth:`PipelineSchedule.step` measures it.
"""

import time
from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch
import torch.distributed as dist


def one_f_one_b(stage: int, num_stages: int, num_microbatches: int) -> List[tuple]:
    """The actions of `stage`: ``("F", i)`` and ``("B", i)`` in the order it runs them."""
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage must be in [0, {num_stages}), got {stage}")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be positive, got {num_microbatches}")
    warmup = min(num_stages - stage - 1, num_microbatches)
    actions = [("F", i) for i in range(warmup)]
    for i in range(num_microbatches - warmup):
        actions += [("F", warmup + i), ("B", i)]
    actions += [("B", i) for i in range(num_microbatches - warmup, num_microbatches)]
    return actions


def ideal_bubble(num_stages: int, num_microbatches: int) -> float:
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


@dataclass
class StepStats:
    loss: float            # sum over the microbatches of loss / m (the last stage; else 0.0)
    busy_s: float          # forward and backward compute on this rank
    wall_s: float          # the whole schedule on this rank

    @property
    def bubble(self) -> float:
        """Fraction of the schedule this rank spent waiting."""
        return 1.0 - self.busy_s / self.wall_s if self.wall_s > 0 else 0.0


class PipelineSchedule:
    """Runs forward and backward of `m` microbatches through the stages of a pipeline.

    ``module`` is this rank's stage (a :class:`ParallelGPT` or anything with ``is_first``,
    ``is_last``, ``forward``, ``loss`` and ``activation_shape``); ``pp_group`` links the stages.
    Every backward but the last runs inside ``no_sync`` (gradient accumulation with one
    data-parallel reduction per step).
    """

    def __init__(self, module, pp_group, num_microbatches: int, no_sync: Callable = None):
        self.module, self.group, self.m = module, pp_group, num_microbatches
        self.stage, self.num_stages = dist.get_rank(pp_group), dist.get_world_size(pp_group)
        if num_microbatches < self.num_stages:
            raise ValueError(f"PipelineSchedule: num_microbatches ({num_microbatches}) must be at least "
                             f"the number of stages ({self.num_stages})")
        self.no_sync = no_sync
        self.actions = one_f_one_b(self.stage, self.num_stages, num_microbatches)
        self.prev = dist.get_global_rank(pp_group, self.stage - 1) if self.stage > 0 else None
        self.next = dist.get_global_rank(pp_group, self.stage + 1) if self.stage < self.num_stages - 1 else None

    def step(self, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> StepStats:
        """One step: `inputs`/`targets` are the m microbatches (only the first stage reads the
        inputs and only the last the targets). Leaves the accumulated gradients in
        ``param.grad``; each microbatch's loss is scaled by 1/m."""
        mod, m = self.module, self.m
        if len(inputs) != m or len(targets) != m:
            raise ValueError(f"PipelineSchedule.step: expected {m} microbatches of inputs and targets, "
                             f"got {len(inputs)} and {len(targets)}")
        shape = mod.activation_shape(targets[0].shape[0], targets[0].shape[1])
        param = next(mod.parameters())
        received, outputs, sends = {}, {}, []
        loss_sum, busy = 0.0, 0.0
        start = time.perf_counter()
        backwards_left = sum(1 for a in self.actions if a[0] == "B")
        for kind, i in self.actions:
            if kind == "F":
                if mod.is_first:
                    stage_in = inputs[i]
                else:
                    buf = torch.empty(shape, dtype=param.dtype, device=param.device)
                    dist.recv(buf, src=self.prev, group=self.group)
                    stage_in = buf.requires_grad_()
                    received[i] = stage_in
                t0 = time.perf_counter()
                out = mod(stage_in if mod.is_first else (stage_in[0], stage_in[1]))
                if mod.is_last:
                    out = mod.loss(out, targets[i]) / m
                    loss_sum += out.item()
                else:
                    out = torch.stack(out)
                busy += time.perf_counter() - t0
                outputs[i] = out
                if not mod.is_last:
                    sends.append(dist.isend(out.detach(), dst=self.next, group=self.group))
            else:
                out = outputs.pop(i)
                grad = None
                if not mod.is_last:
                    grad = torch.empty_like(out)
                    dist.recv(grad, src=self.next, group=self.group)
                backwards_left -= 1
                t0 = time.perf_counter()
                if backwards_left > 0 and self.no_sync is not None:
                    with self.no_sync():
                        out.backward(grad)
                else:
                    out.backward(grad)
                busy += time.perf_counter() - t0
                if not mod.is_first:
                    sends.append(dist.isend(received.pop(i).grad, dst=self.prev, group=self.group))
        for work in sends:
            work.wait()
        return StepStats(loss_sum, busy, time.perf_counter() - start)
