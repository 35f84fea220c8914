"""The whole training path learns: generated data (64 px), prep, ``python -m distributed.train``
with the ``tiny`` backbone from random weights, then the validation AUC MEASURED here, from the
saved model, independently of the trainer's own numbers (which must agree)."""
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


def test_tiny_network_learns_the_generated_task(tmp_path):
    _run(["-m", "data_prep.synthetic", "--out", str(tmp_path / "data"), "--patients", "300", "--image-size", "64",
          "--seed", "11", "--no-progress"])
    run_dir = tmp_path / "run"
    cfg = {
        "data": {"csv": str(tmp_path / "data" / "Data_Entry_2017.csv"), "images": str(tmp_path / "data"),
                 "image_size": 64},
        "prep": {"out": str(tmp_path / "prepared"), "shard_size": 128, "train_per_class": 200,
                 "val_fraction": 0.15, "test_fraction": 0.2},
        "model": {"backbone": "tiny", "weights": "none"},
        # the article's recipe (augmentation, RMSprop warm-up, SGD+Nesterov fine-tune with the first 10
        # layers frozen) with a 10x learning rate: random weights, not ImageNet, and 4 epochs
        "train": {"batch_size": 16, "warmup": {"epochs": 1}, "finetune": {"epochs": 4, "lr": 0.01, "patience": 3}},
        "run": {"dir": str(run_dir)},
    }
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    _run(["-m", "data_prep", "--config", str(config)])
    _run(["-m", "distributed.train", "--config", str(config)])

    import tensorflow as tf  # noqa: F401 - after the subprocesses: keep this process light until here

    from distributed.callbacks import auc_score
    from distributed.data import eval_dataset, load_split
    from distributed.model import load_model

    val = load_split(tmp_path / "prepared", "val")
    assert val.n >= 60 and 0 < val.labels.sum() < val.n
    model = load_model(run_dir / "model.keras")
    probs, ys = [], []
    for x, y in eval_dataset(val, batch_size=32):
        probs.append(model(x, training=False).numpy())
        ys.append(y.numpy())
    p, y = np.concatenate(probs), np.concatenate(ys)
    auc = auc_score(y[:, 1], p[:, 1])
    from sklearn.metrics import roc_auc_score

    assert abs(auc - roc_auc_score(y[:, 1], p[:, 1])) < 1e-9
    print(f"measured validation AUC {auc:.4f} on {val.n} images")
    assert auc > 0.9, f"validation AUC {auc:.3f}"

    with open(run_dir / "history.csv", newline="") as f:
        hist = list(csv.DictReader(f))
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    best = hist[state["best_epoch"] - 1]
    # model.keras holds the best epoch: the trainer's gathered val metrics match ours
    assert abs(float(best["val_auc"]) - auc) < 1e-3
    assert abs(float(best["val_loss"]) - state["best_val_loss"]) < 1e-4
    assert float(hist[-1]["loss"]) < float(hist[0]["loss"])
