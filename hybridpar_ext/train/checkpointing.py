"""The trainer's checkpoints: ``--checkpoint-dir DIR --save-every N`` saves, ``--resume``
continues from the newest complete checkpoint in DIR (under any layout), ``--keep K`` keeps
the newest K, ``--async-save`` writes in the background, ``--init-from OUT`` starts from the
weights of an export (:mod:`hybridpar_ext.checkpoint`).

What a checkpoint holds besides the model and the optimizer: the step, the LR schedule's
state and the data position. Batch ``k`` is a pure function of ``(seed, k)`` (and the data
flags), whatever the layout, so the position is the next batch's index, and a run resumed
under another dp sees exactly the batches the uninterrupted run would have seen; the seed and
data flags are checked to be the saved run's.
"""

from pathlib import Path

from ..checkpoint.export import hf_config_dict, is_hf_config, model_description

# Flags that decide which batch k is: a resumed run must keep them (the token-file flags where
# the trainer has them).
DATA_FLAGS = ("seed", "data", "global_batch", "seq", "data_dtype", "eval_data", "eval_fraction")


def add_checkpoint_arguments(p) -> None:
    ck = p.add_argument_group("checkpoints (torch.distributed.checkpoint; any layout loads any other's)")
    ck.add_argument("--checkpoint-dir", metavar="DIR", help="where checkpoints are saved and resumed from")
    ck.add_argument("--save-every", type=int, metavar="N", help="save after every N steps (and the last)")
    ck.add_argument("--resume", action="store_true",
                    help="continue from the newest complete checkpoint in --checkpoint-dir up to --steps")
    ck.add_argument("--keep", type=int, metavar="K", help="keep only the newest K checkpoints (K >= 2)")
    ck.add_argument("--async-save", action="store_true",
                    help="write checkpoints in the background while training goes on")
    ck.add_argument("--init-from", metavar="OUT",
                    help="start from the weights of `python -m hybridpar_ext export` (a directory)")


def _described(args, config):
    """The config a checkpoint describes: ``--model PATH``'s Hugging Face config where the run
    has one (its parameters keep Hugging Face's names), else the GPT's."""
    return getattr(args, "hf_config", None) or config


def check_checkpoint_flags(args, config) -> None:
    """The checkpoint flags against each other and against what DIR holds (ValueError naming
    the flag; reads files only, so every rank reaches the same verdict before any collective)."""
    from ..checkpoint.manager import latest_checkpoint, read_info

    directory = getattr(args, "checkpoint_dir", None)
    for flag in ("save_every", "keep", "async_save", "resume"):
        if getattr(args, flag, None) and not directory:
            raise ValueError(f"--{flag.replace('_', '-')} needs --checkpoint-dir")
    if args.save_every is not None and args.save_every < 1:
        raise ValueError(f"--save-every must be positive, got {args.save_every}")
    if args.keep is not None and args.keep < 2:
        raise ValueError(f"--keep must be at least 2 (a crash while saving must leave one), got {args.keep}")
    if args.resume and args.init_from:
        raise ValueError("--resume and --init-from: pick one (a checkpoint holds the weights already)")
    config = _described(args, config)
    if args.init_from:
        _check_export(args.init_from, config)
    if not directory:
        return
    latest = latest_checkpoint(directory)
    if not args.resume:
        if latest is not None:
            raise ValueError(f"--checkpoint-dir {directory} already holds checkpoints (newest: step {latest[0]}): "
                             "pass --resume to continue that run, or another directory")
        return
    if latest is None:
        raise ValueError(f"--resume: no complete checkpoint in --checkpoint-dir {directory}")
    step, path = latest
    info = read_info(path)
    if info.get("model") != model_description(config):
        raise ValueError(f"--resume: the checkpoint {path} is of another model ({info.get('model')}), "
                         f"not this run's ({model_description(config)})")
    for flag in DATA_FLAGS:
        if info.get("data", {}).get(flag) != _data_value(args, flag):
            raise ValueError(f"--resume: --{flag.replace('_', '-')} {_data_value(args, flag)!r} differs from the "
                             f"checkpointed run's {info.get('data', {}).get(flag)!r}: its batches would not continue")
    if step >= args.steps:
        raise ValueError(f"--resume: the newest checkpoint is of step {step}, and --steps is {args.steps} "
                         "(the total): nothing left to train")


def _data_value(args, flag):
    value = getattr(args, flag, None)
    return str(Path(value).resolve()) if flag in ("data", "eval_data") and value not in (None, "synthetic") else value


def _check_export(path, config) -> None:
    from ..checkpoint.export import read_export_config

    exported = read_export_config(path)
    if exported != model_description(config):
        raise ValueError(f"--init-from: {path} holds another model ({exported}), not this run's "
                         f"({model_description(config)})")


class TrainerCheckpoints:
    """A trainer's checkpoints: built after its stage and optimizer (collective). ``start``: the
    first step to train (after a resume, the step after the checkpoint's)."""

    def __init__(self, trainer):
        from ..checkpoint import Checkpointer, latest_checkpoint

        self.trainer, args = trainer, trainer.args
        self.start = 1
        self.checkpointer = None
        if args.init_from:
            from ..checkpoint.export import load_export

            load_export(args.init_from, trainer.stage, trainer.optimizer)
        if not args.checkpoint_dir:
            return
        self.checkpointer = Checkpointer(args.checkpoint_dir, args.keep, args.async_save, args.timeout)
        if args.resume:
            step, path = latest_checkpoint(args.checkpoint_dir)
            state = self.checkpointer.load(path, trainer.stage, trainer.optimizer, trainer.mesh)
            trainer.lr_schedule.load_state_dict(state["lr_schedule"])
            self.start = state["data"]["next_batch"]
            if trainer.mesh.dp_rank == 0 and trainer.mesh.pp_rank == 0 and trainer.mesh.tp_rank == 0:
                print(f"resumed from {path} (step {step}): training steps {self.start}..{args.steps}", flush=True)

    def after_step(self, step: int) -> None:
        """Save after `step` if it is due (every --save-every steps, and the last step)."""
        args = self.trainer.args
        if self.checkpointer is None:
            return
        self.checkpointer.poll()
        if args.save_every and (step % args.save_every == 0 or step == args.steps):
            trainer = self.trainer
            state = {"step": step, "lr_schedule": trainer.lr_schedule.state_dict(),
                     "data": {"next_batch": step + 1, **{f: _data_value(args, f) for f in DATA_FLAGS}}}
            config = _described(args, trainer.config)
            info = {"model": model_description(config), "data": state["data"],
                    **({"hf_config": hf_config_dict(config)} if is_hf_config(config) else {}),
                    "layout": {"dp": args.dp, "tp": args.tp, "pp": args.pp, "sp": args.sp, "zero": args.zero,
                               "microbatches": args.microbatches}}
            self.checkpointer.save(step, trainer.stage, trainer.optimizer, trainer.mesh, state, info)

    def close(self) -> None:
        """Commit the last asynchronous save (call once training is done)."""
        if self.checkpointer is not None:
            self.checkpointer.wait()
