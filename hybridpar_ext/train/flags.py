"""The trainer's command-line flags (one table, shared by ``python -m hybridpar_ext train`` and
programs that drive :class:`~hybridpar_ext.train.Trainer` themselves)."""

import argparse

from .checkpointing import add_checkpoint_arguments
from .data import DEFAULT_TEXT


def add_train_arguments(p) -> None:
    layout = p.add_argument_group("layout (the product of dp, tp, pp is the number of processes)")
    for flag in ("dp", "tp", "pp"):
        layout.add_argument(f"--{flag}", type=int, help="default 1 (or chosen by --plan)")
    layout.add_argument("--sp", action="store_true", help="sequence parallelism (with tp > 1)")
    layout.add_argument("--microbatches", type=int, help="per step and pipeline; default: pp")
    layout.add_argument("--schedule", choices=("1f1b", "interleaved", "zero-bubble"),
                        help="pipeline schedule; default 1f1b, or interleaved with --virtual-stages > 1")
    layout.add_argument("--virtual-stages", type=int,
                        help="model chunks per pipeline rank (interleaved 1F1B; microbatches a multiple of pp); "
                             "default 1")
    layout.add_argument("--zero", action="store_true", help="shard the optimizer state over DP (ZeRO-1)")
    layout.add_argument("--no-overlap", action="store_true",
                        help="run every collective outside its matmul/backward (to measure the overlap)")
    layout.add_argument("--plan", action="store_true",
                        help="let the planner choose dp, tp, pp, sp and microbatches for the processes")
    model = p.add_argument_group("model")
    model.add_argument("--model", default="gpt", metavar="gpt|PATH",
                       help="our GPT (shaped by the flags below), or a local Hugging Face LLaMA, Qwen2 or "
                            "Mistral directory (config.json, optional safetensors weights; vocabulary from it)")
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
    run.add_argument("--dtype", choices=("float32", "bfloat16", "float64"),
                     help="parameters and activations; default float32 on CPU, bfloat16 on GPU; "
                          "float64 (CPU) to compare layouts exactly")
    run.add_argument("--metrics-file", help="append one JSON object per step (rank 0)")
    run.add_argument("--timeout", type=float, default=300.0,
                     help="seconds a collective may wait before the job fails")
    run.add_argument("--quiet", action="store_true", help="print only the summary")
    real = p.add_argument_group("training for real (schedule, clipping)")
    real.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up from 0 over these steps")
    real.add_argument("--lr-decay", choices=("none", "cosine", "linear"), default="none",
                      help="after the warm-up, decay the LR to --min-lr at --steps (default: constant)")
    real.add_argument("--min-lr", type=float, default=0.0, help="the LR the decay ends at")
    real.add_argument("--clip-grad", type=float, metavar="MAX",
                      help="clip the global gradient norm (over DP x TP x PP) to MAX")
    real.add_argument("--data-dtype", choices=("uint16", "uint32"), default="uint16",
                      help="token ids of a --data PATH.bin token file (a flat array, nanoGPT/Megatron style)")
    real.add_argument("--eval-every", type=int, default=0, metavar="N",
                      help="every N steps (and after the last), the loss on held-out tokens (a .bin --data)")
    real.add_argument("--eval-batches", type=int, default=4, metavar="K", help="global batches per evaluation")
    real.add_argument("--eval-data", help="a held-out token file (default: the last --eval-fraction of --data)")
    real.add_argument("--eval-fraction", type=float, default=0.1,
                      help="the tail of --data held out for evaluation when there is no --eval-data")
    real.add_argument("--recompute", choices=("none", "selective", "full"),
                      help="recompute activations in backward: whole layers (full) or the elementwise work "
                           "between the matmuls and attention (selective); default none (or chosen by --plan)")
    real.add_argument("--grad-reduce-dtype", choices=("float32", "bfloat16"), default="float32",
                      help="the dtype of the data-parallel gradient reduction (bf16 runs keep float32 master "
                           "weights and gradients; bfloat16 halves the bytes, not with --zero)")
    add_checkpoint_arguments(p)
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
