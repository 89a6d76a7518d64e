"""What the planner plans for: a model shape, a cluster, a numeric precision."""

from dataclasses import dataclass, replace
from typing import Optional

from ..hardware import GPUS, GPUSpec


def _positive_int(owner: str, name: str, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class ModelSpec:
    """A GPT-style decoder: ``layers`` blocks of attention (``heads`` query heads,
    ``kv_heads`` key/value heads) and an MLP of width ``ffn``; vocabulary ``vocab``; trained on
    sequences of ``seq`` tokens."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    seq: int
    mlp: str = "gelu"              # "gelu": 2 matrices; "swiglu": 3
    norm: str = "layernorm"        # "layernorm" (weight and bias) or "rmsnorm" (weight)
    tied_embeddings: bool = False
    dropout: bool = False          # dropout masks are stored activations
    name: str = ""

    def __post_init__(self):
        for field in ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq"):
            _positive_int("ModelSpec", field, getattr(self, field))
        if self.heads % self.kv_heads:
            raise ValueError(f"ModelSpec: heads ({self.heads}) must be a multiple of kv_heads "
                             f"({self.kv_heads})")
        if self.hidden % self.heads:
            raise ValueError(f"ModelSpec: hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"ModelSpec: mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"ModelSpec: norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.mlp == "swiglu" else 2

    @classmethod
    def from_gpt_config(cls, config, seq: Optional[int] = None) -> "ModelSpec":
        """The spec of :class:`hybridpar_ext.models.GPTConfig` (trained on ``seq`` tokens,
        default its ``max_seq_len``)."""
        return cls(layers=config.layers, hidden=config.hidden, heads=config.heads,
                   kv_heads=config.kv_heads, ffn=config.ffn, vocab=config.vocab_size,
                   seq=seq or config.max_seq_len, mlp=config.mlp, norm=config.norm,
                   tied_embeddings=config.tied_embeddings, name="GPTConfig")


PRESETS = {
    # Brown et al. 2020 (GPT-3), as trained with Megatron: vocabulary padded to 51200.
    "gpt3-175b": ModelSpec(96, 12288, 96, 96, 49152, 51200, 2048, "gelu", "layernorm", True, True,
                           "GPT-3 175B"),
    "llama2-7b": ModelSpec(32, 4096, 32, 32, 11008, 32000, 4096, "swiglu", "rmsnorm", name="Llama 2 7B"),
    "llama2-13b": ModelSpec(40, 5120, 40, 40, 13824, 32000, 4096, "swiglu", "rmsnorm", name="Llama 2 13B"),
    "llama2-70b": ModelSpec(80, 8192, 64, 8, 28672, 32000, 4096, "swiglu", "rmsnorm", name="Llama 2 70B"),
    "llama3-8b": ModelSpec(32, 4096, 32, 8, 14336, 128256, 8192, "swiglu", "rmsnorm", name="Llama 3 8B"),
    "llama3-70b": ModelSpec(80, 8192, 64, 8, 28672, 128256, 8192, "swiglu", "rmsnorm", name="Llama 3 70B"),
    "llama3-405b": ModelSpec(126, 16384, 128, 8, 53248, 128256, 8192, "swiglu", "rmsnorm",
                             name="Llama 3 405B"),
}

# The GPUs the planner knows by a short name (the rows of hardware.GPUS).
GPU_NAMES = {"a100-40gb": "A100-SXM4-40GB", "a100-80gb": "A100", "h100": "H100", "h100-sxm": "H100",
             "h200": "H200"}


@dataclass(frozen=True)
class ClusterSpec:
    gpus: int
    gpus_per_node: int
    gpu: GPUSpec

    def __post_init__(self):
        _positive_int("ClusterSpec", "gpus", self.gpus)
        _positive_int("ClusterSpec", "gpus_per_node", self.gpus_per_node)
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise ValueError(f"ClusterSpec: gpus ({self.gpus}) must be a multiple of gpus_per_node "
                             f"({self.gpus_per_node}) when it spans several nodes")
        for field in ("memory_gib", "bf16_tflops", "hbm_tbps", "intra_node_gbps", "inter_node_gbps"):
            if not getattr(self.gpu, field) > 0:
                raise ValueError(f"ClusterSpec: the GPU's {field} must be positive, got "
                                 f"{getattr(self.gpu, field)!r}")

    @classmethod
    def of(cls, gpu: str, gpus: int, gpus_per_node: int = 8, **overrides) -> "ClusterSpec":
        """A cluster of ``gpus`` of a known kind (``a100-40gb``, ``a100-80gb``, ``h100``,
        ``h200``), with any of GPUSpec's numbers overridden."""
        key = gpu.lower()
        if key not in GPU_NAMES:
            raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(sorted(GPU_NAMES))} "
                             "(or give its numbers by hand)")
        spec = next(s for s in GPUS if s.name == GPU_NAMES[key])
        return cls(gpus, gpus_per_node, replace(spec, **overrides))


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter of weights, gradients and optimizer state, and per activation."""

    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int


PRECISIONS = {
    # bf16 weights and activations, fp32 gradient accumulation, fp32 master weights + Adam m, v.
    "bf16-mixed": Precision(2, 4, 12, 2),
    # Everything fp32: Adam keeps m and v (the weights are the master copy).
    "fp32": Precision(4, 4, 8, 4),
}
