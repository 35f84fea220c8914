"""Every test hook of the product, read from the environment here and nowhere else.

Tests drive a tiny run into the states a real one meets by chance (killed after an epoch, cancelled
in the middle of one, two ranks staging at once); these variables make those moments happen on time.
Unset, which is how users run, none of them does anything, and training puts no test callback in its
callback list (:func:`training_hooks`). Product code calls them through the functions here: training's
hook is :func:`training_callback_functions`, which the trainer wraps in Keras' ``LambdaCallback``.

==========================  ===================================================================
``CXR_STOP_AFTER``          ``<phase>:<n>``: exit like a kill (status 75, no final model) right
                            after the n-th epoch of that phase was committed on every rank
``CXR_STEP_SLEEP_S``        seconds to sleep after every training step (cancel or kill mid-epoch)
``CXR_TEST_DUMP``           folder where every rank writes ``rank<r>.json`` at the end of training
                            (weights checksum, checkpoint writes, host)
``CXR_PREP_THROTTLE_S``     seconds to sleep per image in prep (kill it mid-run)
``CXR_STAGE_THROTTLE_S``    seconds to sleep per shard copy in ``prep.stage_to`` (overlap two ranks)
==========================  ===================================================================
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from data_prep.log import get_logger

STOP_AFTER, STEP_SLEEP, DUMP = "CXR_STOP_AFTER", "CXR_STEP_SLEEP_S", "CXR_TEST_DUMP"
PREP_THROTTLE, STAGE_THROTTLE = "CXR_PREP_THROTTLE_S", "CXR_STAGE_THROTTLE_S"
STOP_EXIT_CODE = 75  # CXR_STOP_AFTER's "killed" exit status


def _seconds(name: str) -> float:
    try:
        return max(0.0, float(os.environ.get(name) or 0))
    except ValueError:
        return 0.0


def stop_after(phase: str) -> int | None:
    """The epoch of ``phase`` after which to exit as if killed, or None."""
    spec = os.environ.get(STOP_AFTER, "")
    ph, _, n = spec.partition(":")
    return int(n) if ph == phase and n.isdigit() else None


def step_sleep_s() -> float:
    return _seconds(STEP_SLEEP)


def training_hooks(phase: str) -> bool:
    """Whether a training phase needs the test callback (:func:`training_callback_functions`)."""
    return stop_after(phase) is not None or step_sleep_s() > 0


def training_callback_functions(phase: str, barrier) -> dict:
    """The training test hooks of ``phase`` as the keywords of Keras' ``LambdaCallback``: sleep
    ``CXR_STEP_SLEEP_S`` after every step; after the epoch ``CXR_STOP_AFTER`` names, ``barrier()`` (every
    rank: rank 0 has committed the checkpoint) and exit with :data:`STOP_EXIT_CODE` as if killed."""
    sleep, at = step_sleep_s(), stop_after(phase)

    def on_train_batch_end(batch, logs=None):
        if sleep > 0:
            time.sleep(sleep)

    def on_epoch_end(epoch, logs=None):
        if at is not None and epoch + 1 == at:
            barrier()
            get_logger().warning("%s=%s:%d: stopping here as if killed", STOP_AFTER, phase, at)
            for h in get_logger().handlers:
                h.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(STOP_EXIT_CODE)

    return {"on_train_batch_end": on_train_batch_end, "on_epoch_end": on_epoch_end}


def dump_dir() -> Path | None:
    folder = os.environ.get(DUMP)
    return Path(folder) if folder else None


def prep_throttle_s() -> float:
    return _seconds(PREP_THROTTLE)


def stage_throttle_s() -> float:
    return _seconds(STAGE_THROTTLE)
