"""The GPT trainer per layout: step time and tokens/s, what the overlap of communication buys
(tensor parallelism with and without sequence parallelism, data parallelism), and the
pipeline bubble measured against the ideal ``(p - 1) / (m + p - 1)``.

Each configuration is one run of ``python -m hybridpar_ext train`` (its own torchrun, gloo on
a CPU, NCCL on GPUs), timed by the trainer itself: the median step after two warm-up steps.
On a CPU all processes share the machine's cores, so a layout of 8 processes on 2 cores is
slower than one process; the ratios still show what overlap and microbatching change. On a
GPU machine only layouts with at most one process per GPU run.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

from hybridpar_ext.parallel import ideal_bubble

MODEL = ["--layers", "4", "--hidden", "256", "--heads", "4", "--seq", "128", "--global-batch", "8",
         "--data", "synthetic"]
WARMUP = 2


def _train(flags, steps):
    """Median step time (s), tokens/s and bubble of one training run, or None if it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "metrics.jsonl")
        out = subprocess.run([sys.executable, "-m", "hybridpar_ext", "train", *MODEL, *flags,
                              "--steps", str(steps + WARMUP), "--quiet", "--metrics-file", metrics],
                             cwd=tmp, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            print(f"bench parallel: {' '.join(flags)} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            return None
        records = [json.loads(line) for line in open(metrics)][WARMUP:]
    step_s = statistics.median(r["step_time_s"] for r in records)
    return {"step_ms": step_s * 1e3, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
            "bubble": statistics.median(r["bubble"] for r in records)}


def _layout(dp=1, tp=1, pp=1, sp=False, microbatches=None, overlap=True, zero=False):
    flags = ["--dp", str(dp), "--tp", str(tp), "--pp", str(pp)]
    flags += ["--sp"] if sp else []
    flags += ["--microbatches", str(microbatches)] if microbatches else []
    flags += [] if overlap else ["--no-overlap"]
    flags += ["--zero"] if zero else []
    name = f"dp{dp} tp{tp} pp{pp}" + (" sp" if sp else "") + (f" m{microbatches}" if microbatches else "") \
        + (" zero1" if zero else "")
    return name, dp * tp * pp, flags, pp, microbatches or pp


def run(quick: bool = False):
    steps = 2 if quick else 6
    max_procs = torch.cuda.device_count() if torch.cuda.is_available() else 8
    rows = []
    base = None

    def measure(section, layout, note=""):
        name, procs, flags, pp, m = layout
        if procs > max_procs:
            return None
        result = _train(flags, steps)
        if result is None:
            return None
        row = {"section": section, "layout": name, "processes": procs, "step_ms": result["step_ms"],
               "tokens_per_s": result["tokens_per_s"],
               "tokens_per_s_vs_1_process": result["tokens_per_s"] / base if base else 1.0,
               "bubble": result["bubble"] if pp > 1 else None,
               "ideal_bubble": ideal_bubble(pp, m) if pp > 1 else None,
               "overlap_speedup": None, "note": note}
        rows.append(row)
        return row

    first = measure("layouts", _layout())
    base = first["tokens_per_s"] if first else None
    layouts = [_layout(dp=2), _layout(tp=2), _layout(tp=2, sp=True), _layout(pp=2, microbatches=4),
               _layout(dp=2, zero=True), _layout(dp=2, tp=2, pp=2, sp=True, microbatches=4)]
    for layout in layouts[:2] if quick else layouts:
        measure("layouts", layout)

    # Overlap on vs off: the same layout, every collective moved outside its matmul/backward.
    for kwargs in ({"tp": 2}, {"tp": 2, "sp": True}, {"dp": 2}):
        on = measure("overlap", _layout(**kwargs), "overlap on")
        off = measure("overlap", _layout(**kwargs, overlap=False), "overlap off")
        if on and off:
            on["overlap_speedup"] = off["step_ms"] / on["step_ms"]   # above 1: the overlap pays
        if quick:
            break

    for m in ((2,) if quick else (2, 4, 8)):
        measure("bubble", _layout(pp=2, microbatches=m))
    return rows
