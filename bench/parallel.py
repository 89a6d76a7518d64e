"""The GPT trainer per layout: step time and tokens/s, what the overlap of communication buys
(tensor parallelism with and without sequence parallelism, data parallelism), and the
pipeline bubble measured against the ideal ``(p - 1) / (m + p - 1)``; and the pipeline
schedules (1F1B, interleaved 1F1B, ZB-H1) at p = 2 and 4 on gloo, their measured bubble
against the simulator's and the published formulas; and a Hugging Face LLaMA of the same
shapes trained by ``train --model DIR`` per layout against one process, beside transformers'
own tensor parallelism (``tp_plan="auto"``) on the same model and batches where the installed
transformers can run it (else its row says why, with no numbers).

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

import time

import torch

from hybridpar_ext.parallel import ideal_bubble

MODEL = ["--layers", "4", "--hidden", "256", "--heads", "4", "--seq", "128", "--global-batch", "8",
         "--data", "synthetic"]
WARMUP = 2


def _train(flags, steps, model=MODEL):
    """Median step time (s), tokens/s and bubble of one training run, or None if it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "metrics.jsonl")
        out = subprocess.run([sys.executable, "-m", "hybridpar_ext", "train", *model, *flags,
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


# ------------------------------------------------------------------ pipeline schedules
# Stages of equal cost whatever the machine: each virtual stage's forward, input backward and
# weight backward hold its process for a fixed time (a sleep; a chunk of v per rank 1/v of it),
# so that p processes on a few shared cores still measure the schedule and the executor (its
# point-to-point and bookkeeping), not the contention for the cores.
STAGE_MS = 12.0
SCHEDULE_MICROBATCHES = 8


class _FixedCost(torch.autograd.Function):
    """Identity holding the process `f` s in forward, `b` s in backward and `w` s in the weight
    backward (deferred to the W action when the pipeline records one)."""

    @staticmethod
    def forward(ctx, x, f, b, w, target):
        time.sleep(f)
        ctx.b, ctx.w, ctx.target = b, w, target
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.b)
        if ctx.target is not None:
            store, key = ctx.target
            store.add(key, lambda: time.sleep(ctx.w))
        else:
            time.sleep(ctx.w)
        return grad, None, None, None, None


class _SleepStage(torch.nn.Module):
    """Virtual stage `index` of `count`: a small deferrable linear (so the graph has a weight
    gradient to defer) and the fixed cost."""

    def __init__(self, index, count, cost_s):
        super().__init__()
        from hybridpar_ext.parallel.weight_grad import DeferrableLinear

        self.linear = DeferrableLinear(8, 8)
        self.cost_s = cost_s
        self.is_first, self.is_last = index == 0, index == count - 1

    def forward(self, inputs):
        from hybridpar_ext.parallel.weight_grad import recording

        x = self.linear(inputs if self.is_first else inputs[0])
        y = _FixedCost.apply(x, self.cost_s, self.cost_s, self.cost_s, recording())
        return y if self.is_last else (y,)

    def loss(self, out, target):
        return ((out - target) ** 2).mean()

    def activation_shape(self, microbatch, seq):
        return (1, microbatch, seq, 8)


def _peak_activations(rank, world, kind, v, m):
    """This rank's measured peak activation bytes (saved for backward, plus what zero bubble's
    W work holds) in one step of a small GPT, 4 layers per rank (4 / v per model chunk) whatever
    the schedule, so that the schedules compare on the same model."""
    from hybridpar_ext.models import GPT, GPTConfig
    from hybridpar_ext.parallel import build_stage, init_mesh
    from hybridpar_ext.parallel.activation_memory import ActivationMeter
    from hybridpar_ext.parallel.pipeline import PipelineSchedule, build_chunks

    mesh = init_mesh(dp=1, tp=1, pp=world)
    config = GPTConfig(vocab_size=80, max_seq_len=16, hidden=64, heads=4, kv_heads=2, ffn=96,
                       layers=4 * world, tied_embeddings=False)
    torch.manual_seed(0)
    full = GPT(config)
    chunks = build_chunks(lambda ids, first, last: build_stage(full, mesh, ids, first, last), config.layers, world,
                          v, rank)
    pipe = PipelineSchedule(chunks, mesh.pp_group, m, schedule=kind)
    tokens = torch.randint(0, config.vocab_size, (2 * m, 17), generator=torch.Generator().manual_seed(1))
    meter = ActivationMeter()
    with meter.measure(chunks.parameters(), pipe.store):
        pipe.step(list(tokens[:, :-1].chunk(m)), list(tokens[:, 1:].chunk(m)))
    return meter.peak


def _schedule_bubbles(rank, world, steps):
    """On each rank: the median measured bubble of each schedule, and the simulator's."""
    import torch.distributed as dist

    from hybridpar_ext.parallel.pipeline import PipelineSchedule, build_chunks

    m = SCHEDULE_MICROBATCHES
    out = {}
    for kind, v in (("1f1b", 1), ("interleaved", 2), ("zero-bubble", 1)):
        cost = STAGE_MS / 1e3 / v
        chunks = build_chunks(lambda ids, first, last: _SleepStage(ids[0], world * v, cost), world * v, world, v,
                              rank)
        pipe = PipelineSchedule(chunks, dist.group.WORLD, m, schedule=kind)
        x, y = [torch.randn(2, 4, 8) for _ in range(m)], [torch.randn(2, 4, 8) for _ in range(m)]
        bubbles = []
        for _ in range(steps + 1):   # the first step warms up
            dist.barrier()
            bubbles.append(pipe.step(x, y).bubble)
        out[kind] = {"measured": statistics.median(bubbles[1:]), "predicted": pipe.predicted.bubbles[rank],
                     "v": v, "peak_activations": _peak_activations(rank, world, kind, v, m)}
    return out


def schedule_rows(steps: int):
    """Measured bubble (mean over ranks) of 1F1B, interleaved 1F1B (v = 2) and ZB-H1 at p = 2
    and 4, m = 8, F = B = W per stage, against the simulator and the formula."""
    from hybridpar_ext.parallel.schedules import formula_bubble
    from hybridpar_ext.testing import run_ranks

    rows = []
    for p in (2, 4):
        try:
            per_rank = run_ranks(_schedule_bubbles, p, timeout=300, steps=steps)
        except AssertionError as err:
            print(f"bench parallel: schedules at p={p} failed:\n{str(err)[-2000:]}", file=sys.stderr)
            continue
        for kind, first in per_rank[0].items():
            v = first["v"]
            measured = statistics.mean(r[kind]["measured"] for r in per_rank)
            rows.append({"section": "schedules", "layout": f"pp{p}" + (f" v{v}" if v > 1 else ""),
                         "schedule": kind, "processes": p, "microbatches": SCHEDULE_MICROBATCHES,
                         "bubble": measured,
                         "simulated_bubble": statistics.mean(r[kind]["predicted"] for r in per_rank),
                         "formula_bubble": formula_bubble(kind, p, v, SCHEDULE_MICROBATCHES),
                         # The pipeline's peak (its busiest rank), on a small GPT: see _peak_activations;
                         # and each rank's, which says where it sits (ZB-H1: rank 0 runs 1F1B's list,
                         # the later ranks keep their held-back W's).
                         "peak_activation_kb": max(r[kind]["peak_activations"] for r in per_rank) / 1024,
                         "peak_activation_kb_by_rank": " · ".join(f"{r[kind]['peak_activations'] / 1024:.0f}"
                                                                 for r in per_rank),
                         "note": f"F = B = W = {STAGE_MS:g} ms per stage (fixed), gloo; "
                                 "peak activations: a GPT of 4 layers per rank, the busiest rank"})
    return rows


# ------------------------------------------------------------------ a Hugging Face LLaMA
# The same shapes as MODEL, as a LLaMA (GQA 4:2), trained by ``train --model DIR``; and, on
# the same model, weights and batches, transformers' own tensor parallelism
# (``from_pretrained(DIR, tp_plan="auto")``, DTensor) at tp 2, timed the same way.
HF_SEQ, HF_BATCH = 128, 8


def _write_llama(directory):
    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=HF_SEQ)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)


def _transformers_tp_plan(rank, world, path, steps):
    """On each rank: the median step time (s) of transformers' tp_plan training the model in
    `path` with torch AdamW on the trainer's synthetic batches (seed 0), or why it cannot run."""
    import transformers
    import torch.distributed as dist

    from hybridpar_ext.train import Batches

    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
    except Exception as err:   # reported as the row's reason, never as a number
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    batches = Batches("synthetic", model.config.vocab_size, HF_SEQ, HF_BATCH, 0)
    times = []
    try:
        for step in range(1, steps + WARMUP + 1):
            tokens = batches(step)
            dist.barrier()
            start = time.perf_counter()
            optimizer.zero_grad()
            model(tokens[:, :-1], labels=tokens[:, :-1].contiguous()).loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    return {"step_s": statistics.median(times[WARMUP:])}


def hf_rows(steps: int, max_procs: int, base=None):
    """tokens/s of a Hugging Face LLaMA per layout against one process, and transformers'
    tp_plan against ours at tp 2."""
    from hybridpar_ext.testing import run_ranks

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "llama")
        _write_llama(path)
        model = ["--model", path, "--seq", str(HF_SEQ), "--global-batch", str(HF_BATCH), "--data", "synthetic"]
        for dp, tp, pp in ((1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)):
            if dp * tp * pp > max_procs:
                continue
            name, procs, flags, pp_, m = _layout(dp=dp, tp=tp, pp=pp)
            result = _train(flags, steps, model)
            if result is None:
                continue
            if procs == 1:
                base = result["tokens_per_s"]
            rows.append({"section": "hf llama", "layout": name, "processes": procs, "step_ms": result["step_ms"],
                         "tokens_per_s": result["tokens_per_s"],
                         "tokens_per_s_vs_1_process": result["tokens_per_s"] / base if base else None,
                         "bubble": result["bubble"] if pp > 1 else None, "note": "train --model (ours)"})
        if 2 > max_procs:
            return rows
        ours = next((r for r in rows if r["layout"] == "dp1 tp2 pp1"), None)
        row = {"section": "hf llama", "layout": "tp2 (transformers tp_plan)", "processes": 2,
               "step_ms": None, "tokens_per_s": None, "tokens_per_s_vs_1_process": None, "bubble": None}
        try:
            per_rank = run_ranks(_transformers_tp_plan, 2, timeout=300, path=path, steps=steps)
        except AssertionError as err:
            per_rank = [{"error": str(err).strip().splitlines()[-1][:200]}]
        errors = [r["error"] for r in per_rank if "error" in r]
        if errors:
            row["note"] = f"transformers {__import__('transformers').__version__} tp_plan did not run here: {errors[0]}"
        else:
            step_s = max(r["step_s"] for r in per_rank)
            row.update(step_ms=step_s * 1e3, tokens_per_s=HF_BATCH * HF_SEQ / step_s,
                       tokens_per_s_vs_1_process=HF_BATCH * HF_SEQ / step_s / base if base else None,
                       note=f"transformers {__import__('transformers').__version__} tp_plan='auto' (DTensor), "
                            "same model, weights and batches"
                            + (f"; ours at tp2: {ours['tokens_per_s'] / (HF_BATCH * HF_SEQ / step_s):.2f}x its "
                               "tokens/s" if ours else ""))
        rows.append(row)
    return rows


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
    rows += schedule_rows(steps=2 if quick else 5)
    rows += hf_rows(steps, max_procs)
    return rows
