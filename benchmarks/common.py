"""What the benchmarks share: paths, the benchmark config, step timing and its extrapolation to an
epoch, and the worker protocol (a driver runs ``python -m benchmarks.<module> --worker SPEC OUT``).

Imports no other benchmark module, and no TensorFlow or numpy at import time: worker processes
import this before ``distributed.tuning`` has set the thread variables.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from data_prep.config import load_config
from data_prep.fsutil import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "paper.yaml"
CACHE = Path(os.environ.get("CXR_BENCH_CACHE", Path.home() / ".cache" / "cxr-bench"))
EPOCH_IMAGES = 10_000
# Variables that decide threads/oneDNN: cleared for every variant, then set by it (or by tuning).
THREAD_VARS = ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "KMP_AFFINITY",
               "KMP_BLOCKTIME", "KMP_SETTINGS", "KMP_HW_SUBSET", "TF_ENABLE_ONEDNN_OPTS", "OMP_PROC_BIND",
               "OMP_PLACES", "ITEX_AUTO_MIXED_PRECISION", "HOROVOD_CYCLE_TIME")
QUICK = {"image_size": 64, "warmup_steps": 1, "timed_steps": 2, "repeats": 2}
FULL = {"warmup_steps": 2, "timed_steps": 5, "repeats": 3}


def bench_config(config: str | None, overrides=(), quick: bool = False, image_size: int | None = None):
    """The article's setup from the config: VGG16, weights none, augmentation on, its batch size."""
    sets = ["model.weights=none", "train.augment.enabled=true", "runtime.onednn=auto"]
    if not any(o.startswith("model.backbone=") for o in overrides):
        sets.append("model.backbone=vgg16")
    if quick and not image_size:
        image_size = QUICK["image_size"]
    if image_size:
        sets.append(f"data.image_size={image_size}")
    return load_config(config, sets + list(overrides))


def parse_steps(text: str | None, quick: bool = False, repeats: int | None = None, full: dict = FULL) -> dict:
    """{"warmup_steps", "timed_steps", "repeats"} from ``--steps W,K`` and ``--repeats`` (defaults:
    QUICK's with ``quick``, else ``full``); ValueError with the message for the user."""
    params = {k: QUICK[k] for k in ("warmup_steps", "timed_steps", "repeats")} if quick else dict(full)
    if text:
        parts = [p.strip() for p in str(text).split(",")]
        if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts):
            raise ValueError(f"--steps takes untimed,timed steps like 2,5, got {text!r}")
        params.update(warmup_steps=int(parts[0]), timed_steps=int(parts[1]))
    if repeats is not None:
        params["repeats"] = int(repeats)
    if params["warmup_steps"] < 0 or params["timed_steps"] < 1 or params["repeats"] < 1:
        raise ValueError("untimed steps must be >= 0, timed steps and repeats >= 1")
    if params["warmup_steps"] == 0 and params["timed_steps"] < 2:
        raise ValueError("with no untimed step, time at least 2 steps (the first step's end is the start)")
    return params


def step_time(ends: list[float], warmup: int, timed: int) -> float:
    """Seconds per step from the end times of W untimed + K timed steps: from the end of step W to
    the end of step W+K; with no untimed step, from the first step's end (K-1 steps)."""
    if warmup:
        return (ends[warmup + timed - 1] - ends[warmup - 1]) / timed
    return (ends[-1] - ends[0]) / max(1, timed - 1)


def timed_fit(model, dataset, warmup: int, timed: int) -> float:
    """One ``model.fit`` of W+K steps on ``dataset``; seconds per timed step (:func:`step_time`)."""
    import tensorflow as tf  # only ever called in a worker, after tuning has set the thread variables

    ends: list[float] = []
    timer = tf.keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: ends.append(time.perf_counter()))
    model.fit(dataset, steps_per_epoch=warmup + timed, epochs=1, verbose=0, callbacks=[timer])
    return step_time(ends, warmup, timed)


def steps_per_epoch(epoch_images: int, batch_size: int, ranks: int = 1) -> int:
    """As training counts them (``distributed.data.steps_per_epoch``): full global batches."""
    return max(1, epoch_images // (batch_size * ranks))


def extrapolate(step_s: float, epoch_images: int, batch_size: int, ranks: int = 1) -> float:
    """Seconds per epoch from seconds per step."""
    return step_s * steps_per_epoch(epoch_images, batch_size, ranks)


def tail_text(path, n: int = 300) -> str:
    """The last error line of a log file (else its last line), at most ``n`` characters: one line for a
    result's ``error`` field."""
    try:
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    err = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (err[-1] if err else (lines[-1] if lines else "no output")).strip()[:n]


def worker_entry(worker_fn, command: str) -> int:
    """``python -m benchmarks.<module> --worker SPEC OUT``: run ``worker_fn(spec)`` in this process
    and write its result (when it returns one: only rank 0 does in scaling) atomically to OUT."""
    if len(sys.argv) != 4 or sys.argv[1] != "--worker":
        print(f"usage: python -m benchmarks {command} ... (this module's --worker is internal)", file=sys.stderr)
        return 2
    spec_file, out_file = sys.argv[2:]
    result = worker_fn(json.loads(Path(spec_file).read_text()))
    if result is not None:
        atomic_write_json(out_file, result)
    return 0
