"""LayerNorm / RMSNorm (+ residual): ours against torch eager and torch.compile of the same math.

One row per (op, shape, residual, pass) with each provider's time side by side, the
ratios ``torch / ours`` and ``compile / ours`` (above 1: ours is faster), and on a GPU our
achieved bandwidth and its fraction of the GPU's HBM bandwidth. On the CPU, ours runs the
reference path, so the ratio to torch eager is the cost of our dispatch.
"""

import torch
import torch.nn.functional as F

from hybridpar_ext import ops
from hybridpar_ext.hardware import gpu_spec

from .runner import PASSES, device, on_gpu, pass_timer, time_ms

EPS = 1e-5


def _eager(kind):
    def layer_norm(x, w, b, r):
        h = x if r is None else x + r
        y = F.layer_norm(h, (h.shape[-1],), w, b, EPS)
        return y if r is None else (y, h)

    def rms_norm(x, w, b, r):
        h = x if r is None else x + r
        y = F.rms_norm(h, (h.shape[-1],), w, EPS)
        return y if r is None else (y, h)

    return layer_norm if kind == "layer_norm" else rms_norm


def _ours(kind):
    if kind == "layer_norm":
        return lambda x, w, b, r: ops.layer_norm(x, w, b, EPS, residual=r)
    return lambda x, w, b, r: ops.rms_norm(x, w, EPS, residual=r)


def _bytes_moved(kind, rows, width, element_size, residual, mode):
    """Bytes an ideal fused kernel must move: every activation read or written once."""
    per_tensor = rows * width * element_size
    fwd = (2 + 2 * residual) * per_tensor            # x (+ r) in, y (+ h) out
    bwd = (3 + residual) * per_tensor                # x, dy (+ dh) in, dx out
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _timer(fn, inputs, mode):
    x, w, b, r = inputs

    def forward():
        out = fn(x, w, b, r)
        return out if isinstance(out, tuple) else (out,)

    return pass_timer(forward, [t for t in inputs if t is not None], mode)


def shapes(quick: bool):
    if on_gpu():
        widths = [1024, 4096, 16384] if quick else [1024, 2048, 4096, 8192, 16384]
        rows = [8192] if quick else [4096, 16384]
        return [(torch.bfloat16, m, n) for m in rows for n in widths]
    # The dispatch-cost case of the CPU target (4096 x 4096 fp32) first.
    if quick:
        return [(torch.float32, 4096, 4096)]
    return [(torch.float32, 4096, 4096), (torch.float32, 1024, 1024), (torch.float32, 2048, 8192)]


def run(quick: bool = False):
    dev = device()
    spec = gpu_spec(torch.cuda.get_device_name()) if on_gpu() else None
    providers = ["ours", "torch"] + (["compile"] if on_gpu() else [])
    results = []
    for kind in ("layer_norm", "rms_norm"):
        for dtype, rows, width in shapes(quick):
            for residual in (False, True):
                torch.manual_seed(0)
                x = torch.randn(rows, width, dtype=dtype, device=dev, requires_grad=True)
                w = torch.randn(width, dtype=dtype, device=dev, requires_grad=True)
                b = (torch.randn(width, dtype=dtype, device=dev, requires_grad=True)
                     if kind == "layer_norm" else None)
                r = (torch.randn(rows, width, dtype=dtype, device=dev, requires_grad=True)
                     if residual else None)
                fns = {"ours": _ours(kind), "torch": _eager(kind)}
                if "compile" in providers:
                    fns["compile"] = torch.compile(_eager(kind), dynamic=False)
                for mode in PASSES:
                    row = {"op": kind, "dtype": str(dtype).replace("torch.", ""), "rows": rows,
                           "width": width, "residual": residual, "pass": mode}
                    for name in providers:
                        row[f"{name}_ms"] = time_ms(_timer(fns[name], (x, w, b, r), mode))
                    for name in providers[1:]:
                        row[f"{name}/ours"] = row[f"{name}_ms"] / row["ours_ms"]
                    if on_gpu():
                        gbps = _bytes_moved(kind, rows, width, x.element_size(), residual,
                                            mode) / row["ours_ms"] / 1e6
                        row["ours_GB/s"] = gbps
                        row["ours_frac_hbm"] = gbps / (spec.hbm_tbps * 1e3) if spec else None
                    results.append(row)
                    print(_progress(results[-1]), flush=True)
    return results


def _progress(row):
    times = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith("_ms"))
    return f"  {row['op']} {row['dtype']} {row['rows']}x{row['width']} res={row['residual']} {row['pass']}: {times}"
