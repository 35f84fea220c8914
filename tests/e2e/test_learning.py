"""The whole training path learns: generated data (64 px), prep, ``python -m distributed.train``
with the ``tiny`` backbone from random weights, then the validation AUC MEASURED here, from the
saved model, independently of the trainer's own numbers (which must agree). In float32 and in
mixed_bfloat16 (forced, whatever ``auto`` would pick: oneDNN's bfloat16 kernels on AMX-BF16 and on
AVX512_BF16 CPUs such as AMD EPYC Zen 4, emulated and slower elsewhere), which must reach the same AUC."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _run(args, env=None, timeout=600):
    e = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CXR_NO_HOROVOD="1", **(env or {}))
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Generated data (300 patients, 64 px) prepared once for both precisions."""
    tmp = tmp_path_factory.mktemp("learning")
    _run(["-m", "data_prep.synthetic", "--out", str(tmp / "data"), "--patients", "300", "--image-size", "64",
          "--seed", "11", "--no-progress"])
    cfg = {
        "data": {"csv": str(tmp / "data" / "Data_Entry_2017.csv"), "images": str(tmp / "data"),
                 "image_size": 64},
        "prep": {"out": str(tmp / "prepared"), "shard_size": 128, "train_per_class": 200,
                 "val_fraction": 0.15, "test_fraction": 0.2},
        "model": {"backbone": "tiny", "weights": "none"},
        # the article's recipe (augmentation, RMSprop warm-up, SGD+Nesterov fine-tune with the first 10
        # layers frozen) with a 10x learning rate: random weights, not ImageNet, and 4 epochs
        "train": {"batch_size": 16, "warmup": {"epochs": 1}, "finetune": {"epochs": 4, "lr": 0.01, "patience": 3}},
    }
    config = tmp / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    _run(["-m", "data_prep", "--config", str(config)])
    return tmp, config


_AUC: dict = {}


def _train_and_measure(prepared, precision: str) -> float:
    """Train in ``precision`` and measure the validation AUC from the saved model, computed in the
    same precision; checks it against the trainer's own numbers. Cached per precision."""
    if precision in _AUC:
        return _AUC[precision]
    tmp, config = prepared
    run_dir = tmp / f"run-{precision}"
    _run(["-m", "distributed.train", "--config", str(config), "--set", f"run.dir={run_dir}",
          "--set", f"runtime.precision={precision}"])

    import tensorflow as tf  # noqa: F401 - after the subprocesses: keep this process light until here

    from distributed.data import eval_dataset, load_split
    from distributed.model import load_model, precision_of
    from distributed.validation import auc_score

    val = load_split(tmp / "prepared", "val")
    assert val.n >= 60 and 0 < val.labels.sum() < val.n
    saved = load_model(run_dir / "model.keras")
    assert precision_of(saved) == "float32"  # the delivered model runs at full speed anywhere
    model = load_model(run_dir / "model.keras", precision=precision)
    probs, ys = [], []
    for x, y in eval_dataset(val, batch_size=32):
        out = model(x, training=False)
        assert out.dtype == tf.float32
        probs.append(out.numpy())
        ys.append(y.numpy())
    p, y = np.concatenate(probs), np.concatenate(ys)
    auc = auc_score(y[:, 1], p[:, 1])
    from sklearn.metrics import roc_auc_score

    assert abs(auc - roc_auc_score(y[:, 1], p[:, 1])) < 1e-9
    print(f"{precision}: measured validation AUC {auc:.4f} on {val.n} images")

    with open(run_dir / "history.csv", newline="") as f:
        hist = list(csv.DictReader(f))
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    assert state["precision"] == precision
    best = hist[state["phase_best"]["finetune"]["epoch"] - 1]
    # model.keras holds the fine-tune phase's best epoch: the trainer's gathered val metrics match ours
    assert abs(float(best["val_auc"]) - auc) < 2e-3
    assert float(hist[-1]["loss"]) < float(hist[0]["loss"])
    _AUC[precision] = auc
    return auc


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_tiny_network_learns_the_generated_task(prepared, precision):
    auc = _train_and_measure(prepared, precision)
    assert auc > 0.9, f"{precision}: validation AUC {auc:.3f}"


def test_bfloat16_reaches_the_float32_auc(prepared):
    """Accuracy parity: the same data and seed in both precisions end within 0.02 AUC."""
    a32, a16 = _train_and_measure(prepared, "float32"), _train_and_measure(prepared, "mixed_bfloat16")
    assert abs(a32 - a16) < 0.02, f"float32 AUC {a32:.4f}, mixed_bfloat16 AUC {a16:.4f}"
