"""What rank 0 prints and writes: the run's header, one line (and one metrics-file record)
per step, and the summary."""

import json
from pathlib import Path


def header(args, config, world: int, device, backend: str) -> str:
    plan = f" (chosen by --plan: {args.plan_choice})" if getattr(args, "plan_choice", None) else ""
    return (f"GPT {config.num_parameters() / 1e6:.2f}M parameters ({config.layers} layers, hidden "
            f"{config.hidden}, heads {config.heads}/{config.kv_heads} kv, ffn {config.ffn}, {config.mlp}, "
            f"{config.norm}) | dp{args.dp} tp{args.tp}{' sp' if args.sp else ''} pp{args.pp} x "
            f"{args.microbatches} microbatches{' zero1' if args.zero else ''}{plan} | {world} "
            f"{'GPUs' if device.type == 'cuda' else 'CPU processes'}, {backend}, {args.dtype} | "
            f"data: {'synthetic' if args.data == 'synthetic' else Path(args.data).name}")


def step_line(args, record: dict) -> str:
    line = (f"step {record['step']:>4}/{args.steps} | loss {record['loss']:.4f} | "
            f"{record['tokens_per_s']:,.0f} tokens/s | step {record['step_time_s'] * 1e3:.1f} ms")
    if "grad_norm" in record:
        line += f" | lr {record['lr']:.3g} | grad norm {record['grad_norm']:.3f}"
    if args.pp > 1:
        line += f" | bubble {record['bubble']:.2f} (ideal {record['ideal_bubble']:.2f})"
    if "eval_loss" in record:
        line += f" | eval loss {record['eval_loss']:.4f}"
    if "memory_gib" in record:
        line += f" | mem {record['memory_gib']:.2f} GiB"
    if "mfu" in record:
        line += f" | MFU {record['mfu']:.1%}"
    return line


def summary(args, records: list) -> str:
    steady = records[1:] or records
    mean = lambda key: sum(r[key] for r in steady) / len(steady)   # noqa: E731
    return (f"done: {args.steps} steps, loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}, "
            f"{mean('tokens_per_s'):,.0f} tokens/s, {mean('step_time_s') * 1e3:.1f} ms/step "
            f"(mean after the first step)")


class StepLog:
    """Rank 0's per-step output: a printed line (unless --quiet) and a --metrics-file record.
    On the other ranks it does nothing."""

    def __init__(self, args, active: bool):
        self.args, self.active = args, active
        self.metrics = open(args.metrics_file, "a") if args.metrics_file and active else None

    def __call__(self, record: dict) -> None:
        if not self.active:
            return
        if not self.args.quiet:
            print(step_line(self.args, record), flush=True)
        if self.metrics:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def close(self) -> None:
        if self.metrics:
            self.metrics.close()
