"""The run's configuration: the model from the flags, the layout (from the flags or the
planner's ``--plan``), and the whole of it checked against the world size. Pure functions of
the flags, so every rank (and the launching process) reaches the same verdict."""

from pathlib import Path

import torch

from .lr_schedule import check_schedule
from .token_data import is_token_file, train_and_eval_batches


def model_config(args):
    from ..models import GPTConfig

    if getattr(args, "model", "gpt") != "gpt":   # a Hugging Face directory: its shapes, as a GPTConfig
        from ..parallel.plans.llama import trainer_config
        return trainer_config(args)

    return GPTConfig(vocab_size=args.vocab, max_seq_len=args.seq, layers=args.layers, hidden=args.hidden,
                     heads=args.heads, kv_heads=args.kv_heads, ffn=args.ffn, norm=args.norm, mlp=args.mlp,
                     tied_embeddings=not args.untied)


def choose_layout(args, config, world: int) -> None:
    """Fill dp, tp, pp, sp and microbatches: from the flags, or from the planner (--plan)."""
    if args.plan:
        given = [f"--{k.replace('_', '-')}" for k in ("dp", "tp", "pp", "microbatches", "recompute", "virtual_stages",
                                                      "schedule") if getattr(args, k, None) is not None]
        if given:
            raise ValueError(f"--plan chooses the layout; drop {', '.join(given)}")
        from ..hardware import gpu_spec
        from ..parallel import check_parallel_config
        from ..plan import ClusterSpec, ModelSpec, PlanError, plan

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
            try:
                check_parallel_config(config, lay.dp, lay.tp, lay.pp, lay.sequence_parallel, args.seq,
                                      lay.microbatches, args.global_batch)
                if lay.pp > 1:   # its schedule (1f1b, interleaved, zero-bubble: the trainer's names)
                    check_pipeline_schedule(config, lay.schedule, lay.pp, lay.virtual_stages, lay.microbatches)
            except ValueError:
                continue
            args.virtual_stages = lay.virtual_stages
            args.schedule = lay.schedule
            args.dp, args.tp, args.pp = lay.dp, lay.tp, lay.pp
            args.sp, args.microbatches, args.zero = lay.sequence_parallel, lay.microbatches, lay.zero1
            args.recompute = lay.recompute
            args.plan_choice = f"{lay.describe()} (planner's model of {world} x {cluster.gpu.name})"
            return
        raise ValueError(f"--plan: none of the planner's {len(result.best)} layouts for {world} processes "
                         "fits this model's divisibility rules")
    args.dp, args.tp, args.pp = args.dp or 1, args.tp or 1, args.pp or 1
    if args.microbatches is None:
        args.microbatches = args.pp
    if args.recompute is None:
        args.recompute = "none"
    args.virtual_stages = getattr(args, "virtual_stages", None) or 1
    if getattr(args, "schedule", None) is None:
        args.schedule = "interleaved" if args.virtual_stages > 1 else "1f1b"


def check_pipeline_schedule(config, schedule: str, pp: int, virtual_stages: int, microbatches: int) -> None:
    """The schedule against the pipeline, the microbatches and the model's layers (ValueError
    naming the flags and what would work)."""
    from ..parallel.schedules import check_schedule, chunk_layers

    try:
        check_schedule(schedule, pp, virtual_stages, microbatches)
        chunk_layers(config.layers, pp, virtual_stages, 0)
    except ValueError as err:
        raise ValueError(f"--schedule {schedule} --virtual-stages {virtual_stages}: {err}") from None


def check_args(args, world: int):
    """The whole configuration against the world size; ValueError with the first problem."""
    from ..parallel import check_parallel_config

    config = model_config(args)
    choose_layout(args, config, world)
    if args.dp * args.tp * args.pp != world:
        raise ValueError(f"dp * tp * pp = {args.dp} * {args.tp} * {args.pp} = {args.dp * args.tp * args.pp} "
                         f"processes, but the world size is {world}")
    if args.sp and args.tp == 1:
        args.sp = False   # nothing to split over
    check_parallel_config(config, args.dp, args.tp, args.pp, args.sp, args.seq, args.microbatches,
                          args.global_batch)
    if getattr(args, "hf_config", None) is not None:   # --model PATH: what our kernels and its plan need
        from ..parallel.plans.llama import check_decoder_config
        check_decoder_config(args.hf_config, args.dp, args.tp, args.pp, args.sp, args.seq)
    check_pipeline_schedule(config, args.schedule, args.pp, args.virtual_stages, args.microbatches)
    if args.zero and args.dtype == "float64":
        # ZeroAdamW keeps float32 master weights and moments: float64 would be rounded to them.
        raise ValueError("--zero keeps float32 master weights, which would round a --dtype float64 run; "
                         "drop --zero or train in float32")
    for name in ("steps", "global_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    check_training_flags(args)
    from .checkpointing import check_checkpoint_flags
    check_checkpoint_flags(args, config)   # --checkpoint-dir, --resume, --init-from against the files
    if args.data != "synthetic" and not is_token_file(args.data):
        size = Path(args.data).stat().st_size if Path(args.data).is_file() else None
        if size is None:
            raise ValueError(f"--data: no such file {args.data!r} (or pass 'synthetic')")
        if size <= args.seq + 1:
            raise ValueError(f"--data: {args.data} has {size} bytes, fewer than a sequence ({args.seq + 1})")
        if args.vocab < 256:
            raise ValueError(f"--data: byte-level text needs --vocab >= 256, got {args.vocab}")
    return config


def check_training_flags(args) -> None:
    """The schedule, clipping, data and precision flags (ValueError naming the flag)."""
    check_schedule(args.lr, args.steps, args.warmup_steps, args.lr_decay, args.min_lr)
    if args.clip_grad is not None and not args.clip_grad > 0:
        raise ValueError(f"--clip-grad must be positive, got {args.clip_grad}")
    if args.grad_reduce_dtype == "bfloat16" and args.zero:
        raise ValueError("--grad-reduce-dtype bfloat16 cannot be used with --zero (its slices are reduce-scattered "
                         "in the gradients' float32)")
    for name in ("eval_every", "eval_batches"):
        if getattr(args, name) < (0 if name == "eval_every" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be {'non-negative' if name == 'eval_every' else 'positive'}, "
                             f"got {getattr(args, name)}")
    if args.eval_every and not is_token_file(args.data):
        raise ValueError(f"--eval-every needs a token file --data PATH.bin, got --data {args.data}")
    if not 0 < args.eval_fraction < 1:
        raise ValueError(f"--eval-fraction must be in (0, 1), got {args.eval_fraction}")
    if is_token_file(args.data):
        train_and_eval_batches(args, args.vocab)   # opens the files: ValueError naming the flag if unfit
