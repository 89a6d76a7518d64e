"""Datasheet limits of the GPUs we report against (dense bf16 tensor-core TFLOP/s, HBM TB/s).

The benchmarks use these to turn a measurement into a fraction of what the hardware can do.
"""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense, no sparsity
    hbm_tbps: float


# Matched against torch.cuda.get_device_name(), most specific first.
GPUS = (
    GPUSpec("H200", 141, 989, 4.8),
    GPUSpec("H100 PCIe", 80, 756, 2.0),
    GPUSpec("H100 NVL", 94, 835, 3.9),
    GPUSpec("H100", 80, 989, 3.35),  # SXM
    GPUSpec("A100-SXM4-40GB", 40, 312, 1.555),
    GPUSpec("A100 80GB PCIe", 80, 312, 1.935),
    GPUSpec("A100", 80, 312, 2.039),  # SXM4 80GB
)


def gpu_spec(device_name: str) -> Optional[GPUSpec]:
    """The spec whose name occurs in `device_name` (e.g. 'NVIDIA H100 80GB HBM3'), if any."""
    for spec in GPUS:
        if spec.name.lower() in device_name.lower():
            return spec
    return None
