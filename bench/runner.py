"""Shared timing and reporting for the benchmark families.

Each family's ``run()`` returns a list of rows (dicts); :func:`report` prints them as a
Markdown table and writes ``<family>-<tag>.json`` (rows + environment) and ``.md``.
"""

import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch

from hybridpar_ext import build_info
from hybridpar_ext.hardware import gpu_spec

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def on_gpu() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda" if on_gpu() else "cpu")


def time_ms(fn, min_time_s: float = 0.2, max_runs: int = 100) -> float:
    """Median milliseconds per call of `fn`.

    GPU: triton's do_bench (CUDA events, L2 flushed between runs). CPU: wall clock over
    repeated calls after a warm-up, at least 3 runs and about `min_time_s` in all.
    """
    if on_gpu():
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time_s and len(times) < max_runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


PASSES = ("fwd", "bwd", "fwd+bwd")


def pass_timer(forward, leaves, mode):
    """A zero-argument callable running one pass of `forward` (which returns a tuple of
    outputs): the forward without grad, the backward alone over a graph built once, or both."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                forward()
        return run
    grads = [torch.randn_like(o) for o in forward()]
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(forward(), leaves, grads)
    outs = forward()
    return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True)


def peak_memory_mb(fn) -> float:
    """Peak GPU memory allocated during one call of `fn` (0 on the CPU)."""
    if not on_gpu():
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def environment() -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "hybridpar_ext._C": build_info(),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if on_gpu():
        name = torch.cuda.get_device_name()
        spec = gpu_spec(name)
        env.update(gpu=name, cuda=torch.version.cuda,
                   driver=_driver_version(), gpu_spec=spec.__dict__ if spec else None)
    else:
        env["gpu"] = None
    return env


def _driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, IndexError, subprocess.SubprocessError):
        return None


def markdown_table(rows) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(rows[0])
    for row in rows[1:]:
        columns += [c for c in row if c not in columns]

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def report(family: str, rows, out_dir=None, tag=None) -> None:
    env = environment()
    if tag is None:
        tag = "cpu" if env["gpu"] is None else env["gpu"].replace("NVIDIA ", "").split()[0].lower()
    if out_dir is None:
        out_dir = RESULTS if on_gpu() else os.path.join(RESULTS, "local")
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(rows)
    where = env["gpu"] or f"CPU ({env['cpu']}, {env['cpu_threads']} threads)"
    header = (f"# {family} on {where}\n\n{env['date']}; torch {env['torch']}, "
              f"triton {env['triton']}" + (f", CUDA {env['cuda']}, driver {env['driver']}"
                                           if env["gpu"] else "") + "\n\n")
    base = os.path.join(out_dir, f"{family}-{tag}")
    with open(base + ".json", "w") as f:
        json.dump({"family": family, "environment": env, "rows": rows}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(header + table)
    print(header + table)
    print(f"written: {base}.json, {base}.md")
