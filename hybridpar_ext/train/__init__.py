"""The trainer: ``python -m hybridpar_ext train --dp 2 --tp 2 --pp 2 ...``, one job per file.

Started plainly it launches torchrun with the processes the layout needs (passing on
torchrun's multi-node flags); under torchrun every rank checks the configuration (the same
check, so the same message everywhere, before any collective), joins the process group (NCCL
where CUDA is, gloo otherwise), builds the full GPT from ``--seed``, keeps its own part
(:func:`hybridpar_ext.parallel.parallelize`) and trains it with 1F1B over ``--microbatches``,
gradients reduced over DP during backward and AdamW (sharded with ``--zero``).

Every layout with the same flags starts from the same weights and sees the same batches, so
its losses are those of one process.

- ``flags``: the command-line flags;
- ``layout``: the model config, the layout (flags or ``--plan``) and the checks of both;
- ``data``: the batches, a pure function of (seed, step);
- ``trainer``: :class:`Trainer`, one rank's stage, gradient sync, optimizer and schedule;
- ``zero_bubble``: ``--schedule zero-bubble``'s held-back W's per rank, chosen from each
  stage's measured bytes so that the peak activation memory stays within 1F1B's;
- ``log``: the header, per-step lines and metrics records, the summary;
- ``loop``: one torchrun process from flags to the last step;
- ``launcher``: the launching process (torchrun) or, under torchrun, the loop;
- ``compare``: ``compare-runs``, the verdict on two metrics files.
"""

from .compare import compare_runs
from .data import DEFAULT_TEXT, Batches
from .flags import add_train_arguments, parse_args
from .launcher import launch, main
from .layout import check_args, choose_layout, model_config
from .loop import run_rank
from .trainer import Trainer

__all__ = ["DEFAULT_TEXT", "Batches", "Trainer", "add_train_arguments", "check_args", "choose_layout",
           "compare_runs", "launch", "main", "model_config", "parse_args", "run_rank"]
