"""Enumerate the layouts of a model on a cluster, predict each, keep what fits, rank."""

from dataclasses import dataclass, field, replace
from typing import List, Optional

from . import costs
from .calibration import DEFAULT, Calibration
from .costs import Layout, Memory, StepTime
from .specs import PRECISIONS, ClusterSpec, ModelSpec, Precision

GIB = 2**30


@dataclass(frozen=True)
class Prediction:
    layout: Layout
    memory: Memory                 # bytes on the fullest GPU
    time: StepTime                 # seconds per step, by component
    tokens_per_s: float
    tflops_per_gpu: float          # hardware FLOPs (recomputation included) per second per GPU
    mfu: float                     # model FLOPs per second / peak, per GPU
    fits: bool
    lost_on: str = ""              # against the best layout: the component that costs most

    def as_dict(self) -> dict:
        return {
            "layout": self.layout.describe(), "dp": self.layout.dp, "tp": self.layout.tp,
            "pp": self.layout.pp, "microbatch": self.layout.microbatch,
            "microbatches": self.layout.microbatches,
            "sequence_parallel": self.layout.sequence_parallel,
            "recompute": self.layout.recompute, "zero1": self.layout.zero1,
            "virtual_stages": self.layout.virtual_stages, "schedule": self.layout.schedule,
            "step_time_s": self.time.total, "tokens_per_s": self.tokens_per_s,
            "tflops_per_gpu": self.tflops_per_gpu, "mfu": self.mfu,
            "memory_gib": self.memory.total / GIB,
            "memory_breakdown_gib": {k: getattr(self.memory, k) / GIB
                                     for k in ("params", "grads", "optimizer", "activations")},
            "time_breakdown_s": {k: getattr(self.time, k) for k in
                                 ("compute", "tp_comm", "pp_comm", "bubble", "dp_comm", "optimizer")},
            "fits": self.fits, "lost_on": self.lost_on,
        }


@dataclass
class Plan:
    model: ModelSpec
    cluster: ClusterSpec
    global_batch: int
    best: List[Prediction]                 # fitting layouts, fastest first
    considered: int
    discarded_memory: int
    smallest: Optional[Prediction] = None  # the layout needing least memory (fitting or not)
    usable_gib: float = 0.0
    calibration: Calibration = field(default=DEFAULT)
    named: Optional[Prediction] = None     # the layout the user asked about, against the best
    named_rank: Optional[int] = None       # where it would stand among the fitting (None: does not fit)
    constraints: str = ""                  # what the search was limited to, in words

    def as_dict(self) -> dict:
        return {
            "model": self.model.__dict__, "gpus": self.cluster.gpus,
            "gpus_per_node": self.cluster.gpus_per_node, "gpu": self.cluster.gpu.__dict__,
            "global_batch": self.global_batch, "considered": self.considered,
            "discarded_for_memory": self.discarded_memory, "usable_gib": self.usable_gib,
            "calibration": self.calibration.source,
            "best": [p.as_dict() for p in self.best],
            "smallest_memory": self.smallest.as_dict() if self.smallest else None,
            "named": self.named.as_dict() if self.named else None, "named_rank": self.named_rank,
            "constraints": self.constraints,
        }


class PlanError(ValueError):
    """No layout is possible, or none fits; the message says what is short."""


def _divisors(n: int):
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(model: ModelSpec, cluster: ClusterSpec, global_batch: int, max_microbatch: int = 16,
            recompute=costs.RECOMPUTE, allow_zero1: bool = True, allow_sp: bool = True,
            uneven_stages: bool = False, virtual_stages=(1, 2, 4), schedules=costs.SCHEDULES):
    """Every valid layout: tp divides the heads (kv heads split or replicated) and stays in a
    node, pp divides the layers (or, with ``uneven_stages``, is any count up to the layers,
    the fullest stage holding ``ceil(layers / pp)``), dp is the rest and divides the batch,
    the microbatch size divides each data-parallel rank's share. Interleaving (``v`` model
    chunks per pipeline rank) needs the microbatches to be a multiple of pp and each rank's
    layers a multiple of ``v``. A pipeline runs each of ``schedules`` it can: 1F1B and ZB-H1
    with one chunk per rank, interleaved 1F1B with ``v > 1``; without a pipeline there is
    nothing to schedule ("1f1b"). ``recompute``, ``allow_sp``, ``allow_zero1``,
    ``virtual_stages`` and ``schedules`` constrain the search."""
    unknown = set(schedules) - set(costs.SCHEDULES)
    if unknown or not schedules:
        raise ValueError(f"schedules must be among {', '.join(costs.SCHEDULES)}, got {list(schedules)}")
    unknown = set(recompute) - set(costs.RECOMPUTE)
    if unknown or not recompute:
        raise ValueError(f"recompute must be among {', '.join(costs.RECOMPUTE)}, got {list(recompute)}")
    stage_counts = range(1, model.layers + 1) if uneven_stages else _divisors(model.layers)
    for tp in _divisors(min(cluster.gpus, cluster.gpus_per_node)):
        if cluster.gpus % tp or model.heads % tp or (model.kv_heads % tp and tp % model.kv_heads):
            continue
        for pp in stage_counts:
            if cluster.gpus % (tp * pp):
                continue
            dp = cluster.gpus // (tp * pp)
            if global_batch % dp:
                continue
            share = global_batch // dp
            for micro in (b for b in _divisors(share) if b <= max_microbatch):
                microbatches = share // micro
                if pp > 1 and microbatches < pp:
                    continue  # 1F1B needs at least as many microbatches as stages
                fullest = -(-model.layers // pp)
                chunks = [v for v in virtual_stages if v == 1 or (
                    pp > 1 and microbatches % pp == 0 and fullest % v == 0)]
                pipelines = [(v, kind) for v in chunks for kind in _schedules_of(pp, v, schedules)]
                for sp in ((False, True) if tp > 1 and allow_sp and model.seq % tp == 0 else (False,)):
                    for rc in recompute:
                        for zero1 in ((False, True) if dp > 1 and allow_zero1 else (False,)):
                            for v, kind in pipelines:
                                yield Layout(dp, tp, pp, micro, microbatches, sp, rc, zero1, v, kind)


def _schedules_of(pp: int, v: int, schedules):
    if pp == 1:
        return ["1f1b"] if v == 1 else []
    if v > 1:
        return ["interleaved"] if "interleaved" in schedules else []
    return [kind for kind in ("1f1b", "zero-bubble") if kind in schedules]


def check_layout(model: ModelSpec, cluster: ClusterSpec, layout: Layout, global_batch: int) -> None:
    """PlanError saying why `layout` cannot run `model` on `cluster`: the rules of
    :func:`layouts`, except that any pipeline depth up to the layers is allowed (the fullest
    stage holds ``ceil(layers / pp)``) and so is an interleaving the layers split unevenly."""
    lay, problems = layout, []
    if lay.dp * lay.tp * lay.pp != cluster.gpus:
        problems.append(f"dp x tp x pp = {lay.dp * lay.tp * lay.pp}, not the {cluster.gpus} GPUs")
    if lay.tp > cluster.gpus_per_node:
        problems.append(f"tp{lay.tp} spans more than a node ({cluster.gpus_per_node} GPUs)")
    if model.heads % lay.tp or (model.kv_heads % lay.tp and lay.tp % model.kv_heads):
        problems.append(f"tp{lay.tp} must divide the {model.heads} heads and divide or be a multiple of "
                        f"the {model.kv_heads} kv heads")
    if lay.pp * lay.virtual_stages > model.layers:
        problems.append(f"pp{lay.pp} x v{lay.virtual_stages} model chunks, more than the {model.layers} layers")
    if lay.dp * lay.microbatch * lay.microbatches != global_batch:
        problems.append(f"dp x microbatch x microbatches = {lay.dp * lay.microbatch * lay.microbatches}, "
                        f"not the global batch of {global_batch}")
    if lay.pp > 1 and lay.microbatches < lay.pp:
        problems.append(f"{lay.microbatches} microbatches cannot fill pp{lay.pp} (at least {lay.pp})")
    if lay.pp == 1 and lay.schedule != "1f1b":
        problems.append(f"schedule {lay.schedule} needs a pipeline (pp > 1)")
    if lay.virtual_stages > 1 and lay.microbatches % lay.pp:
        problems.append(f"interleaving needs the microbatches ({lay.microbatches}) a multiple of pp{lay.pp}")
    if lay.sequence_parallel and (lay.tp == 1 or model.seq % lay.tp):
        problems.append(f"sp needs tp > 1 dividing the sequence ({model.seq}), got tp{lay.tp}")
    if problems:
        raise PlanError(f"plan: layout {lay.describe()} cannot run {model.name or 'the model'}: "
                        + "; ".join(problems))


def predict(model: ModelSpec, cluster: ClusterSpec, layout: Layout, global_batch: int,
            precision: Precision = PRECISIONS["bf16-mixed"], calib: Calibration = DEFAULT) -> Prediction:
    memory = costs.memory_per_gpu(model, layout, precision)
    time = costs.step_time(model, layout, cluster, precision, calib)
    model_flops, hardware_flops = costs.step_flops(model, global_batch, layout.recompute)
    total = time.total
    peak = cluster.gpu.bf16_tflops * 1e12
    return Prediction(
        layout=layout, memory=memory, time=time,
        tokens_per_s=global_batch * model.seq / total,
        tflops_per_gpu=hardware_flops / total / cluster.gpus / 1e12,
        mfu=model_flops / total / cluster.gpus / peak,
        fits=memory.total <= usable_bytes(cluster, calib),
    )


def usable_bytes(cluster: ClusterSpec, calib: Calibration) -> float:
    return (cluster.gpu.memory_gib - calib.reserved_gib) * calib.usable_fraction * GIB


def _lost_on(pred: Prediction, best: Prediction) -> str:
    if pred is best:
        return "best"
    deltas = {k: getattr(pred.time, k) - getattr(best.time, k)
              for k in ("compute", "tp_comm", "pp_comm", "bubble", "dp_comm", "optimizer")}
    worst = max(deltas, key=deltas.get)
    slower = pred.time.total / best.time.total - 1
    return f"+{slower:.1%}: {worst.replace('_', ' ')} +{deltas[worst]:.3g} s"


def plan(model: ModelSpec, cluster: ClusterSpec, global_batch: int, top: int = 5,
         precision: Precision = PRECISIONS["bf16-mixed"], calibration: Calibration = DEFAULT,
         named: Optional[Layout] = None, **layout_options) -> Plan:
    """The fastest layouts that fit, best first, with what each loses against the best; with
    `named`, that layout too (checked first), where it would rank and what it loses. The
    ``layout_options`` of :func:`layouts` constrain the search. Raises :class:`PlanError` when
    no layout is valid or none fits, saying what is short."""
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"plan: global_batch must be a positive int (sequences), got {global_batch!r}")
    if named is not None:
        check_layout(model, cluster, named, global_batch)
    predictions = [predict(model, cluster, layout, global_batch, precision, calibration)
                   for layout in layouts(model, cluster, global_batch, **layout_options)]
    if not predictions:
        raise PlanError(
            f"plan: no valid layout of {model.name or 'the model'} on {cluster.gpus} GPUs "
            f"({cluster.gpus_per_node} per node) with a global batch of {global_batch}: tp must "
            f"divide the heads ({model.heads}) and {cluster.gpus_per_node}, pp the layers "
            f"({model.layers}), and dp = gpus / (tp * pp) the global batch"
            + (f"; and the search was limited to {limits}" if (limits := describe_constraints(layout_options)) else ""))
    fitting = sorted((p for p in predictions if p.fits), key=lambda p: (p.time.total, p.memory.total))
    smallest = min(predictions, key=lambda p: p.memory.total)
    usable = usable_bytes(cluster, calibration) / GIB
    if not fitting:
        m = smallest.memory
        raise PlanError(
            f"plan: no layout fits. The smallest, {smallest.layout.describe()}, needs "
            f"{m.total / GIB:.1f} GiB per GPU (weights {m.params / GIB:.1f}, gradients "
            f"{m.grads / GIB:.1f}, optimizer {m.optimizer / GIB:.1f}, activations "
            f"{m.activations / GIB:.1f}) against {usable:.1f} GiB usable of the "
            f"{cluster.gpu.memory_gib:g} GiB {cluster.gpu.name}: more GPUs or GPUs with more "
            f"memory, or a smaller batch per GPU"
            + ("" if layout_options.get("uneven_stages") else
               f"; or pipeline depths that do not divide the {model.layers} layers "
               "(uneven_stages=True, --uneven-stages)")
            + (f"; or fewer limits on the search ({limits})" if (limits := describe_constraints(layout_options)) else ""))
    best = [replace(p, lost_on=_lost_on(p, fitting[0])) for p in fitting[:top]]
    theirs = rank = None
    if named is not None:
        theirs = predict(model, cluster, named, global_batch, precision, calibration)
        top_time = fitting[0].time.total
        if theirs.layout == fitting[0].layout:
            verdict = "best"
        elif theirs.time.total < top_time:   # outside the search's limits, and faster than it found
            verdict = f"{theirs.time.total / top_time - 1:.1%}: faster than the search's best"
        else:
            verdict = _lost_on(theirs, fitting[0])
        theirs = replace(theirs, lost_on=verdict)
        if theirs.fits:
            rank = 1 + sum(p.time.total < theirs.time.total for p in fitting if p.layout != named)
    return Plan(model, cluster, global_batch, best, len(predictions),
                len(predictions) - len(fitting), smallest, usable, calibration, theirs, rank,
                describe_constraints(layout_options))


def describe_constraints(options: dict) -> str:
    """The search's limits in words ("" when it searched everything)."""
    words = []
    if "recompute" in options and tuple(options["recompute"]) != costs.RECOMPUTE:
        words.append("recompute " + "/".join(options["recompute"]))
    if options.get("allow_sp") is False:
        words.append("no sp")
    if options.get("allow_zero1") is False:
        words.append("no zero1")
    if "schedules" in options and tuple(options["schedules"]) != costs.SCHEDULES:
        words.append("schedules " + "/".join(options["schedules"]))
    if "virtual_stages" in options and tuple(options["virtual_stages"]) != (1, 2, 4):
        words.append("v in " + "/".join(map(str, options["virtual_stages"])))
    if options.get("uneven_stages"):
        words.append("uneven stages allowed")
    return ", ".join(words)


def format_plan(result: Plan) -> str:
    m, c = result.model, result.cluster
    lines = [
        f"{m.name or 'model'}: {m.layers} layers, hidden {m.hidden}, heads {m.heads}/{m.kv_heads} kv, "
        f"ffn {m.ffn} ({m.mlp}), vocab {m.vocab}, seq {m.seq}; "
        f"{costs.total_params(m) / 1e9:.2f} B parameters",
        f"cluster: {c.gpus} x {c.gpu.name} ({c.gpus_per_node} per node, {c.gpu.memory_gib:g} GiB, "
        f"{c.gpu.bf16_tflops:g} bf16 TFLOP/s); global batch {result.global_batch} sequences "
        f"= {result.global_batch * m.seq:,} tokens",
        f"{result.considered} layouts considered, {result.discarded_memory} do not fit in "
        f"{result.usable_gib:.1f} GiB usable; calibration: {result.calibration.source}"
        + (f"; searched only: {result.constraints}" if result.constraints else ""),
        "",
        "| rank | layout | schedule | step s | bubble s | tokens/s | TFLOP/s/GPU | MFU | memory GiB | vs best |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(rank, p):
        sched = p.layout.schedule if p.layout.pp > 1 else "-"
        return (f"| {rank} | {p.layout.describe()} | {sched} | {p.time.total:.3g} | {p.time.bubble:.3g} | "
                f"{p.tokens_per_s:,.0f} | {p.tflops_per_gpu:.0f} | {p.mfu:.1%} | {p.memory.total / GIB:.1f} | "
                f"{p.lost_on} |")

    for i, p in enumerate(result.best, 1):
        lines.append(row(i, p))
    if result.named is not None:
        n = result.named
        where = (f"yours, #{result.named_rank}" if n.fits else
                 f"yours, does not fit ({n.memory.total / GIB:.1f} > {result.usable_gib:.1f} GiB)")
        lines.append(row(where, n))
    best = result.best[0]
    t = best.time
    lines += ["", f"best: compute {t.compute:.3g} s, tp comm {t.tp_comm:.3g} s, pp comm {t.pp_comm:.3g} s, "
              f"bubble {t.bubble:.3g} s, dp comm {t.dp_comm:.3g} s, optimizer {t.optimizer:.3g} s; "
              f"memory: weights {best.memory.params / GIB:.1f}, grads {best.memory.grads / GIB:.1f}, "
              f"optimizer {best.memory.optimizer / GIB:.1f}, activations "
              f"{best.memory.activations / GIB:.1f} GiB"]
    return "\n".join(lines)
