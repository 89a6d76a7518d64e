"""``python -m hybridpar_ext train`` started plainly: check the configuration, then launch
torchrun with one process per rank; under torchrun: train (:func:`~hybridpar_ext.train.loop.run_rank`)."""

import copy
import os
import subprocess
import sys

import torch

from .layout import check_args
from .loop import run_rank


def launch(args, argv) -> int:
    """Not under torchrun: start it with this command line, one process per rank."""
    if args.nproc_per_node is None:
        if args.plan:
            raise ValueError("--plan: give --nproc-per-node (the processes to plan for)")
        world = (args.dp or 1) * (args.tp or 1) * (args.pp or 1)
        if world % args.nnodes:
            raise ValueError(f"dp * tp * pp = {world} processes do not divide over --nnodes {args.nnodes}")
        args.nproc_per_node = world // args.nnodes
    # The ranks check again (for runs launched by hand with torchrun); checking here first
    # gives one message and no torchrun traceback. On a copy: --plan fills in the layout,
    # and the ranks must plan from the same flags.
    check_args(copy.deepcopy(args), args.nproc_per_node * args.nnodes)
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
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
