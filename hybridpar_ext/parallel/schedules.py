"""Pipeline schedules as data, and a simulator that checks one before it runs.

A schedule gives each of the ``p`` pipeline ranks the list of :class:`Action` it runs, in
order: the forward ``F``, the input-gradient backward ``B``, the weight-gradient backward ``W``,
or the fused full backward ``BW`` of one microbatch through one of its model chunks. Rank ``r``
holds ``v`` chunks, ``r, r + p, ..., r + (v - 1) p`` of the ``p * v`` virtual stages (Megatron's
interleaving; ``v = 1`` is the plain pipeline). Sends and receives are implied by the actions:
a forward of virtual stage ``s > 0`` receives its input from stage ``s - 1`` and a backward of
stage ``s < p v - 1`` its output gradient from ``s + 1``; the executor
(:class:`~hybridpar_ext.parallel.pipeline.PipelineSchedule`) posts them batched and
non-blocking, so only a cycle in these dependencies could stall it, and :func:`simulate` proves
a schedule free of one.

The schedules, each a pure function of ``(p, v, m)``:

``"1f1b"`` (Narayanan et al., 2021)
    ``p - r - 1`` warm-up forwards, then one forward and one full backward alternately, then
    the remaining backwards. Idle ``(p - 1) / (m + p - 1)`` of a step for stages of equal cost;
    at most ``p - r`` microbatches' activations alive on rank ``r``.
``"interleaved"`` (Megatron-LM's interleaved 1F1B)
    ``v`` chunks per rank, forwards in groups of ``p`` microbatches chunk after chunk; ``m`` must
    be a multiple of ``p``. Idle ``(p - 1) / (v m + p - 1)``, for ``p - 1`` more chunk
    activations alive on the first rank and ``v`` times the point-to-point messages.
``"zero-bubble"`` (ZB-H1, Qi et al., 2023)
    1F1B's order of forwards and input-gradient backwards, with each weight-gradient backward
    deferred, rank ``r`` by ``r`` steps, into the cool-down that 1F1B leaves idle. Idle
    ``(p - 1)(F + B - W)`` instead of ``(p - 1)(F + B + W)`` (about a third of 1F1B's for
    ``F = B = W``). Rank 0 holds back nothing: its B's, each directly followed by its W, are
    fused into full backwards, so it runs 1F1B's list and keeps 1F1B's peak. The later ranks
    keep ``p - r`` microbatches live and ``r`` W's pending; counting a pending W as a whole
    microbatch (the paper) that is ``p``, 1F1B's busiest rank, but a W keeps every deferred
    layer's input and output gradient, which may be more (:func:`simulate`'s `memory` model
    says by how much; :func:`zero_bubble_holds` picks the holds that fit a budget).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

SCHEDULES = ("1f1b", "interleaved", "zero-bubble")
OPS = ("F", "B", "W", "BW")


@dataclass(frozen=True)
class Action:
    """One computation of a rank: ``op`` ("F", "B", "W" or "BW") of `microbatch` through the
    rank's local model chunk `chunk` (virtual stage ``chunk * p + rank``)."""

    op: str
    chunk: int
    microbatch: int

    def __repr__(self) -> str:
        return f"{self.op}{self.microbatch}" + (f"@{self.chunk}" if self.chunk else "")


class ScheduleError(ValueError):
    """A schedule that misses, repeats or misorders work, or that cannot finish."""


def virtual_stage(rank: int, chunk: int, p: int) -> int:
    return chunk * p + rank


def rank_and_chunk(stage: int, p: int) -> Tuple[int, int]:
    """The rank holding virtual stage `stage`, and its local chunk index there."""
    return stage % p, stage // p


def chunk_layers(num_layers: int, p: int, v: int, rank: int) -> List[range]:
    """The layers of each of rank `rank`'s `v` model chunks: the ``p v`` virtual stages take
    consecutive runs of layers, as even as can be (the earlier ones one more when ``p v`` does
    not divide `num_layers`), and rank ``r`` holds virtual stages ``r, r + p, ...``."""
    for name, value in (("layers", num_layers), ("pipeline stages (p)", p), ("virtual stages (v)", v)):
        _positive_int(name, value)
    if not 0 <= rank < p:
        raise ValueError(f"rank must be in [0, {p}), got {rank}")
    stages = p * v
    if num_layers < stages:
        fits = num_layers // p
        hint = f"; try v <= {fits}" if fits >= 1 else ""
        raise ValueError(f"layers ({num_layers}) must be at least pipeline stages x virtual stages = "
                         f"{p} x {v} = {stages}{hint}")
    base, extra = divmod(num_layers, stages)
    out = []
    for chunk in range(v):
        s = virtual_stage(rank, chunk, p)
        start = s * base + min(s, extra)
        out.append(range(start, start + base + (1 if s < extra else 0)))
    return out


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_schedule(kind: str, p: int, v: int, m: int) -> None:
    """Raise ValueError naming the first of (kind, p, v, m) that no schedule can be built
    from, and what would work. A pure function: every rank reaches the same verdict."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    for name, value in (("pipeline stages (p)", p), ("virtual stages per rank (v)", v),
                        ("microbatches (m)", m)):
        _positive_int(name, value)
    if kind != "interleaved" and v != 1:
        raise ValueError(f"schedule {kind!r} runs one model chunk per rank: virtual stages (v) must be 1, "
                         f"got {v} (interleaving needs schedule 'interleaved')")
    if kind == "interleaved":
        if v < 2:
            raise ValueError(f"schedule 'interleaved' needs at least 2 virtual stages per rank (v), got {v} "
                             "(with v = 1 use '1f1b')")
        if p < 2:
            raise ValueError("schedule 'interleaved' needs at least 2 pipeline stages (p), got 1")
        if m % p:
            below, above = m // p * p, (m // p + 1) * p
            options = f"{below} or {above}" if below else f"{above}"
            raise ValueError(f"schedule 'interleaved': microbatches (m = {m}) must be a multiple of the "
                             f"pipeline stages (p = {p}); try m = {options}")


def one_f_one_b_schedule(p: int, m: int) -> List[List[Action]]:
    """1F1B with the full backward fused (``BW``): each rank's actions."""
    check_schedule("1f1b", p, 1, m)
    lists = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        actions = [Action("F", 0, i) for i in range(warmup)]
        for i in range(m - warmup):
            actions += [Action("F", 0, warmup + i), Action("BW", 0, i)]
        actions += [Action("BW", 0, i) for i in range(m - warmup, m)]
        lists.append(actions)
    return lists


def interleaved_schedule(p: int, v: int, m: int) -> List[List[Action]]:
    """Megatron-LM's interleaved 1F1B: the ``k``-th forward of every rank runs chunk
    ``(k // p) % v`` on microbatch ``(k // (p v)) p + k % p``; backwards run the chunks in reverse.
    Rank ``r`` warms up with ``2 (p - r - 1) + (v - 1) p`` forwards."""
    check_schedule("interleaved", p, v, m)
    total = v * m

    def forward(k):
        return Action("F", (k // p) % v, (k // (p * v)) * p + k % p)

    def backward(k):
        return Action("BW", v - 1 - (k // p) % v, (k // (p * v)) * p + k % p)

    lists = []
    for r in range(p):
        warmup = min(2 * (p - r - 1) + (v - 1) * p, total)
        actions = [forward(k) for k in range(warmup)]
        for k in range(total - warmup):
            actions += [forward(warmup + k), backward(k)]
        actions += [backward(k) for k in range(total - warmup, total)]
        lists.append(actions)
    return lists


def zero_bubble_h1_schedule(p: int, m: int, hold: Optional[Sequence[int]] = None,
                            fuse: bool = True) -> List[List[Action]]:
    """ZB-H1: 1F1B's forwards and input-gradient backwards (``B``); rank ``r`` holds back its
    first ``hold[r]`` weight-gradient backwards (``W``; the paper's ``r``, the default) and runs
    one W after each B from then on, the held-back ones at the end, where 1F1B's cool-down
    waits. Each W held back keeps what it needs alive (every deferred layer's input and output
    gradient) for longer; holding back fewer (:func:`zero_bubble_holds`) keeps less memory for a
    longer bubble, and ``hold[r] = 0`` gives rank ``r`` 1F1B's order, each backward split
    into its B and the W right after.

    With `fuse` (the default) rank 0's B's, each directly followed by its own W, become full
    backwards ``BW`` (:func:`fuse_adjacent_backwards`): its list is then 1F1B's; ``fuse=False``
    gives the lists as the paper draws them."""
    check_schedule("zero-bubble", p, 1, m)
    if hold is None:
        hold = list(range(p))
    elif len(hold) != p or any(isinstance(h, bool) or not isinstance(h, int) or not 0 <= h <= r
                               for r, h in enumerate(hold)):
        raise ValueError(f"hold must give each of the {p} ranks r a number of W's to hold back in [0, r], "
                         f"got {list(hold)!r}")
    lists = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        actions = [Action("F", 0, i) for i in range(warmup)]
        next_w = 0
        for i in range(m):
            if warmup + i < m:
                actions.append(Action("F", 0, warmup + i))
            actions.append(Action("B", 0, i))
            if i >= hold[r]:
                actions.append(Action("W", 0, next_w))
                next_w += 1
        actions += [Action("W", 0, i) for i in range(next_w, m)]
        lists.append(actions)
    return fuse_adjacent_backwards(lists) if fuse else lists


def fuse_adjacent_backwards(lists: Sequence[Sequence[Action]]) -> List[List[Action]]:
    """Each rank's list with every ``B`` of the first virtual stage (rank 0's chunk 0) that is
    directly followed by the ``W`` of the same microbatch merged into one full backward ``BW``.
    Nothing runs between the two and the first stage sends no input gradient, so the time is
    the same; the memory is not: a split backward keeps what W needs (each deferred layer's
    input and output gradient) from B until W, while the fused one frees each output gradient
    as soon as it is used, as 1F1B does. Elsewhere a fused backward would send its input
    gradient only after the weight gradients, a W later, and the next stage down may be
    waiting for it: those stay split."""
    fused = []
    for r, actions in enumerate(lists):
        out: List[Action] = []
        for a in actions:
            if r == 0 and a.chunk == 0 and a.op == "W" and out and out[-1] == Action("B", 0, a.microbatch):
                out[-1] = Action("BW", 0, a.microbatch)
            else:
                out.append(a)
        fused.append(out)
    return fused


def build_schedule(kind: str, p: int, v: int, m: int) -> List[List[Action]]:
    """Every rank's actions for schedule `kind` (one of :data:`SCHEDULES`)."""
    check_schedule(kind, p, v, m)
    if kind == "1f1b":
        return one_f_one_b_schedule(p, m)
    if kind == "interleaved":
        return interleaved_schedule(p, v, m)
    return zero_bubble_h1_schedule(p, m)


def formula_bubble(kind: str, p: int, v: int, m: int, f: float = 1.0, b: float = 1.0,
                   w: float = 1.0) -> float:
    """The published idle fraction of a step, for stages of equal cost with forward, input
    backward and weight backward costs ``f``, ``b``, ``w`` per microbatch and stage (a chunk
    costs ``1/v`` of them): 1F1B ``(p-1)(f+b+w)`` idle to ``m (f+b+w)`` busy, interleaved ``v``
    times less idle, ZB-H1 ``(p-1)(f+b-w)`` idle. The ZB-H1 figure holds where the paper puts
    it, ``m >= p`` and ``w <= min(f, b)``; elsewhere :func:`simulate` is the one to ask."""
    check_schedule(kind, p, v, m)
    busy = m * (f + b + w)
    if kind == "1f1b":
        idle = (p - 1) * (f + b + w)
    elif kind == "interleaved":
        idle = (p - 1) * (f + b + w) / v
    else:
        idle = (p - 1) * max(f + b - w, 0.0)
    return idle / (idle + busy)


@dataclass
class Simulation:
    """What a schedule implies for given costs: per rank, the time computing, the idle fraction
    of the step (``1 - busy / makespan``, all ranks starting together) and the most
    chunk-microbatches whose activations are alive at once (forward done, weight gradient
    not yet), and the peak of the memory model (:func:`simulate`'s `memory`); and each
    action's start time."""

    makespan: float
    busy: List[float]
    bubbles: List[float]
    peak_activations: List[int]
    starts: List[List[float]]
    peak_memory: List[float]

    @property
    def bubble(self) -> float:
        """The idle fraction averaged over the ranks."""
        return sum(self.bubbles) / len(self.bubbles)


def _dependencies(action: Action, rank: int, p: int, v: int):
    """The (virtual stage, op kinds, microbatch) that must be done before `action` starts; the
    ops listed are alternatives (a backward's output gradient comes from B or BW)."""
    s, i, last = virtual_stage(rank, action.chunk, p), action.microbatch, p * v - 1
    if action.op == "F":
        return [(s - 1, ("F",), i)] if s > 0 else []
    if action.op in ("B", "BW"):
        deps = [(s, ("F",), i)]
        return deps + ([(s + 1, ("B", "BW"), i)] if s < last else [])
    return [(s, ("B",), i)]   # W after this stage's B


def check_coverage(lists: Sequence[Sequence[Action]], p: int, v: int, m: int) -> None:
    """Every microbatch's F once per chunk, and either one BW or one B and one W; nothing else."""
    if len(lists) != p:
        raise ScheduleError(f"expected the action lists of {p} ranks, got {len(lists)}")
    for r, actions in enumerate(lists):
        seen: Dict[Tuple[str, int, int], int] = {}
        for a in actions:
            if a.op not in OPS:
                raise ScheduleError(f"rank {r}: unknown op {a.op!r} (expected one of {', '.join(OPS)})")
            if not (0 <= a.chunk < v and 0 <= a.microbatch < m):
                raise ScheduleError(f"rank {r}: {a!r} is outside chunks [0, {v}) or microbatches [0, {m})")
            key = (a.op, a.chunk, a.microbatch)
            if key in seen:
                raise ScheduleError(f"rank {r}: {a!r} appears twice")
            seen[key] = 1
        for c in range(v):
            for i in range(m):
                has = {op for op in OPS if (op, c, i) in seen}
                if "F" not in has:
                    raise ScheduleError(f"rank {r}: no forward of microbatch {i} on chunk {c}")
                if has - {"F"} not in ({"BW"}, {"B", "W"}):
                    raise ScheduleError(f"rank {r}: microbatch {i} on chunk {c} has backward ops "
                                        f"{sorted(has - {'F'})}; expected BW, or B and W")


def simulate(lists: Sequence[Sequence[Action]], p: int, v: int, m: int, f: float = 1.0, b: float = 1.0,
             w: float = 1.0, comm: float = 0.0,
             memory: Optional[Sequence[Tuple[float, float]]] = None) -> Simulation:
    """Run the schedule on paper: each rank takes its actions in order, each as soon as the
    rank is free and its inputs have arrived (``comm`` after the producing action on another
    rank ends). ``f``, ``b``, ``w`` are a chunk's costs per microbatch (a BW costs ``b + w``).
    `memory`: per rank, what a chunk-microbatch keeps from its F to its backward (B or BW) and
    what its W work keeps from B to W (the layers' inputs and output gradients; a BW frees
    everything at once); ``(1, 1)`` per rank by default, the paper's count, where the peak is
    that of the live activations. Raises :class:`ScheduleError` if the lists miss or repeat
    work, or if the ranks would wait on each other forever (naming what each stuck rank waits
    for)."""
    check_coverage(lists, p, v, m)
    if memory is None:
        memory = [(1.0, 1.0)] * p
    elif len(memory) != p:
        raise ValueError(f"memory must give (activation, pending W) for each of the {p} ranks, got {len(memory)}")
    cost = {"F": f, "B": b, "W": w, "BW": b + w}
    done: Dict[Tuple[int, str, int], Tuple[float, int]] = {}   # (stage, op, mb) -> (end, rank)
    position = [0] * p
    free_at = [0.0] * p
    busy = [0.0] * p
    live, peak = [0] * p, [0] * p
    forwarded, pending, peak_memory = [0] * p, [0] * p, [0.0] * p   # F done but not B; B done but not W
    starts: List[List[float]] = [[] for _ in range(p)]
    remaining = sum(len(a) for a in lists)
    while remaining:
        progressed = False
        for r in range(p):
            while position[r] < len(lists[r]):
                action = lists[r][position[r]]
                arrival = free_at[r]
                for stage, ops, i in _dependencies(action, r, p, v):
                    found = [done[(stage, op, i)] for op in ops if (stage, op, i) in done]
                    if not found:
                        break
                    end, producer = found[0]
                    arrival = max(arrival, end + (comm if producer != r else 0.0))
                else:
                    start = arrival
                    end = start + cost[action.op]
                    starts[r].append(start)
                    busy[r] += cost[action.op]
                    free_at[r] = end
                    done[(virtual_stage(r, action.chunk, p), action.op, action.microbatch)] = (end, r)
                    if action.op == "F":
                        live[r] += 1
                        peak[r] = max(peak[r], live[r])
                    elif action.op in ("W", "BW"):
                        live[r] -= 1
                    forwarded[r] += {"F": 1, "B": -1, "BW": -1}.get(action.op, 0)
                    pending[r] += {"B": 1, "W": -1}.get(action.op, 0)
                    peak_memory[r] = max(peak_memory[r], forwarded[r] * memory[r][0] + pending[r] * memory[r][1])
                    position[r] += 1
                    remaining -= 1
                    progressed = True
                    continue
                break
        if not progressed:
            stuck = ", ".join(f"rank {r} at {lists[r][position[r]]!r}" for r in range(p)
                              if position[r] < len(lists[r]))
            raise ScheduleError(f"the schedule deadlocks: {stuck} wait for each other")
    makespan = max(free_at)
    bubbles = [1.0 - busy[r] / makespan if makespan > 0 else 0.0 for r in range(p)]
    return Simulation(makespan, busy, bubbles, peak, starts, peak_memory)


def zero_bubble_holds(p: int, m: int, budget, memory: Sequence[Tuple[float, float]]) -> List[int]:
    """For each rank ``r``, the most W's (at most ``r``, ZB-H1's) it can hold back under
    :func:`zero_bubble_h1_schedule` with its peak, by :func:`simulate`'s `memory` model (per
    rank: a microbatch's activations, a pending W's keep), within `budget` (1F1B's busiest
    rank, say; a number, or one per rank, less what the rank's backward keeps beyond the
    model); 0 where not even one fits. Where a pending W keeps about what the forward kept (a
    model whose activations are mostly the linears' inputs), or a stage keeps more than the
    first (the last, with the loss's logits), the paper's ZB-H1 peaks above 1F1B; these holds
    give the ZB-H1 that does not, for a longer bubble. W placement is local to a rank (no
    message moves), so each rank's hold is chosen alone."""
    if len(memory) != p:
        raise ValueError(f"memory must give (activation, pending W) for each of the {p} ranks, got {len(memory)}")
    budgets = list(budget) if isinstance(budget, (list, tuple)) else [budget] * p
    if len(budgets) != p:
        raise ValueError(f"budget must be one number or one for each of the {p} ranks, got {len(budgets)}")
    holds = [0] * p
    for r in range(1, p):
        for h in range(r, 0, -1):
            trial = [0] * r + [h] + [0] * (p - r - 1)
            if simulate(zero_bubble_h1_schedule(p, m, trial), p, 1, m, memory=memory).peak_memory[r] <= budgets[r]:
                holds[r] = h
                break
    return holds
