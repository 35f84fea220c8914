"""Training: ``python -m distributed.train --config C [--resume]`` (console script ``cxr-train``).

The same code runs alone, under ``horovodrun -np N`` or ``mpirun -np N``; without Horovod it
trains on one process and says so once. The recipe (two phases, Horovod's lines, checkpoints,
resume) is :func:`distributed.trainer.run`.

Order matters: this module is imported before TensorFlow. :func:`train` first puts this rank's
thread plan into the environment (``distributed.runtime.apply``: TensorFlow sizes its thread
pools once, when it starts) and only then imports ``distributed.trainer``, which imports
TensorFlow. The other commands (``evaluate``, ``predict``) follow the same rule.

Run directory: ``config.yaml``, ``train.log``, ``history.csv`` (one row per epoch, ``epoch``
counted over the whole run), ``checkpoints/{last,best}.keras`` + ``last-optimizer.npz`` +
``state.json``, ``tb/``, and at the end ``model.keras`` and ``saved_model/`` (inference-only
SavedModel for serving: ``tf.saved_model.load(p).serve(images)``), both with the weights of the
best epoch (lowest val_loss), i.e. what early stopping with restore_best_weights gives.

Test hooks (environment): ``CXR_STOP_AFTER=<phase>:<n>`` exits like a kill after that epoch;
``CXR_TEST_DUMP=<dir>`` makes every rank write ``rank<r>.json`` (weights checksum, files written);
``CXR_STEP_SLEEP_S=<s>`` sleeps after every training step (to cancel or kill a tiny run mid-epoch).
"""
from __future__ import annotations

import argparse
import sys

from data_prep.cli import command, note_output
from data_prep.config import add_config_args, config_from_args
from distributed import runtime


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="cxr-train", description=__doc__.split("\n\n")[0])
    add_config_args(ap)
    ap.add_argument("--resume", action="store_true",
                    help="continue from <run.dir>/checkpoints (phase, epoch, optimizer, early stopping)")
    return ap.parse_args(argv)


@command("cxr-train")  # the project's errors: one line, exit 2 (config) or 1
def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    note_output(cfg.run.dir)  # a full disk's one line names the run directory
    train(cfg, resume=args.resume)
    return 0


def train(cfg, resume: bool = False, plan=None) -> dict:
    """Train per ``cfg``; returns {"state", "history", "run_dir"} (the same on every rank).
    ``plan``: a thread plan the caller already applied (benchmarks), else this applies one."""
    plan = plan or runtime.apply(cfg.runtime)  # oneDNN/OpenMP threads of this rank: BEFORE TensorFlow starts
    from distributed import trainer  # imports TensorFlow: only now that the thread plan is in os.environ

    return trainer.run(cfg, plan, resume=resume)


if __name__ == "__main__":
    sys.exit(main())
