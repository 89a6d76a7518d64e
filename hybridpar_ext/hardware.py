"""Datasheet limits of the GPUs we report against (dense bf16 tensor-core TFLOP/s, HBM TB/s,
and the per-GPU bandwidth of the links collectives use inside and between nodes).

The benchmarks use these to turn a measurement into a fraction of what the hardware can do;
the planner (:mod:`hybridpar_ext.plan`) uses them to predict memory and step time.
"""

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense, no sparsity
    hbm_tbps: float
    # Per-GPU bandwidth, one direction, GB/s: NVLink inside a node (PCIe where there is none),
    # and the node's network share per GPU (one 200 Gb/s HDR or 400 Gb/s NDR port per GPU in
    # the DGX/HGX reference designs).
    intra_node_gbps: float = 0.0
    inter_node_gbps: float = 0.0


# Matched against torch.cuda.get_device_name(), most specific first.
GPUS = (
    GPUSpec("H200", 141, 989, 4.8, 450, 50),
    GPUSpec("H100 PCIe", 80, 756, 2.0, 64, 50),
    GPUSpec("H100 NVL", 94, 835, 3.9, 300, 50),
    GPUSpec("H100", 80, 989, 3.35, 450, 50),  # SXM
    GPUSpec("A100-SXM4-40GB", 40, 312, 1.555, 300, 25),
    GPUSpec("A100 80GB PCIe", 80, 312, 1.935, 32, 25),
    GPUSpec("A100", 80, 312, 2.039, 300, 25),  # SXM4 80GB
)


def gpu_spec(device_name: str) -> Optional[GPUSpec]:
    """The spec whose name occurs in `device_name` (e.g. 'NVIDIA H100 80GB HBM3'), if any."""
    for spec in GPUS:
        if spec.name.lower() in device_name.lower():
            return spec
    return None
