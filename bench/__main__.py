import argparse
import sys

from . import runner

FAMILIES = ("norms", "attention", "comm", "parallel", "recompute", "checkpoint")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("family", choices=FAMILIES + ("all",))
    parser.add_argument("--out", default=None,
                        help="where to write JSON + Markdown (default: bench/results on a GPU, "
                             "bench/results/local on a CPU, which git ignores)")
    parser.add_argument("--tag", default=None, help="suffix of the result files (default: device)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    args = parser.parse_args(argv)

    families = FAMILIES if args.family == "all" else (args.family,)
    for family in families:
        module = __import__(f"bench.{family}", fromlist=["run"])
        rows = module.run(quick=args.quick)
        runner.report(family, rows, out_dir=args.out, tag=args.tag)
    return 0


sys.exit(main())
