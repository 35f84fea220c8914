"""``python -m benchmarks {epoch-timing,scaling,input-pipeline,timeline,prep,reliability} ...`` \
(console script ``cxr-bench``).

* ``epoch-timing``: s/epoch of the article's warm-up and fine-tune per TensorFlow variant;
* ``scaling``: fine-tune throughput per number of Horovod ranks, with and without thread tuning;
* ``input-pipeline``: the fine-tune step fed by the real HDF5 pipeline vs in-memory tensors (target >= 0.95x);
* ``timeline``: rank skew, allreduce and exposed communication per step from a Horovod timeline;
* ``prep``: throughput of the MPI prep stage (``benchmarks/prep.py``);
* ``reliability``: what a step checkpoint and the stop flag cost (``benchmarks/reliability.py``).
* ``checksums``: the shards' Fletcher-32 cost, writing and reading, with vs without (``benchmarks/checksums.py``).
See BENCHMARKS.md for the commands and dated results.
"""
from __future__ import annotations

import argparse
import sys

from benchmarks import checksums, epoch_timing, input_pipeline, prep, reliability, scaling, timeline
from data_prep.cli import add_debug_arg, command


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cxr-bench", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True,
                            metavar="{epoch-timing,scaling,input-pipeline,timeline,prep,reliability,checksums}")
    for module in (epoch_timing, scaling, input_pipeline, timeline, prep, reliability, checksums):
        module.register(sub)
    for p in sub.choices.values():
        add_debug_arg(p)
    return ap


@command("cxr-bench")  # the project's errors: one line, exit 2 (config, arguments) or 1
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
