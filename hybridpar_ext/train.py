"""The trainer: ``python -m hybridpar_ext train --dp 2 --tp 2 --pp 2 ...``.

Started plainly it launches torchrun with the processes the layout needs (passing on
torchrun's multi-node flags); under torchrun every rank checks the configuration (the same
check, so the same message everywhere, before any collective), joins the process group (NCCL
where CUDA is, gloo otherwise), builds the full GPT from ``--seed``, keeps its own part
(:func:`hybridpar_ext.parallel.parallelize`) and trains it with 1F1B over ``--microbatches``,
gradients reduced over DP during backward and AdamW (sharded with ``--zero``).

Every layout with the same flags starts from the same weights and sees the same batches, so
its losses are those of one process.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

DEFAULT_TEXT = Path(__file__).parent / "data" / "coriolanus.txt"
LAUNCH_FLAGS = ("nnodes", "node_rank", "rdzv_endpoint", "rdzv_backend", "rdzv_id", "nproc_per_node")


def add_train_arguments(p) -> None:
    layout = p.add_argument_group("layout (the product of dp, tp, pp is the number of processes)")
    for flag in ("dp", "tp", "pp"):
        layout.add_argument(f"--{flag}", type=int, help="default 1 (or chosen by --plan)")
    layout.add_argument("--sp", action="store_true", help="sequence parallelism (with tp > 1)")
    layout.add_argument("--microbatches", type=int, help="per step and pipeline; default: pp")
    layout.add_argument("--zero", action="store_true", help="shard the optimizer state over DP (ZeRO-1)")
    layout.add_argument("--no-overlap", action="store_true",
                        help="run every collective outside its matmul/backward (to measure the overlap)")
    layout.add_argument("--plan", action="store_true",
                        help="let the planner choose dp, tp, pp, sp and microbatches for the processes")
    model = p.add_argument_group("model")
    model.add_argument("--layers", type=int, default=4)
    model.add_argument("--hidden", type=int, default=128)
    model.add_argument("--heads", type=int, default=4)
    model.add_argument("--kv-heads", type=int, help="default: heads (no GQA)")
    model.add_argument("--ffn", type=int, help="default: 4 * hidden (gelu), 8/3 * hidden (swiglu)")
    model.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    model.add_argument("--vocab", type=int, default=256, help="256 for byte-level text")
    model.add_argument("--norm", choices=("layernorm", "rmsnorm"), default="layernorm")
    model.add_argument("--mlp", choices=("gelu", "swiglu"), default="gelu")
    model.add_argument("--untied", action="store_true", help="separate LM head and embedding")
    run = p.add_argument_group("run")
    run.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step")
    run.add_argument("--steps", type=int, default=20)
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--weight-decay", type=float, default=0.0)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--data", default=str(DEFAULT_TEXT),
                     help="a text file read as bytes, or 'synthetic' (uniform random tokens)")
    run.add_argument("--dtype", choices=("float32", "bfloat16"),
                     help="parameters and activations; default float32 on CPU, bfloat16 on GPU")
    run.add_argument("--metrics-file", help="append one JSON object per step (rank 0)")
    run.add_argument("--timeout", type=float, default=300.0,
                     help="seconds a collective may wait before the job fails")
    run.add_argument("--quiet", action="store_true", help="print only the summary")
    launch = p.add_argument_group("launch (passed on to torchrun)")
    launch.add_argument("--nproc-per-node", type=int, help="default: the layout's world size / nnodes")
    launch.add_argument("--nnodes", type=int, default=1)
    launch.add_argument("--node-rank", type=int, default=0)
    launch.add_argument("--rdzv-endpoint")
    launch.add_argument("--rdzv-backend", default="c10d")
    launch.add_argument("--rdzv-id", default="hybridpar")


def parse_args(argv) -> argparse.Namespace:
    """The trainer's flags alone (for programs that drive :class:`Trainer` themselves)."""
    p = argparse.ArgumentParser(prog="python -m hybridpar_ext train")
    add_train_arguments(p)
    return p.parse_args(list(argv))


def model_config(args):
    from .models import GPTConfig

    return GPTConfig(vocab_size=args.vocab, max_seq_len=args.seq, layers=args.layers, hidden=args.hidden,
                     heads=args.heads, kv_heads=args.kv_heads, ffn=args.ffn, norm=args.norm, mlp=args.mlp,
                     tied_embeddings=not args.untied)


def choose_layout(args, config, world: int) -> None:
    """Fill dp, tp, pp, sp and microbatches: from the flags, or from the planner (--plan)."""
    if args.plan:
        given = [f"--{k}" for k in ("dp", "tp", "pp", "microbatches") if getattr(args, k) is not None]
        if given:
            raise ValueError(f"--plan chooses the layout; drop {', '.join(given)}")
        from .hardware import gpu_spec
        from .parallel import check_parallel_config
        from .plan import ClusterSpec, ModelSpec, PlanError, plan

        # The GPU this runs on if its datasheet is known; H100 figures otherwise (on a CPU too).
        spec = gpu_spec(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
        per_node = world // args.nnodes
        cluster = ClusterSpec(world, per_node, spec) if spec else ClusterSpec.of("h100", world, per_node)
        try:
            result = plan(ModelSpec.from_gpt_config(config, seq=args.seq), cluster, args.global_batch, top=1000)
        except PlanError as err:
            raise ValueError(f"--plan: {err}") from err
        for pred in result.best:
            lay = pred.layout
            if lay.recompute != "none" or lay.virtual_stages > 1:
                continue   # this trainer neither recomputes activations nor interleaves stages
            try:
                check_parallel_config(config, lay.dp, lay.tp, lay.pp, lay.sequence_parallel, args.seq,
                                      lay.microbatches, args.global_batch)
            except ValueError:
                continue
            args.dp, args.tp, args.pp = lay.dp, lay.tp, lay.pp
            args.sp, args.microbatches, args.zero = lay.sequence_parallel, lay.microbatches, lay.zero1
            args.plan_choice = f"{lay.describe()} (planner's model of {world} x {cluster.gpu.name})"
            return
        raise ValueError(f"--plan: none of the planner's {len(result.best)} layouts for {world} processes "
                         "fits this model's divisibility rules")
    args.dp, args.tp, args.pp = args.dp or 1, args.tp or 1, args.pp or 1
    if args.microbatches is None:
        args.microbatches = args.pp


def check_args(args, world: int):
    """The whole configuration against the world size; ValueError with the first problem."""
    from .parallel import check_parallel_config

    config = model_config(args)
    choose_layout(args, config, world)
    if args.dp * args.tp * args.pp != world:
        raise ValueError(f"dp * tp * pp = {args.dp} * {args.tp} * {args.pp} = {args.dp * args.tp * args.pp} "
                         f"processes, but the world size is {world}")
    if args.sp and args.tp == 1:
        args.sp = False   # nothing to split over
    check_parallel_config(config, args.dp, args.tp, args.pp, args.sp, args.seq, args.microbatches,
                          args.global_batch)
    for name in ("steps", "global_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.data != "synthetic":
        size = Path(args.data).stat().st_size if Path(args.data).is_file() else None
        if size is None:
            raise ValueError(f"--data: no such file {args.data!r} (or pass 'synthetic')")
        if size <= args.seq + 1:
            raise ValueError(f"--data: {args.data} has {size} bytes, fewer than a sequence ({args.seq + 1})")
        if args.vocab < 256:
            raise ValueError(f"--data: byte-level text needs --vocab >= 256, got {args.vocab}")
    return config


class Batches:
    """Global batches of ``(global_batch, seq + 1)`` tokens, a pure function of (seed, step):
    random windows of a byte string, or uniform random tokens."""

    def __init__(self, data: str, vocab: int, seq: int, global_batch: int, seed: int):
        self.seq, self.global_batch, self.seed, self.vocab = seq, global_batch, seed, vocab
        self.text = None
        if data != "synthetic":
            self.text = torch.frombuffer(bytearray(Path(data).read_bytes()), dtype=torch.uint8).long()

    def __call__(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        if self.text is None:
            return torch.randint(0, self.vocab, (self.global_batch, self.seq + 1), generator=gen)
        starts = torch.randint(0, self.text.numel() - self.seq - 1, (self.global_batch,), generator=gen)
        return torch.stack([self.text[s:s + self.seq + 1] for s in starts.tolist()])


def flops_per_token(config, seq: int) -> float:
    """Training FLOPs per token: 6 per weight of every matmul (the projections, the MLP and the
    LM head; not the embedding lookup or the norms) and the causal attention's scores and
    values (half of 12 * layers * hidden * seq)."""
    h, kv = config.hidden, config.kv_heads * config.head_dim
    mlp = (3 if config.mlp == "swiglu" else 2) * h * config.ffn
    matmul_weights = config.layers * (h * (h + 2 * kv) + h * h + mlp) + config.vocab_size * h
    return 6 * matmul_weights + 6 * config.layers * h * seq


class Trainer:
    """This rank's part of a run: built from parsed flags on an initialised process group."""

    def __init__(self, args, config, device):
        from .models import GPT
        from .parallel import GradientSync, PipelineSchedule, ZeroAdamW, init_mesh, parallelize

        self.args, self.config, self.device = args, config, device
        self.mesh = init_mesh(dp=args.dp, tp=args.tp, pp=args.pp, device_type=device.type,
                              timeout=args.timeout)
        dtype = getattr(torch, args.dtype)
        torch.manual_seed(args.seed)
        full = GPT(config)   # the same full weights on every rank; each keeps its part
        self.stage = parallelize(full, self.mesh, sequence_parallel=args.sp, overlap=not args.no_overlap,
                                 device=device, dtype=dtype)
        del full
        self.sync = GradientSync(self.stage, self.mesh.dp_group, zero=args.zero, overlap=not args.no_overlap)
        if args.zero:
            self.optimizer = ZeroAdamW(self.sync, lr=args.lr, weight_decay=args.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.stage.parameters(), lr=args.lr,
                                               weight_decay=args.weight_decay)
        self.schedule = PipelineSchedule(self.stage, self.mesh.pp_group, args.microbatches,
                                         no_sync=self.sync.no_sync)
        self.batches = Batches(args.data, config.vocab_size, args.seq, args.global_batch, args.seed)

    def microbatches(self, step: int):
        tokens = self.batches(step).to(self.device)
        rows = tokens.chunk(self.mesh.dp)[self.mesh.dp_rank]
        return list(rows[:, :-1].chunk(self.args.microbatches)), list(rows[:, 1:].chunk(self.args.microbatches))

    def step(self, step: int) -> dict:
        """One optimizer step; returns the global loss and this step's timings (same on every rank)."""
        start = time.perf_counter()
        inputs, targets = self.microbatches(step)
        self.optimizer.zero_grad()
        stats = self.schedule.step(inputs, targets)
        self.sync.finish()
        self.stage.finish_grads()
        self.optimizer.step()
        # Loss from one TP rank of each last stage, averaged over DP; the pipeline bubble
        # averaged over the ranks. One small collective.
        counts = self.stage.is_last and self.mesh.tp_rank == 0
        report = torch.tensor([stats.loss if counts else 0.0, stats.bubble], dtype=torch.float64,
                              device=self.device)
        dist.all_reduce(report)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        tokens = self.args.global_batch * self.args.seq
        return {"loss": report[0].item() / self.mesh.dp, "step_time_s": elapsed,
                "tokens_per_s": tokens / elapsed, "bubble": report[1].item() / dist.get_world_size()}


def _log(args, record: dict):
    line = (f"step {record['step']:>4}/{args.steps} | loss {record['loss']:.4f} | "
            f"{record['tokens_per_s']:,.0f} tokens/s | step {record['step_time_s'] * 1e3:.1f} ms")
    if args.pp > 1:
        line += f" | bubble {record['bubble']:.2f} (ideal {record['ideal_bubble']:.2f})"
    if "memory_gib" in record:
        line += f" | mem {record['memory_gib']:.2f} GiB"
    if "mfu" in record:
        line += f" | MFU {record['mfu']:.1%}"
    if not args.quiet:
        print(line, flush=True)


def run_rank(args) -> int:
    """The body of one torchrun process."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        config = check_args(args, world)
    except (ValueError, OSError) as err:
        print(f"[rank {rank}] error: {err}", file=sys.stderr, flush=True)
        return 2
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout),
                            **({"device_id": device} if cuda else {}))
    try:
        return _train(args, config, device, rank, world)
    finally:
        dist.destroy_process_group()


def _train(args, config, device, rank, world) -> int:
    from .hardware import gpu_spec
    from .parallel import ideal_bubble

    trainer = Trainer(args, config, device)
    spec = gpu_spec(torch.cuda.get_device_name()) if device.type == "cuda" else None
    gpu_peak = spec.bf16_tflops * 1e12 if spec else None
    flops = flops_per_token(config, args.seq)
    if rank == 0:
        plan = f" (chosen by --plan: {args.plan_choice})" if getattr(args, "plan_choice", None) else ""
        print(f"GPT {config.num_parameters() / 1e6:.2f}M parameters ({config.layers} layers, hidden "
              f"{config.hidden}, heads {config.heads}/{config.kv_heads} kv, ffn {config.ffn}, {config.mlp}, "
              f"{config.norm}) | dp{args.dp} tp{args.tp}{' sp' if args.sp else ''} pp{args.pp} x "
              f"{args.microbatches} microbatches{' zero1' if args.zero else ''}{plan} | {world} "
              f"{'GPUs' if device.type == 'cuda' else 'CPU processes'}, {dist.get_backend()}, {args.dtype} | "
              f"data: {'synthetic' if args.data == 'synthetic' else Path(args.data).name}", flush=True)
    metrics = open(args.metrics_file, "a") if args.metrics_file and rank == 0 else None
    records = []
    try:
        for step in range(1, args.steps + 1):
            record = {"step": step, **trainer.step(step)}
            record["ideal_bubble"] = ideal_bubble(args.pp, args.microbatches)
            if device.type == "cuda":
                record["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if gpu_peak:
                record["mfu"] = record["tokens_per_s"] * flops / (gpu_peak * world)
            record.update(layout=f"dp{args.dp} tp{args.tp} pp{args.pp}", sp=args.sp,
                          microbatches=args.microbatches, zero=args.zero, overlap=not args.no_overlap)
            records.append(record)
            if rank == 0:
                _log(args, record)
                if metrics:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
    finally:
        if metrics:
            metrics.close()
    if rank == 0:
        steady = records[1:] or records
        mean = lambda key: sum(r[key] for r in steady) / len(steady)   # noqa: E731
        print(f"done: {args.steps} steps, loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}, "
              f"{mean('tokens_per_s'):,.0f} tokens/s, {mean('step_time_s') * 1e3:.1f} ms/step "
              f"(mean after the first step)", flush=True)
    return 0


def launch(args, argv) -> int:
    """Not under torchrun: start it with this command line, one process per rank."""
    if args.nproc_per_node is None:
        if args.plan:
            raise ValueError("--plan: give --nproc-per-node (the processes to plan for)")
        world = (args.dp or 1) * (args.tp or 1) * (args.pp or 1)
        if world % args.nnodes:
            raise ValueError(f"dp * tp * pp = {world} processes do not divide over --nnodes {args.nnodes}")
        args.nproc_per_node = world // args.nnodes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc_per_node)]
    if args.nnodes > 1 or args.rdzv_endpoint:
        cmd += ["--nnodes", str(args.nnodes), "--node-rank", str(args.node_rank),
                "--rdzv-backend", args.rdzv_backend, "--rdzv-id", args.rdzv_id,
                "--rdzv-endpoint", args.rdzv_endpoint or "localhost:29500"]
    else:
        cmd += ["--standalone"]
    cmd += ["-m", "hybridpar_ext", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1" if args.nproc_per_node > 1 else str(torch.get_num_threads()))
    return subprocess.call(cmd, env=env)


def main(args, argv) -> int:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return run_rank(args)
    try:
        return launch(args, argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _losses(path: str) -> dict:
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in records}


def _max_relative_gap(a: dict, b: dict, steps) -> tuple:
    gaps = {s: abs(a[s]["loss"] - b[s]["loss"]) / abs(b[s]["loss"]) for s in steps}
    worst = max(gaps, key=gaps.get)
    return gaps[worst], worst


def compare_runs(path_a: str, path_b: str, noise: str = None, exact_steps: int = 5, rtol: float = 1e-5) -> int:
    """The one-line verdict on two metrics files of the same training (run `a`, reference `b`).

    Training amplifies rounding: two runs that differ only in the order of their sums agree
    to fp32 precision for the first steps, then drift apart (each Adam update divides by a
    gradient's root mean square, so tiny differences in small gradients grow). So the losses
    must agree within `rtol` for the first `exact_steps` steps, and afterwards by no more than
    twice the drift between `noise` (the reference's training with only its summation order
    changed) and `b`."""
    a, b = _losses(path_a), _losses(path_b)
    steps = sorted(set(a) & set(b))
    if not steps:
        print(f"verdict: no common steps in {path_a} and {path_b}")
        return 1
    early_gap, early_step = _max_relative_gap(a, b, steps[:exact_steps])
    gap, worst = _max_relative_gap(a, b, steps)
    ok = early_gap <= rtol
    parts = [f"the first {min(exact_steps, len(steps))} steps agree to {early_gap:.1e} (fp32 tolerance {rtol:.0e})"]
    if noise:
        floor, _ = _max_relative_gap(_losses(noise), b, steps)
        ok = ok and gap <= max(2 * floor, rtol)
        parts.append(f"over {len(steps)} steps at most {gap:.1e} apart (step {worst}), against a drift of "
                     f"{floor:.1e} from the summation order alone")
    else:
        ok = ok and gap <= rtol
        parts.append(f"over {len(steps)} steps at most {gap:.1e} apart (step {worst})")
    last = steps[-1]
    head = f"{a[last]['layout']}{' sp' if a[last].get('sp') else ''} vs {b[last]['layout']}"
    print(f"verdict: {'MATCH' if ok else 'MISMATCH'} - {head}: " + "; ".join(parts)
          + f"; loss {b[steps[0]]['loss']:.4f} -> {a[last]['loss']:.4f} vs {b[last]['loss']:.4f}")
    return 0 if ok else 1
