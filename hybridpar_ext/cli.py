"""Command-line entry points: ``python -m hybridpar_ext <command>``."""

import argparse
import json
import platform
import sys

import torch

# Public ops and the tensors they are asked about in `info`.
OPS = ("attention", "layer_norm", "rms_norm")
COMM_OPS = ("all_gather_matmul", "matmul_reduce_scatter", "GradBucketReducer")


def info() -> dict:
    """What was built, what is installed, and which implementation each op uses here."""
    from . import build_info
    from .ops import _backend

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {
        "hybridpar_ext._C": build_info(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _backend.triton_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "HYBRIDPAR_BACKEND": _backend.requested(),
        "ops": {op: {dev: _backend.describe(dev, torch.bfloat16 if dev == "cuda" else torch.float32)
                     for dev in devices} for op in OPS},
    }
    # The communication ops run the compiled c10d code on any device (gloo or NCCL picks the
    # transport); only the reference setting swaps in the plain composition.
    comm = ("reference (collective, then matmul)" if report["HYBRIDPAR_BACKEND"] == "reference"
            else "_C (c10d, overlapped)")
    for op in COMM_OPS:
        report["ops"][op] = {dev: (comm if op != "GradBucketReducer" else "_C (c10d, overlapped)")
                             for dev in devices}
    return report


def print_info(report: dict) -> None:
    c = report["hybridpar_ext._C"]
    built = (f"CUDA {c['cuda_version']}, archs {','.join(f'sm_{a}' for a in c['cuda_arch_list'])}, "
             f"NCCL {c['nccl_version'] or 'headers not found'}" if c["cuda"] else "CPU only")
    print(f"hybridpar_ext._C   built {built}, against torch {c['torch_version']}")
    print(f"torch              {report['torch']} (CUDA {report['torch_cuda'] or 'none'})")
    print(f"triton             {report['triton'] or 'not installed'}")
    print(f"python             {report['python']}")
    print(f"GPU                {report['gpu'] or 'none'}")
    print(f"HYBRIDPAR_BACKEND  {report['HYBRIDPAR_BACKEND']}")
    print("op implementations:")
    for op, by_device in report["ops"].items():
        print(f"  {op:<22} " + ", ".join(f"{dev}: {impl}" for dev, impl in by_device.items()))


MODEL_FLAGS = ("layers", "hidden", "heads", "kv_heads", "ffn", "vocab", "seq")
GPU_FLAGS = {"memory_gib": "memory_gib", "tflops": "bf16_tflops", "hbm_tbps": "hbm_tbps",
             "intra_node_gbps": "intra_node_gbps", "inter_node_gbps": "inter_node_gbps"}


def add_plan_arguments(p) -> None:
    from .plan import PRECISIONS, PRESETS
    from .plan.specs import GPU_NAMES

    model = p.add_argument_group("model (a --preset, or every shape flag; flags override a preset)")
    model.add_argument("--preset", choices=sorted(PRESETS))
    for flag in MODEL_FLAGS:
        model.add_argument(f"--{flag.replace('_', '-')}", type=int)
    model.add_argument("--mlp", choices=("gelu", "swiglu"))
    cluster = p.add_argument_group("cluster")
    cluster.add_argument("--gpus", type=int, help="GPUs in all")
    cluster.add_argument("--gpus-per-node", type=int, default=8)
    cluster.add_argument("--gpu", default="h100", choices=sorted(GPU_NAMES),
                         help="a known GPU; its numbers can be overridden below")
    for flag in GPU_FLAGS:
        cluster.add_argument(f"--{flag.replace('_', '-')}", type=float)
    p.add_argument("--global-batch", type=int, help="sequences per optimizer step")
    p.add_argument("--precision", default="bf16-mixed", choices=sorted(PRECISIONS))
    p.add_argument("--top", type=int, default=5, help="how many layouts to show")
    p.add_argument("--uneven-stages", action="store_true",
                   help="also consider pipeline depths that do not divide the layers")
    p.add_argument("--calibrate", metavar="DIR",
                   help="refine the efficiency constants from bench results in DIR (comm-*.json)")
    search = p.add_argument_group("a layout of yours, and limits on the search")
    search.add_argument("--layout", metavar="TEXT",
                        help='evaluate this layout beside the best, e.g. "dp2 tp4 pp4 v2 mb1 sp zero1 '
                             'recompute=full" (tokens: dpN tpN ppN mbN mN vN 1f1b|interleaved|zb sp zero1 '
                             'recompute=none|selective|full)')
    search.add_argument("--no-sp", action="store_true", help="no sequence parallelism")
    search.add_argument("--no-zero1", action="store_true", help="no ZeRO-1 optimizer sharding")
    search.add_argument("--recompute", nargs="+", choices=("none", "selective", "full"),
                        help="only these activation recomputations (default: all three)")
    search.add_argument("--schedule", nargs="+", choices=("1f1b", "interleaved", "zero-bubble"),
                        help="only these pipeline schedules (default: all three)")


def plan_from_args(args):
    """The planner's inputs (model, cluster, precision, calibration) from parsed flags."""
    from .plan import DEFAULT_CALIBRATION, PRECISIONS, PRESETS, ClusterSpec, ModelSpec, from_bench_results

    shape = dict(vars(PRESETS[args.preset])) if args.preset else {}
    for flag in MODEL_FLAGS + ("mlp",):
        value = getattr(args, flag)
        if value is not None:
            shape[flag] = value
    if shape.get("kv_heads") is None and "heads" in shape:
        shape["kv_heads"] = shape["heads"]
    missing = [f"--{f.replace('_', '-')}" for f in MODEL_FLAGS if f not in shape]
    if missing:
        raise ValueError(f"plan: give a --preset or the model shape ({', '.join(missing)} missing)")
    model = ModelSpec(**shape)
    if not args.gpus:
        raise ValueError("plan: --gpus must be a positive number of GPUs")
    overrides = {GPU_FLAGS[k]: getattr(args, k) for k in GPU_FLAGS if getattr(args, k) is not None}
    cluster = ClusterSpec.of(args.gpu, args.gpus, args.gpus_per_node, **overrides)
    calibration = DEFAULT_CALIBRATION
    if args.calibrate:
        calibration = from_bench_results(args.calibrate, cluster.gpu.name, peak_tflops=cluster.gpu.bf16_tflops,
                                         intra_node_gbps=cluster.gpu.intra_node_gbps)
    return model, cluster, PRECISIONS[args.precision], calibration


def run_plan(args) -> int:
    from .plan import PlanError, format_plan, parse_layout, plan
    from .plan.published import RUNS, compare

    if args.compare_published:
        rows = [compare(run) for run in RUNS]
        if args.json:
            json.dump(rows, sys.stdout, indent=2)
            print()
            return 0
        print("| run | reported layout | reported TFLOP/s/GPU | predicted | error | planner's choice | vs reported layout |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['run']} | {r['reported_layout']} | {r['reported_tflops']:.0f} | "
                  f"{r['predicted_tflops']:.0f} | {r['error']:+.1%} | {r['recommended']} | "
                  f"{r['recommended_vs_reported_layout']:+.1%} |")
        return 0
    try:
        model, cluster, precision, calibration = plan_from_args(args)
        if not args.global_batch:
            raise ValueError("plan: --global-batch must be a positive number of sequences")
        named = parse_layout(args.layout, cluster.gpus, args.global_batch) if args.layout else None
        limits = {"allow_sp": not args.no_sp, "allow_zero1": not args.no_zero1}
        if args.recompute:
            limits["recompute"] = tuple(args.recompute)
        if args.schedule:
            limits["schedules"] = tuple(args.schedule)
        result = plan(model, cluster, args.global_batch, top=args.top, precision=precision,
                      calibration=calibration, uneven_stages=args.uneven_stages, named=named, **limits)
    except (PlanError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(result.as_dict(), sys.stdout, indent=2)
        print()
    else:
        print(format_plan(result))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridpar_ext")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="build information and the implementation of each op")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of text")
    p_plan = sub.add_parser("plan", help="recommend a DP x TP x PP layout for a model and a cluster")
    add_plan_arguments(p_plan)
    p_plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_plan.add_argument("--compare-published", action="store_true",
                        help="the planner against published large-scale runs")
    from .train import add_train_arguments
    p_train = sub.add_parser("train", help="train a GPT with DP x TP x PP (launches torchrun itself)")
    add_train_arguments(p_train)
    p_cmp = sub.add_parser("compare-runs", help="do two trainings' metrics files have the same losses?")
    p_cmp.add_argument("metrics", nargs=2, help="two --metrics-file outputs: a run and its reference")
    p_cmp.add_argument("--noise", help="the reference's training with only the summation order changed "
                                       "(another --microbatches): how far rounding alone drifts")
    p_cmp.add_argument("--exact-steps", type=int, default=5)
    p_cmp.add_argument("--rtol", type=float, default=1e-5)
    p_export = sub.add_parser("export", help="a checkpoint's weights as one safetensors state_dict (a "
                                            "from_pretrained directory for Hugging Face models)")
    p_export.add_argument("checkpoint", metavar="DIR", help="a --checkpoint-dir (its newest complete checkpoint) "
                                                        "or one checkpoint")
    p_export.add_argument("out", metavar="OUT", help="the directory to write (model.safetensors, config.json)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)

    if args.command == "compare-runs":
        from .train import compare_runs
        return compare_runs(*args.metrics, noise=args.noise, exact_steps=args.exact_steps, rtol=args.rtol)
    if args.command == "train":
        from .train import main as train_main
        return train_main(args, argv)
    if args.command == "plan":
        return run_plan(args)
    if args.command == "export":
        from .checkpoint import export_checkpoint
        try:
            print(f"exported {export_checkpoint(args.checkpoint, args.out)} to {args.out}")
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    if args.command == "info":
        report = info()
        if args.json:
            json.dump(report, sys.stdout, indent=2)
            print()
        else:
            print_info(report)
    return 0
