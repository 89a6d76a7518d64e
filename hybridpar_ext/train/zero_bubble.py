"""``--schedule zero-bubble`` within 1F1B's activation memory: ZB-H1 with each rank's held-back
W's chosen from what its stage measures, before the first step.

The paper's ZB-H1 lets rank ``r`` hold back ``r`` weight-gradient backwards (W), each keeping
its deferred layers' inputs and output gradients alive; where a pending W keeps about what a
microbatch's forward kept, or the last stage keeps more (the loss's logits), that peaks above
1F1B's busiest rank. So every stage probes one microbatch of the run's shape alone
(:func:`~hybridpar_ext.parallel.activation_memory.measure_microbatch`: no pipeline message, the
TP ranks of a stage together), the figures are gathered, and every rank computes the same
holds: the most W's each rank can hold back (:func:`~hybridpar_ext.parallel.schedules.zero_bubble_holds`)
with its modelled peak within 1F1B's.

The model, per rank ``r`` with ``a`` bytes kept per live microbatch and ``w`` per pending W
(:func:`~hybridpar_ext.parallel.schedules.simulate`'s memory): 1F1B peaks in a full backward
with the other live microbatches' activations kept, its simulated peak less one ``a`` plus the
probe's peak through a full backward; a ZB-H1 list peaks in a B the same way with the probe's
peak through a split one. 1F1B's busiest rank is the budget.

The probe changes nothing the run computes: it draws its inputs from its own generator, runs
inside ``torch.random.fork_rng``, and the gradients it leaves are dropped."""

from dataclasses import astuple, dataclass
from typing import List

import torch
import torch.distributed as dist


@dataclass
class ZeroBubblePlan:
    """The schedule the trainer runs and what it was chosen from."""

    lists: list            # every rank's actions (zero_bubble_h1_schedule with `holds`)
    holds: List[int]       # W's held back per pipeline rank
    paper_excess: float    # the paper's holds' modelled peak over 1F1B's (0.05: 5% above), <= 0 if within
    bubble: float          # simulated idle fraction with these holds (F = B = W)
    one_f_one_b_bubble: float

    def describe(self) -> str:
        paper = list(range(len(self.holds)))
        held = ",".join(map(str, self.holds))
        if self.holds == paper:
            why = "the paper's, within 1F1B's peak"
        else:
            why = (f"the paper's {','.join(map(str, paper))} would pass 1F1B's peak by "
                   f"{100 * self.paper_excess:.1f}%")
        return (f"zero bubble: W held back per rank {held} ({why}); simulated bubble {self.bubble:.2f} vs "
                f"1F1B {self.one_f_one_b_bubble:.2f}")


def probe_stage(stage, microbatch: int, seq: int, vocab_size: int, seed: int):
    """This stage's :class:`MicrobatchMemory` for a microbatch of `microbatch` rows of `seq`
    tokens; every TP rank of the stage draws the same inputs, so their collectives match."""
    from ..parallel.activation_memory import measure_microbatch

    like = next(stage.parameters())
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (microbatch, seq), generator=gen)
    targets = torch.randint(0, vocab_size, (microbatch, seq), generator=gen)
    activation = torch.randn(stage.activation_shape(microbatch, seq), generator=gen)
    inputs = tokens if stage.is_first else activation
    grad_output = None
    if not stage.is_last:
        grad_output = torch.randn(stage.activation_shape(microbatch, seq), generator=gen)
        grad_output = grad_output.to(device=like.device, dtype=like.dtype)
    inputs = inputs.to(like.device) if stage.is_first else inputs.to(device=like.device, dtype=like.dtype)
    devices = [like.device] if like.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        # The first stage holds back no W, so its backwards run fused (1F1B's): no split run.
        measured = measure_microbatch(stage, inputs, targets.to(like.device), grad_output, split=not stage.is_first)
    for param in stage.parameters():   # the run starts from no gradients, as without the probe
        param.grad = None
    return measured


def choose_holds(measured, p: int, m: int) -> ZeroBubblePlan:
    """The plan from every pipeline rank's :class:`MicrobatchMemory` (a pure function: every
    rank computes the same)."""
    from ..parallel.schedules import build_schedule, simulate, zero_bubble_h1_schedule, zero_bubble_holds

    memory = [(float(x.kept), float(x.pending_w)) for x in measured]
    one_f_one_b = simulate(build_schedule("1f1b", p, 1, m), p, 1, m, memory=memory)
    budget = max(one_f_one_b.peak_memory[r] - memory[r][0] + measured[r].fused_peak for r in range(p))
    # A B runs with what the simulator counts before it, less its own microbatch, plus the
    # probe's split backward (rank 0's B's are fused with their W's: 1F1B's full backward).
    extra = [(x.fused_peak if r == 0 else x.split_peak) - x.kept for r, x in enumerate(measured)]
    holds = zero_bubble_holds(p, m, [budget - e for e in extra], memory)
    paper = simulate(build_schedule("zero-bubble", p, 1, m), p, 1, m, memory=memory)
    paper_peak = max(paper.peak_memory[r] + extra[r] for r in range(p))
    lists = zero_bubble_h1_schedule(p, m, holds)
    return ZeroBubblePlan(lists, holds, paper_peak / budget - 1 if budget > 0 else 0.0,
                          simulate(lists, p, 1, m).bubble, one_f_one_b.bubble)


def plan_zero_bubble(stage, mesh, microbatches: int, microbatch: int, seq: int, vocab_size: int,
                     seed: int) -> ZeroBubblePlan:
    """Probe this stage, gather every stage's figures over the world (the largest over a
    stage's DP and TP ranks, so every rank of the run holds the same), choose the holds.
    A collective over the whole world; no pipeline message."""
    from ..parallel.activation_memory import MicrobatchMemory

    mine = probe_stage(stage, microbatch, seq, vocab_size, seed)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (mesh.pp_rank, astuple(mine)))
    per_stage = {}
    for r, figures in everyone:
        per_stage[r] = tuple(map(max, zip(per_stage.get(r, figures), figures)))
    measured = [MicrobatchMemory(*per_stage[r]) for r in range(mesh.pp)]
    return choose_holds(measured, mesh.pp, microbatches)
