"""The body of one torchrun process: check the flags, join the process group, train and log."""

import datetime
import os
import sys

import torch
import torch.distributed as dist

from .layout import check_args
from .log import StepLog, header, summary
from .trainer import Trainer


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
    from ..hardware import gpu_spec
    from ..parallel.schedules import formula_bubble

    trainer = Trainer(args, config, device)
    spec = gpu_spec(torch.cuda.get_device_name()) if device.type == "cuda" else None
    gpu_peak = spec.bf16_tflops * 1e12 if spec else None
    flops = config.flops_per_token(args.seq)   # model FLOPs: hybridpar_ext.models.flops
    if rank == 0:
        print(header(args, config, world, device, dist.get_backend()), flush=True)
        if trainer.zero_bubble is not None:
            print(trainer.zero_bubble.describe(), flush=True)
    log = StepLog(args, active=rank == 0)
    records = []
    try:
        for step in range(trainer.checkpoints.start, args.steps + 1):
            record = {"step": step, **trainer.step(step)}
            if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
                record["eval_loss"] = trainer.evaluate()
            record["ideal_bubble"] = formula_bubble(args.schedule, args.pp, args.virtual_stages, args.microbatches)
            if trainer.zero_bubble is not None:   # the holds it runs, not the paper's
                record["ideal_bubble"] = trainer.zero_bubble.bubble
            if device.type == "cuda":
                record["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if gpu_peak:
                record["mfu"] = record["tokens_per_s"] * flops / (gpu_peak * world)
            record.update(layout=f"dp{args.dp} tp{args.tp} pp{args.pp}", sp=args.sp, dtype=args.dtype,
                          schedule=args.schedule, virtual_stages=args.virtual_stages,
                          microbatches=args.microbatches, zero=args.zero, overlap=not args.no_overlap)
            records.append(record)
            log(record)
            trainer.checkpoints.after_step(step)
        trainer.checkpoints.close()
    finally:
        log.close()
    if rank == 0:
        print(summary(args, records), flush=True)
    return 0
