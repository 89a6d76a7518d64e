"""Pipeline parallelism: one executor for every schedule of :mod:`.schedules`.

A schedule is data: for each rank, the list of forwards and backwards of (model chunk,
microbatch) it runs, in order (:func:`~hybridpar_ext.parallel.schedules.build_schedule`: 1F1B,
interleaved 1F1B, ZB-H1). :class:`PipelineSchedule` runs this rank's list. The sends and
receives are implied by it: a forward of virtual stage ``s > 0`` takes its input from stage
``s - 1``, a backward of ``s < p v - 1`` its output gradient from ``s + 1``. All of them are
posted with ``torch.distributed.batch_isend_irecv`` (non-blocking; the receives one action
ahead, so they land while this rank computes) and only the receive an action needs is waited
for, so no order of actions can deadlock that the simulator
(:func:`~hybridpar_ext.parallel.schedules.simulate`) accepts; and it checks the schedule
before the first step. Messages between two ranks are matched in the order they are posted
(NCCL ignores tags): every rank knows every rank's list, so each posts its receives from a
peer in the order that peer sends.

The measured bubble of a step is the fraction of it this rank did not compute, the step
ending for every rank when the last one is done (one one-element all-reduce over the pipeline
marks it): wall time around each action on a CPU, CUDA events on a GPU (the host runs ahead of
the device there). It is reported with the simulator's prediction for stages of equal cost.
"""

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from .schedules import (Action, build_schedule, check_schedule, chunk_layers, rank_and_chunk, simulate,
                        virtual_stage)
from .weight_grad import WeightGradStore


def one_f_one_b(stage: int, num_stages: int, num_microbatches: int) -> List[tuple]:
    """The actions of `stage` under 1F1B: ``("F", i)`` and ``("B", i)`` (the full backward) in
    the order it runs them."""
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage must be in [0, {num_stages}), got {stage}")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be positive, got {num_microbatches}")
    return [("F" if a.op == "F" else "B", a.microbatch)
            for a in build_schedule("1f1b", num_stages, 1, num_microbatches)[stage]]


def ideal_bubble(num_stages: int, num_microbatches: int, virtual_stages: int = 1) -> float:
    """Idle fraction of (interleaved) 1F1B on stages of equal cost: ``(p-1) / (v m + p-1)``."""
    return (num_stages - 1) / (virtual_stages * num_microbatches + num_stages - 1)


class ModelChunks(torch.nn.ModuleList):
    """The ``v`` model chunks one rank holds under interleaving (chunk ``k`` is virtual stage
    ``k p + rank``), as one module for what works on all of a rank's parameters: the
    data-parallel reducer, the optimizer, the gradient sums a stage owes after backward."""

    @property
    def is_first(self) -> bool:
        return bool(self[0].is_first)

    @property
    def is_last(self) -> bool:
        return bool(self[-1].is_last)

    def synced_after_reduction(self, param) -> bool:
        return any(getattr(chunk, "synced_after_reduction", lambda p: False)(param) for chunk in self)

    def finish_grads(self) -> None:
        for chunk in self:
            if hasattr(chunk, "finish_grads"):
                chunk.finish_grads()


def build_chunks(build: Callable, num_layers: int, p: int, v: int, rank: int) -> ModelChunks:
    """Rank `rank`'s `v` chunks of a model of `num_layers` layers on `p` pipeline ranks:
    ``build(layer_ids, holds_first, holds_last)`` makes one (a GPT's, for instance
    ``lambda ids, first, last: build_stage(model, mesh, ids, first, last)``); the layers are
    dealt by :func:`~hybridpar_ext.parallel.schedules.chunk_layers`."""
    last = p * v - 1
    return ModelChunks([build(list(layers), virtual_stage(rank, k, p) == 0, virtual_stage(rank, k, p) == last)
                        for k, layers in enumerate(chunk_layers(num_layers, p, v, rank))])


@dataclass
class StepStats:
    loss: float            # sum over the microbatches of loss / m (the last stage; else 0.0)
    busy_s: float          # forward and backward compute on this rank
    wall_s: float          # the whole schedule on this rank
    predicted_bubble: Optional[float] = None   # the simulator's, this rank, stages of equal cost

    @property
    def bubble(self) -> float:
        """Fraction of the schedule this rank spent waiting."""
        return 1.0 - self.busy_s / self.wall_s if self.wall_s > 0 else 0.0


class _Timer:
    """Busy time of the actions and wall time of a step: events on a CUDA device (the host only
    queues work there), the host's clock otherwise."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans = []
        self.start = self._mark()

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin(self):
        return self._mark()

    def end(self, begun) -> None:
        self.spans.append((begun, self._mark()))

    def finish(self):
        """(busy seconds, wall seconds)."""
        stop = self._mark()
        if self.cuda:
            stop.synchronize()
            busy = sum(a.elapsed_time(b) for a, b in self.spans) / 1e3
            return busy, self.start.elapsed_time(stop) / 1e3
        return sum(b - a for a, b in self.spans), stop - self.start


class PipelineSchedule:
    """Runs forward and backward of `m` microbatches through the stages of a pipeline, in the
    order of a schedule of :mod:`.schedules`.

    ``module`` is this rank's stage (a :class:`~hybridpar_ext.parallel.GPTStage` or anything with ``is_first``,
    ``is_last``, ``forward``, ``loss`` and ``activation_shape``), or with ``v`` virtual stages per
    rank the list of its ``v`` model chunks, chunk ``k`` being virtual stage ``k p + rank``.
    A stage returns a tensor (the last: what ``loss`` takes) or a tuple of tensors of one shape,
    which travel stacked (``activation_shape``) and reach the next stage as a tuple again.
    ``pp_group`` links the ranks. ``schedule``: ``"1f1b"``, ``"interleaved"``, ``"zero-bubble"``
    (its W actions run the weight gradients that layers calling
    :func:`~hybridpar_ext.parallel.weight_grad.deferrable_linear` deferred; other parameters get
    theirs in B; a microbatch whose backward this rank runs as one BW, as ZB-H1's rank 0 does
    all of them, defers nothing), or every rank's list of :class:`~hybridpar_ext.parallel.schedules.Action`
    (the same on every rank; checked by the simulator, whose :class:`ScheduleError` is a
    ValueError). Every backward but the last of each chunk runs inside ``no_sync`` (gradient
    accumulation with one data-parallel reduction per step, each bucket starting once its
    chunks are done). Constructing one is a collective over ``pp_group``.
    """

    def __init__(self, module, pp_group, num_microbatches: int, no_sync: Callable = None,
                 schedule: Union[str, Sequence[Sequence[Action]]] = "1f1b"):
        chunks = list(module) if isinstance(module, (list, tuple, torch.nn.ModuleList)) else [module]
        self.module, self.chunks, self.group, self.m = module, chunks, pp_group, num_microbatches
        self.rank, self.p = dist.get_rank(pp_group), dist.get_world_size(pp_group)
        self.v = len(chunks)
        if isinstance(schedule, str):
            check_schedule(schedule, self.p, self.v, num_microbatches)
            lists = build_schedule(schedule, self.p, self.v, num_microbatches)
        else:   # every rank's list, given: the same on every rank
            lists = [list(actions) for actions in schedule]
        self.kind = schedule if isinstance(schedule, str) else "custom"
        # The (chunk, microbatch) whose backward this rank splits into B and a later W: only
        # their forwards record, so that only they leave weight-gradient work in the store. A
        # BW (1F1B's, or ZB-H1's B directly followed by its W, fused by the schedule) runs the
        # layers' ordinary fused backward, which frees each output gradient as soon as it is used.
        self.split = {(a.chunk, a.microbatch) for a in lists[self.rank] if a.op == "B"}
        self.store = WeightGradStore() if self.split else None
        last = self.p * self.v - 1
        for k, chunk in enumerate(chunks):
            s = virtual_stage(self.rank, k, self.p)
            if bool(chunk.is_first) != (s == 0) or bool(chunk.is_last) != (s == last):
                raise ValueError(f"PipelineSchedule: chunk {k} of rank {self.rank} is virtual stage {s} of "
                                 f"{last + 1}, so is_first must be {s == 0} and is_last {s == last}; got "
                                 f"{bool(chunk.is_first)} and {bool(chunk.is_last)}")
        self.no_sync = no_sync
        # Checked before it runs: every piece of work once, nothing that can stall.
        self.predicted = simulate(lists, self.p, self.v, num_microbatches)
        if no_sync is not None:   # every rank checks every list, so all refuse alike
            for r, actions in enumerate(lists):
                for k in range(self.v):
                    ops = [a for a in actions if a.chunk == k and a.op != "F"]
                    last_b = max((j for j, a in enumerate(ops) if a.op in ("B", "BW")), default=-1)
                    if last_b >= 0 and ops[last_b].op == "BW" and any(a.op == "W" for a in ops[last_b:]):
                        raise ValueError(
                            f"PipelineSchedule: rank {r} runs {ops[last_b]!r} as chunk {k}'s last input backward "
                            "with W work of that chunk after it; the data-parallel reduction would then see "
                            "those weights' gradients twice: split that backward (B, W) or run it earlier")
        self.actions: List[Action] = lists[self.rank]
        # The last backward work of each chunk runs with the data-parallel reduction on, so a
        # bucket starts once its parameters are done: the last B or BW (the gradients not
        # deferred) and the last W or BW (the deferred ones); one action when nothing is split.
        self.syncs = {max(j for j, a in enumerate(self.actions) if a.op in ops and a.chunk == k)
                      for k in range(self.v) for ops in (("B", "BW"), ("W", "BW"))}
        # What each peer sends this rank, in the order it sends it.
        self.incoming = {r: [] for r in range(self.p) if r != self.rank}
        for r, actions in enumerate(lists):
            for a in actions:
                s = virtual_stage(r, a.chunk, self.p)
                if a.op == "F" and s < last and rank_and_chunk(s + 1, self.p)[0] == self.rank:
                    self.incoming[r].append(("act", s + 1, a.microbatch))
                elif a.op in ("B", "BW") and s > 0 and rank_and_chunk(s - 1, self.p)[0] == self.rank:
                    self.incoming[r].append(("grad", s - 1, a.microbatch))
        if self.p > 1:
            # Every rank of the group meets once before the first batched point-to-point, which
            # NCCL asks of a group's first operation (a step's first batch has only some ranks).
            like = next(chunks[0].parameters())
            dist.all_reduce(torch.zeros(1, device=like.device, dtype=like.dtype), group=pp_group)

    # --------------------------------------------------------------- point to point
    def _peer(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank)

    def _needs(self, action: Action):
        """(message, sending rank) that `action` waits for, or None."""
        s = virtual_stage(self.rank, action.chunk, self.p)
        if action.op == "F" and s > 0:
            return ("act", s, action.microbatch), rank_and_chunk(s - 1, self.p)[0]
        if action.op in ("B", "BW") and s < self.p * self.v - 1:
            return ("grad", s, action.microbatch), rank_and_chunk(s + 1, self.p)[0]
        return None

    def _post_receives(self, action: Optional[Action], ops: list, shape, like: torch.Tensor) -> None:
        """Add to `ops` the receives up to the one `action` needs, in its sender's order."""
        need = self._needs(action) if action is not None else None
        if need is None or need[0] in self.arrived:
            return
        key, src = need
        while key not in self.arrived:
            message = self.incoming[src][self.posted[src]]
            self.posted[src] += 1
            buf = torch.empty(shape, dtype=like.dtype, device=like.device)
            self.arrived[message] = [buf, None]
            ops.append((message, dist.P2POp(dist.irecv, buf, self._peer(src), self.group)))

    def _exchange(self, ops: list) -> None:
        if not ops:
            return
        works = dist.batch_isend_irecv([op for _, op in ops])
        for (message, op), work in zip(ops, works):
            if message is None:
                self.sends.append((work, op.tensor))
            else:
                self.arrived[message][1] = work

    def _take(self, action: Action) -> Optional[torch.Tensor]:
        need = self._needs(action)
        if need is None:
            return None
        buf, work = self.arrived.pop(need[0])
        work.wait()
        return buf

    def _reduction(self, j: int):
        """Accumulate only, unless action `j` is the last of its chunk's gradient work."""
        if j in self.syncs or self.no_sync is None:
            return contextlib.nullcontext()
        return self.no_sync()

    # --------------------------------------------------------------- the step
    def step(self, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> StepStats:
        """One step: `inputs`/`targets` are the m microbatches (only the first stage reads the
        inputs and only the last the targets). Leaves the accumulated gradients in
        ``param.grad``; each microbatch's loss is scaled by 1/m."""
        m, p, last = self.m, self.p, self.p * self.v - 1
        if len(inputs) != m or len(targets) != m:
            raise ValueError(f"PipelineSchedule.step: expected {m} microbatches of inputs and targets, "
                             f"got {len(inputs)} and {len(targets)}")
        shape = self.chunks[0].activation_shape(targets[0].shape[0], targets[0].shape[1])
        like = next(self.chunks[0].parameters())
        self.posted = {r: 0 for r in self.incoming}
        self.arrived, self.sends = {}, []
        stage_inputs, outputs = {}, {}
        losses = []
        timer = _Timer(like.device)
        ops = []
        if self.actions:
            self._post_receives(self.actions[0], ops, shape, like)
        for j, action in enumerate(self.actions):
            # Post the sends of the previous action with the receives of the next one.
            nxt = self.actions[j + 1] if j + 1 < len(self.actions) else None
            self._post_receives(nxt, ops, shape, like)
            self._exchange(ops)
            ops = []
            received = self._take(action)
            chunk, i = self.chunks[action.chunk], action.microbatch
            s = virtual_stage(self.rank, action.chunk, p)
            begun = timer.begin()
            if action.op == "F":
                if s == 0:
                    stage_in = inputs[i]
                else:
                    stage_in = received.requires_grad_()
                    stage_inputs[(action.chunk, i)] = stage_in
                split = (action.chunk, i) in self.split
                with self.store.recording((action.chunk, i)) if split else contextlib.nullcontext():
                    out = chunk(stage_in if s == 0 else tuple(stage_in.unbind(0)))
                if s == last:
                    out = chunk.loss(out, targets[i]) / m
                    losses.append(out.detach())
                elif isinstance(out, (tuple, list)):
                    out = torch.stack(out)
                outputs[(action.chunk, i)] = out
                timer.end(begun)
                if s < last:
                    peer = rank_and_chunk(s + 1, p)[0]
                    ops.append((None, dist.P2POp(dist.isend, out.detach(), self._peer(peer), self.group)))
            elif action.op == "W":   # the weight gradients B left in the store
                with self._reduction(j):
                    self.store.run((action.chunk, i))
                timer.end(begun)
            else:   # BW, the full backward, or B, the input gradient (and any weight not deferred)
                out = outputs.pop((action.chunk, i))
                with self._reduction(j):
                    torch.autograd.backward(out, received)
                timer.end(begun)
                if s > 0:
                    grad = stage_inputs.pop((action.chunk, i)).grad.contiguous()
                    peer = rank_and_chunk(s - 1, p)[0]
                    ops.append((None, dist.P2POp(dist.isend, grad, self._peer(peer), self.group)))
        self._exchange(ops)
        for work, _ in self.sends:
            work.wait()
        self.sends = []
        if p > 1:
            # The step ends when the pipeline has drained, for every rank: a rank done early
            # idles until then (this is the bubble the formulas and the simulator count).
            dist.all_reduce(torch.zeros(1, device=like.device), group=self.group)
        busy, wall = timer.finish()
        loss = torch.stack(losses).sum().item() if losses else 0.0
        return StepStats(loss, busy, wall, self.predicted.bubbles[self.rank])
