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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridpar_ext")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="build information and the implementation of each op")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)

    if args.command == "info":
        report = info()
        if args.json:
            json.dump(report, sys.stdout, indent=2)
            print()
        else:
            print_info(report)
    return 0
