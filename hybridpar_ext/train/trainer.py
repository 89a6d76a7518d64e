"""The Trainer: this rank's part of a run (its stage of the GPT, gradient sync, optimizer and
pipeline schedule), one optimizer step at a time."""

import os
import time

import torch
import torch.distributed as dist

from .checkpointing import TrainerCheckpoints
from .data import Batches
from .evaluate import pipeline_eval_loss
from .lr_schedule import LRSchedule
from .precision import apply_mixed_precision
from .recompute import apply_recompute
from .token_data import is_token_file, train_and_eval_batches
from .zero_bubble import plan_zero_bubble


class Trainer:
    """This rank's part of a run: built from parsed flags on an initialised process group."""

    def __init__(self, args, config, device):
        from ..models import GPT
        from ..parallel import GradientSync, PipelineSchedule, ZeroAdamW, build_stage, init_mesh, parallelize
        from ..parallel.pipeline import build_chunks
        from ..parallel.clip import GradClipper

        self.args, self.config, self.device = args, config, device
        self.mesh = init_mesh(dp=args.dp, tp=args.tp, pp=args.pp, device_type=device.type,
                              timeout=args.timeout)
        dtype = getattr(torch, args.dtype)
        torch.manual_seed(args.seed)
        if getattr(args, "hf_config", None) is not None:   # --model PATH: the Hugging Face decoder's stages
            from ..parallel.plans.llama import trainer_builders
            parallelize, build_stage, full = trainer_builders(args.model, args.hf_config, args.seed)
        else:
            full = GPT(config)   # the same full weights on every rank; each keeps its part
        # bf16 runs keep float32 parameters (the master weights) and compute in bf16.
        mixed = dtype == torch.bfloat16
        built = dict(sequence_parallel=args.sp, overlap=not args.no_overlap, device=device,
                     dtype=torch.float32 if mixed else dtype)
        virtual_stages = getattr(args, "virtual_stages", None) or 1
        if virtual_stages > 1:   # interleaved: this rank's chunks, one module to what follows
            self.stage = build_chunks(lambda ids, first, last: build_stage(full, self.mesh, ids, first, last, **built),
                                      config.layers, args.pp, virtual_stages, self.mesh.pp_rank)
        else:
            self.stage = parallelize(full, self.mesh, **built)
        del full
        if mixed:
            for chunk in (self.stage if virtual_stages > 1 else [self.stage]):
                apply_mixed_precision(chunk, dtype)
        apply_recompute(self.stage, args.recompute)
        schedule = getattr(args, "schedule", None) or ("interleaved" if virtual_stages > 1 else "1f1b")
        self.zero_bubble = None
        if schedule == "zero-bubble" and args.pp > 1:
            # Each rank's held-back W's from what its stage measures, so that the run's peak
            # activation memory stays within 1F1B's (before the DP reducer's hooks exist).
            self.zero_bubble = plan_zero_bubble(self.stage, self.mesh, args.microbatches,
                                                args.global_batch // args.dp // args.microbatches, args.seq,
                                                config.vocab_size, args.seed)
            schedule = self.zero_bubble.lists
        _perturb_gradient_for_tests(self.stage)
        # float64 runs (the exact layout comparison) reduce in float64: a float32 reduction would
        # round their gradients by ~1e-8 and make them differ from one process.
        reduce_dtype = torch.float64 if dtype == torch.float64 else getattr(torch, args.grad_reduce_dtype)
        self.sync = GradientSync(self.stage, self.mesh.dp_group, zero=args.zero, overlap=not args.no_overlap,
                                 reduce_dtype=reduce_dtype)
        if args.zero:
            self.optimizer = ZeroAdamW(self.sync, lr=args.lr, weight_decay=args.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(self.stage.parameters(), lr=args.lr,
                                               weight_decay=args.weight_decay)
        self.lr_schedule = LRSchedule(args.lr, args.steps, args.warmup_steps, args.lr_decay, args.min_lr)
        self.clipper = GradClipper(self.stage, self.sync)
        # --init-from / --resume fill the weights (and the optimizer, the step) here.
        self.checkpoints = TrainerCheckpoints(self)
        self.schedule = PipelineSchedule(self.stage, self.mesh.pp_group, args.microbatches,
                                         no_sync=self.sync.no_sync, schedule=schedule)
        if is_token_file(args.data):
            self.batches, self.eval_batches = train_and_eval_batches(args, config.vocab_size)
        else:
            self.batches, self.eval_batches = Batches(args.data, config.vocab_size, args.seq,
                                                      args.global_batch, args.seed), None

    def microbatches(self, step: int, batches=None):
        """This DP rank's rows of global batch `step`, split into microbatches (inputs, targets)."""
        share = self.args.global_batch // self.mesh.dp
        first = self.mesh.dp_rank * share
        rows = (batches or self.batches).rows(step, first, first + share).to(self.device)
        return list(rows[:, :-1].chunk(self.args.microbatches)), list(rows[:, 1:].chunk(self.args.microbatches))

    def evaluate(self) -> float:
        """Mean loss over the ``--eval-batches`` held-out batches (the same ones every time)."""
        losses = [pipeline_eval_loss(self.stage, self.mesh, *self.microbatches(j, self.eval_batches))
                  for j in range(self.args.eval_batches)]
        return sum(losses) / len(losses)

    def step(self, step: int) -> dict:
        """One optimizer step; returns the global loss and this step's timings (same on every rank)."""
        start = time.perf_counter()
        inputs, targets = self.microbatches(step)
        lr = self.lr_schedule.apply(self.optimizer, step)
        self.sync.zero_grad()   # in place: gradients stay views of the DP buckets
        stats = self.schedule.step(inputs, targets)
        self.sync.finish()
        self.stage.finish_grads()
        # The global norm before clipping (logged each step, clipped or not).
        norm = self.clipper.clip(self.args.clip_grad) if self.args.clip_grad else self.clipper.norm()
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
                "tokens_per_s": tokens / elapsed, "bubble": report[1].item() / dist.get_world_size(),
                "lr": lr, "grad_norm": norm.item()}


# For the tests of the float64 verdict only (not a flag): "NAME:FACTOR" multiplies this rank's
# contribution to parameter NAME's gradient by FACTOR on global rank 0, before any reduction --
# the smallest kind of bug (one term of one sum slightly off) the verdict must catch.
PERTURB_ENV = "HYBRIDPAR_TEST_SCALE_GRAD"


def _perturb_gradient_for_tests(stage):
    spec = os.environ.get(PERTURB_ENV)
    if not spec or dist.get_rank() != 0:
        return
    name, _, factor = spec.rpartition(":")
    params = dict(stage.named_parameters())
    if name not in params:
        raise ValueError(f"{PERTURB_ENV}: rank 0 holds no parameter {name!r} (it holds {sorted(params)})")
    params[name].register_hook(lambda grad: grad * float(factor))
