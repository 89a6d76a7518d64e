"""The planner's efficiency constants, in one place, and their refinement from our own
benchmark results.

Defaults were fitted once to the published runs in :mod:`.published` (the errors that
remain, in-sample, are in the README); :func:`from_bench_results` replaces the GEMM and link numbers
with what ``python -m bench comm`` measured on the GPU the planner runs on.
"""

import glob
import json
import os
from dataclasses import dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class Calibration:
    # Fraction of dense peak a transformer layer reaches (GEMMs plus the memory-bound work
    # around them) as the hidden width grows, and the width at which it reaches half of that:
    # efficiency = gemm_peak_fraction / (1 + gemm_half_width / width), the width being the
    # hidden size (the GEMMs' reduction dimension), or its share per tensor-parallel rank
    # with width_per_gpu. Chosen on a grid to minimise the squared relative errors over the
    # runs of .published.
    gemm_peak_fraction: float = 0.76
    gemm_half_width: float = 2000.0
    # Fraction of a link's bandwidth a ring collective reaches, and a fixed cost per hop.
    link_efficiency: float = 0.8
    hop_latency_s: float = 10e-6
    # Fraction of tensor-parallel communication left exposed (not overlapped with compute).
    tp_exposed: float = 1.0
    # Fraction of the data-parallel gradient reduction not hidden behind backward.
    dp_exposed: float = 0.3
    # Memory: what the framework (CUDA context, NCCL buffers, workspaces) keeps, and the
    # fraction of the rest the caching allocator can use before fragmentation bites.
    reserved_gib: float = 3.0
    usable_fraction: float = 0.92
    source: str = "defaults (fitted to the published runs)"

    width_per_gpu: bool = False

    def gemm_efficiency(self, hidden: float, tp: int = 1) -> float:
        width = hidden / tp if self.width_per_gpu else hidden
        return self.gemm_peak_fraction / (1.0 + self.gemm_half_width / width)


DEFAULT = Calibration()


def from_bench_results(results_dir: str, gpu_name: str, base: Calibration = DEFAULT,
                       peak_tflops: Optional[float] = None,
                       intra_node_gbps: Optional[float] = None) -> Calibration:
    """``base`` refined by ``bench/results/comm-*.json`` measured on ``gpu_name``: the matmul
    rows give the achieved GEMM fraction of ``peak_tflops`` at their width, the collective rows
    the achieved fraction of ``intra_node_gbps``. Unchanged where no result matches."""
    updates = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "comm-*.json"))):
        with open(path) as f:
            data = json.load(f)
        env = data.get("environment", {})
        if not env.get("gpu") or gpu_name.lower() not in env["gpu"].lower():
            continue
        for row in data.get("rows", []):
            if row.get("op") != "all_gather_matmul" or not row.get("matmul_ms"):
                continue
            rows, k = _parse_shape(row["x"])
            world = row.get("world", 1)
            n, _ = _parse_shape(row["weight"])
            tflops = 2 * rows * world * k * n / (row["matmul_ms"] * 1e-3) / 1e12
            if peak_tflops:
                achieved = tflops / peak_tflops
                # Keep the width dependence; rescale so that this width gives what was measured.
                updates["gemm_peak_fraction"] = achieved * (1 + base.gemm_half_width / k)
                updates["width_per_gpu"] = False
            if intra_node_gbps and world > 1 and row.get("collective_ms"):
                moved = rows * k * 2 * (world - 1)
                updates["link_efficiency"] = min(1.0, moved / (row["collective_ms"] * 1e-3) / 1e9
                                                 / intra_node_gbps)
            updates["source"] = f"bench results {os.path.basename(path)}"
            break
    return replace(base, **updates) if updates else base


def _parse_shape(text: str):
    """'(8192, 8192)' -> (8192, 8192)."""
    return tuple(int(v) for v in text.strip("() ").split(",") if v.strip())
