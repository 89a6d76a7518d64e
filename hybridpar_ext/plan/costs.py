"""Memory and time of one training step of a GPT under a layout: the formulas.

Parameter counts and FLOPs come from :mod:`hybridpar_ext.models.flops`, their one home (the
trainer's MFU uses the same): Narayanan et al. 2021 (the Megatron-LM paper), generalised to GQA
and gated MLPs: per token and layer the forward costs ``2 * (h*(h + 2*kv) + h*h + mats*h*ffn)``
in the GEMMs plus ``4*s*h`` in attention (QK^T and AV, counted in full as the paper does), the
logits ``2*h*V``; a training step costs three forward passes' worth (forward, backward) and
full recomputation adds one more of the layers (hardware FLOPs, not model FLOPs). For
GPT-3-like shapes this is the paper's ``96*B*s*l*h^2*(1 + s/(6h) + V/(16*l*h))``.

Activation memory follows Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models"): per layer, in elements of the activation dtype, the attention
block keeps its input, Q, K, V and the input of the output projection; the MLP its input and
its intermediate activations; both norms their inputs; dropout masks one byte per element.
With tensor parallelism everything between the column- and row-parallel GEMMs is split
``tp`` ways; with sequence parallelism the rest is too. FlashAttention keeps no ``s x s``
matrix (only a log-sum-exp per row), which is what the paper's selective recomputation
achieves. Full recomputation keeps only each layer's input.

The pipeline's idle time depends on the schedule (:func:`pipeline_bubble`): 1F1B and
interleaved 1F1B after Narayanan et al. 2021, ZB-H1 after Qi et al. 2023, from one microbatch's
forward, input-gradient and weight-gradient costs; ZB-H1 keeps 1F1B's activations.
"""

from dataclasses import dataclass

from ..models import flops
from .calibration import Calibration
from .specs import ClusterSpec, ModelSpec, Precision

RECOMPUTE = ("none", "selective", "full")
# The pipeline schedules, under the names the trainer's --schedule takes.
SCHEDULES = ("1f1b", "interleaved", "zero-bubble")


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    pp: int
    microbatch: int            # sequences per microbatch
    microbatches: int          # per pipeline per step (gradient accumulation steps)
    sequence_parallel: bool = False
    recompute: str = "none"
    zero1: bool = False
    virtual_stages: int = 1    # interleaved 1F1B: model chunks per pipeline rank
    # The pipeline schedule, named as the trainer's --schedule: "1f1b", "interleaved" (which
    # virtual_stages > 1 implies, and the default then) or "zero-bubble" (ZB-H1, v = 1).
    schedule: str = ""

    def __post_init__(self):
        default = "interleaved" if self.virtual_stages > 1 else "1f1b"
        if not self.schedule:
            object.__setattr__(self, "schedule", default)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Layout: schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if (self.schedule == "interleaved") != (self.virtual_stages > 1):
            raise ValueError(f"Layout: schedule {self.schedule!r} with {self.virtual_stages} virtual stages; "
                             "interleaved needs v >= 2, 1f1b and zero-bubble v = 1")

    def describe(self) -> str:
        extras = [f"mb={self.microbatch}x{self.microbatches}"]
        if self.virtual_stages > 1:
            extras.append(f"v{self.virtual_stages}")
        if self.schedule == "zero-bubble":
            extras.append("zb")
        if self.sequence_parallel:
            extras.append("sp")
        if self.recompute != "none":
            extras.append(f"recompute={self.recompute}")
        if self.zero1:
            extras.append("zero1")
        return f"dp{self.dp} tp{self.tp} pp{self.pp} " + " ".join(extras)


# ----------------------------------------------------------------------------- params

def norm_params(m: ModelSpec) -> int:
    return flops.norm_params(m.hidden, m.norm)


def layer_params(m: ModelSpec) -> int:
    return flops.layer_params(m.hidden, m.kv_dim, m.ffn, m.mlp, m.norm)


def total_params(m: ModelSpec) -> int:
    return flops.total_params(m.layers, m.hidden, m.kv_dim, m.ffn, m.vocab, m.mlp, m.norm, m.tied_embeddings)


def stage_params(m: ModelSpec, layout: Layout, stage: int) -> float:
    """Parameters one GPU of pipeline stage `stage` holds (tp splits the matrices; norms and
    the kv projection when kv heads are fewer than tp are replicated)."""
    t, h = layout.tp, m.hidden
    kv_split = min(t, m.kv_heads)
    matrices = h * h / t + 2 * h * m.kv_dim / kv_split + h * h / t + m.mlp_matrices * h * m.ffn / t
    per_layer = matrices + 2 * norm_params(m)
    params = per_layer * stage_layers(m, layout)
    first, last = stage == 0, stage == layout.pp - 1
    if first:
        params += m.vocab * h / t
    if last:
        params += norm_params(m)
        if not (m.tied_embeddings and first):  # a tied head on another stage is a second copy
            params += m.vocab * h / t
    return params


def stage_layers(m: ModelSpec, layout: Layout) -> int:
    """Layers on the fullest stage (all stages alike when pp divides the layers)."""
    return -(-m.layers // layout.pp)


# ------------------------------------------------------------------------------ FLOPs

def layer_forward_flops_per_token(m: ModelSpec) -> float:
    return flops.layer_forward_flops_per_token(m.hidden, m.kv_dim, m.ffn, m.mlp, m.seq)


def recompute_flops_per_token(m: ModelSpec, recompute: str) -> float:
    """What recomputation adds per token and layer: the attention core (selective) or the
    whole forward (full)."""
    return {"none": 0.0, "selective": flops.attention_forward_flops_per_token(m.hidden, m.seq),
            "full": layer_forward_flops_per_token(m)}[recompute]


def step_flops(m: ModelSpec, global_batch: int, recompute: str = "none"):
    """(model FLOPs, hardware FLOPs) of one step over ``global_batch`` sequences; hardware
    FLOPs include recomputation, model FLOPs do not (the MFU convention)."""
    tokens = global_batch * m.seq
    model = tokens * flops.training_flops_per_token(m.layers, m.hidden, m.kv_dim, m.ffn, m.vocab, m.mlp, m.seq)
    return model, model + tokens * m.layers * recompute_flops_per_token(m, recompute)


# ------------------------------------------------------------------------- activations

def layer_activation_bytes(m: ModelSpec, microbatch: int, tp: int, sequence_parallel: bool,
                           recompute: str, activation_bytes: int) -> float:
    """Bytes one layer keeps for backward, per microbatch, on one GPU."""
    sbh = m.seq * microbatch * m.hidden
    sb = m.seq * microbatch
    a = activation_bytes
    if recompute == "full":
        return sbh * a / (tp if sequence_parallel else 1)
    mask = 1.0 if m.dropout else 0.0
    # Outside the tensor-parallel regions: both norms' inputs, the attention and MLP inputs
    # (the norms' outputs), the dropout masks after attention and MLP.
    replicated = 4 * sbh * a + 2 * sbh * mask
    # Inside: Q, K, V, the attention output (input of the output projection), the softmax
    # statistics, the MLP's intermediate activations.
    mlp_inner = (3 if m.mlp == "swiglu" else 2) * sb * m.ffn * a
    kv_split = min(tp, m.kv_heads)
    split = (2 * sbh * a + mlp_inner) / tp + 2 * sb * m.kv_dim * a / kv_split
    split += sb * m.heads / tp * 4  # fp32 log-sum-exp per row and head
    return replicated / (tp if sequence_parallel else 1) + split


def logits_bytes(m: ModelSpec, microbatch: int, tp: int) -> float:
    """The last stage's logits in fp32 and their gradient (the loss is computed in fp32)."""
    return 2 * 4 * m.seq * microbatch * m.vocab / tp


@dataclass(frozen=True)
class Memory:
    params: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def memory_per_gpu(m: ModelSpec, layout: Layout, precision: Precision) -> Memory:
    """Bytes on the fullest GPU: the first stage (most microbatches in flight under 1F1B) or
    the last (the logits), whichever needs more."""
    best = None
    for stage in {0, layout.pp - 1}:
        params = stage_params(m, layout, stage)
        in_flight = min(layout.pp - stage, layout.microbatches)
        if layout.virtual_stages > 1:  # Korthikanti et al.: interleaving keeps a little more
            in_flight *= 1 + (layout.pp - 1) / (layout.pp * layout.virtual_stages)
        per_layer = layer_activation_bytes(m, layout.microbatch, layout.tp, layout.sequence_parallel,
                                           layout.recompute, precision.activation_bytes)
        acts = per_layer * stage_layers(m, layout) * in_flight
        if layout.recompute == "full":  # one layer's full activations while it is recomputed
            acts += layer_activation_bytes(m, layout.microbatch, layout.tp, layout.sequence_parallel,
                                           "none", precision.activation_bytes)
        if stage == layout.pp - 1:
            acts += logits_bytes(m, layout.microbatch, layout.tp)
        optimizer = params * precision.optimizer_bytes / (layout.dp if layout.zero1 else 1)
        mem = Memory(params * precision.param_bytes, params * precision.grad_bytes, optimizer, acts)
        if best is None or mem.total > best.total:
            best = mem
    return best


# ------------------------------------------------------------------------------- time

@dataclass(frozen=True)
class StepTime:
    compute: float        # pipeline-busy compute, seconds
    tp_comm: float        # exposed tensor-parallel collectives
    pp_comm: float        # pipeline sends
    bubble: float         # pipeline fill and drain
    dp_comm: float        # exposed gradient reduction (and ZeRO-1 parameter gather)
    optimizer: float
    # One microbatch on the slowest stage: seconds of its F, B and W (what the bubble is of).
    microbatch_fbw: tuple = (0.0, 0.0, 0.0)

    @property
    def total(self) -> float:
        return self.compute + self.tp_comm + self.pp_comm + self.bubble + self.dp_comm + self.optimizer


def ring_time(bytes_: float, ranks: int, gbps: float, calib: Calibration, all_reduce=True) -> float:
    """Seconds of a ring all-reduce (or an all-gather / reduce-scatter) of ``bytes_``."""
    if ranks <= 1:
        return 0.0
    steps = 2 * (ranks - 1) if all_reduce else ranks - 1
    return steps / ranks * bytes_ / (gbps * 1e9 * calib.link_efficiency) + steps * calib.hop_latency_s


def pipeline_bubble(schedule: str, p: int, v: int, f: float, b: float, w: float) -> float:
    """Seconds a step's pipeline idles, for stages of equal cost whose microbatch costs ``f``
    (forward), ``b`` (input-gradient backward) and ``w`` (weight-gradient backward): 1F1B
    ``(p-1)(f+b+w)`` (Narayanan et al. 2021); interleaving ``v`` chunks per rank ``v`` times
    less; ZB-H1 ``(p-1)(f+b-w)`` (Qi et al. 2023), its W filling the cool-down, which holds for
    ``m >= p`` and ``w <= min(f, b)`` (always so here: W's FLOPs are part of F's and of B's).
    The simulator of :mod:`hybridpar_ext.parallel.schedules` gives the same (tested); the
    planner keeps the closed forms so that it stays pure arithmetic."""
    if p == 1:
        return 0.0
    if schedule == "zero-bubble":
        return (p - 1) * max(f + b - w, 0.0)
    return (p - 1) * (f + b + w) / v


def step_time(m: ModelSpec, layout: Layout, cluster: ClusterSpec, precision: Precision,
              calib: Calibration) -> StepTime:
    gpu = cluster.gpu
    t, p, d, b = layout.tp, layout.pp, layout.dp, layout.microbatch
    tokens_mb = b * m.seq
    layer = 3 * layer_forward_flops_per_token(m) + recompute_flops_per_token(m, layout.recompute)
    layer_flops = tokens_mb * layer * stage_layers(m, layout)
    logits_flops = tokens_mb * 3 * flops.logits_forward_flops_per_token(m.hidden, m.vocab)
    rate = gpu.bf16_tflops * 1e12 * calib.gemm_efficiency(m.hidden, t)
    # The last stage also computes the logits; the slowest stage paces the pipeline.
    stage_compute = (layer_flops + logits_flops) / t / rate

    # Tensor parallelism: per layer, an all-reduce (or all-gather + reduce-scatter) after
    # attention and after the MLP, in forward and backward, again in a full recompute.
    act = tokens_mb * m.hidden * precision.activation_bytes
    tp_collectives = (4 + (2 if layout.recompute == "full" else 0)) * stage_layers(m, layout)
    tp = tp_collectives * ring_time(act, t, gpu.intra_node_gbps, calib) * calib.tp_exposed

    # Pipeline sends: activations forward and gradients backward at each stage boundary,
    # split over the tp ranks (scatter/gather), across nodes when the stages are.
    pp_gbps = gpu.inter_node_gbps if t * p > cluster.gpus_per_node else gpu.intra_node_gbps
    v = layout.virtual_stages
    pp = 2 * v * (act / t) / (pp_gbps * 1e9 * calib.link_efficiency) if p > 1 else 0.0

    # A microbatch on the slowest stage, split into its forward F, input-gradient backward B
    # and weight-gradient backward W: W is the weight GEMMs' forward FLOPs again (the attention
    # core has no weights); B the rest of the backward with recomputation and the backward
    # collectives; F the forward with its collectives and half the pipeline sends.
    layers, logits = stage_layers(m, layout), flops.logits_forward_flops_per_token(m.hidden, m.vocab)
    attention_core = flops.attention_forward_flops_per_token(m.hidden, m.seq)
    w = tokens_mb * (layers * (layer_forward_flops_per_token(m) - attention_core) + logits) / t / rate
    tp_forward = tp * 2 * layers / tp_collectives   # 2 of each layer's collectives are the forward's
    f = tokens_mb * (layers * layer_forward_flops_per_token(m) + logits) / t / rate + tp_forward + pp / 2
    per_microbatch = stage_compute + tp + pp
    bubble = pipeline_bubble(layout.schedule, p, v, f, per_microbatch - f - w, w)

    # Data parallelism: gradients reduced over dp ranks that sit tp*pp GPUs apart.
    params = max(stage_params(m, layout, 0), stage_params(m, layout, p - 1))
    dp_gbps = gpu.inter_node_gbps if t * p * min(d, 2) > cluster.gpus_per_node else gpu.intra_node_gbps
    grads = params * precision.grad_bytes
    if layout.zero1:
        dp = (ring_time(grads, d, dp_gbps, calib, all_reduce=False)
              + ring_time(params * precision.param_bytes, d, dp_gbps, calib, all_reduce=False))
    else:
        dp = ring_time(grads, d, dp_gbps, calib)
    dp *= calib.dp_exposed
    # Adam reads and writes weights, gradients and both moments: memory bound.
    state = params / (d if layout.zero1 else 1)
    optimizer = state * (2 * precision.param_bytes + precision.grad_bytes
                         + 2 * precision.optimizer_bytes) / (gpu.hbm_tbps * 1e12)
    return StepTime(
        compute=layout.microbatches * stage_compute,
        tp_comm=layout.microbatches * tp,
        pp_comm=layout.microbatches * pp,
        bubble=bubble,
        dp_comm=dp,
        optimizer=optimizer,
        microbatch_fbw=(f, per_microbatch - f - w, w),
    )
