"""Published large-scale training runs the planner is checked against.

Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM", Table 1: GPT models on A100 80GB (DGX A100, 8 per node, 200 Gb/s HDR
InfiniBand per GPU), sequence 2048, vocabulary 51200, mixed precision, full activation
recomputation; per-GPU throughput counted with recomputation (their formula).

Llama Team 2024, "The Llama 3 Herd of Models", Table 4: Llama 3 405B on H100 (8 per node),
sequence 8192, 16M tokens per batch, BF16 MFU (model FLOPs, no recomputation).
"""

from dataclasses import dataclass, field, replace

from . import planner
from .calibration import DEFAULT
from .specs import PRESETS, ClusterSpec, ModelSpec


@dataclass(frozen=True)
class PublishedRun:
    source: str
    model: ModelSpec
    gpu: str
    gpus: int
    global_batch: int
    tp: int
    pp: int
    reported_tflops_per_gpu: float
    counts_recompute: bool         # the reported figure includes recomputation FLOPs
    # The features the run's software had: the planner searches only these.
    layout_options: dict = field(default_factory=dict)
    # What that software did differently from ours (e.g. no overlap of the gradient
    # reduction with backward), as calibration fields.
    calibration_overrides: dict = field(default_factory=dict)


def _megatron(params, heads, hidden, layers, tp, pp, gpus, batch, tflops):
    model = ModelSpec(layers, hidden, heads, heads, 4 * hidden, 51200, 2048, "gelu", "layernorm",
                      tied_embeddings=True, dropout=True, name=f"GPT {params}B")
    # Megatron-LM of 2021: full recomputation, no sequence parallelism or sharded optimizer,
    # gradients all-reduced after backward and tensor-parallel all-reduces not overlapped.
    return PublishedRun("Narayanan et al. 2021, Table 1", model, "a100-80gb", gpus, batch, tp, pp,
                        tflops, counts_recompute=True,
                        layout_options=dict(recompute=("full",), allow_zero1=False, allow_sp=False),
                        calibration_overrides=dict(dp_exposed=1.0, tp_exposed=1.0))


RUNS = [
    _megatron("1.7", 24, 2304, 24, 1, 1, 32, 512, 137),
    _megatron("3.6", 32, 3072, 30, 2, 1, 64, 512, 138),
    _megatron("7.5", 32, 4096, 36, 4, 1, 128, 512, 142),
    _megatron("18.4", 48, 6144, 40, 8, 1, 256, 1024, 135),
    _megatron("39.1", 64, 8192, 48, 8, 2, 512, 1536, 138),
    _megatron("76.1", 80, 10240, 60, 8, 4, 1024, 1792, 140),
    _megatron("145.6", 96, 12288, 80, 8, 8, 1536, 2304, 148),
    _megatron("310.1", 128, 16384, 96, 8, 16, 1920, 2160, 155),
    _megatron("529.6", 128, 20480, 105, 8, 35, 2520, 2520, 163),
    _megatron("1008", 160, 25600, 128, 8, 64, 3072, 3072, 163),
    # 126 layers on 16 stages: uneven stages (the fullest holds 8 layers).
    PublishedRun("Llama 3 (2024), Table 4", PRESETS["llama3-405b"], "h100", 8192, 2048, 8, 16,
                 430, counts_recompute=False, layout_options=dict(uneven_stages=True)),
    PublishedRun("Llama 3 (2024), Table 4", PRESETS["llama3-405b"], "h100", 16384, 2048, 8, 16,
                 400, counts_recompute=False, layout_options=dict(uneven_stages=True)),
]


# These runs used 1F1B and interleaved 1F1B; zero bubble came later (Qi et al. 2023).
PUBLISHED_SCHEDULES = ("1f1b", "interleaved")


def compare(run: PublishedRun, calibration=None) -> dict:
    """The planner on a published run: its prediction for the reported layout (the fastest
    microbatching of it that fits, or of the nearest pipeline depth if it cannot split the
    layers so), the error against the reported per-GPU throughput, and the layout the
    planner itself recommends with the run's features."""
    calib = replace(calibration or DEFAULT, **run.calibration_overrides)
    cluster = ClusterSpec.of(run.gpu, run.gpus)
    predictions = [planner.predict(run.model, cluster, layout, run.global_batch, calib=calib)
                   for layout in planner.layouts(run.model, cluster, run.global_batch,
                                                 **{"schedules": PUBLISHED_SCHEDULES, **run.layout_options})]
    fitting = [p for p in predictions if p.fits]
    same_tp = [p for p in fitting if p.layout.tp == run.tp]
    nearest_pp = min({p.layout.pp for p in same_tp}, key=lambda pp: abs(pp - run.pp))
    theirs = min((p for p in same_tp if p.layout.pp == nearest_pp), key=lambda p: p.time.total)
    best = min(fitting, key=lambda p: p.time.total)
    peak = cluster.gpu.bf16_tflops
    predicted = theirs.tflops_per_gpu if run.counts_recompute else theirs.mfu * peak
    return {
        "run": f"{run.model.name} on {run.gpus} {cluster.gpu.name}",
        "source": run.source, "reported_layout": f"tp{run.tp} pp{run.pp}",
        "reported_tflops": run.reported_tflops_per_gpu, "predicted_tflops": predicted,
        "error": predicted / run.reported_tflops_per_gpu - 1,
        "predicted_layout": theirs.layout.describe(),
        "recommended": best.layout.describe(),
        "recommended_vs_reported_layout": best.time.total / theirs.time.total - 1,
        "same_tp_pp": (best.layout.tp, best.layout.pp) == (run.tp, run.pp),
    }
