"""Kill after the first fine-tune epoch, resume, and end like the uninterrupted run.

Runs ``python -m distributed.train`` as the user does, on a tiny generated data set (32 px,
``tiny`` backbone), one process (the two-rank run is tests/parallel/test_train_hvd.py).
"""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
STOP_EXIT_CODE = 75


def _run(args, env=None, timeout=300, check=True):
    e = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    _run(["-m", "data_prep.synthetic", "--out", str(base / "data"), "--patients", "120", "--image-size", "32",
          "--seed", "3", "--no-progress"])
    cfg = {
        "data": {"csv": str(base / "data" / "Data_Entry_2017.csv"), "images": str(base / "data"), "image_size": 32},
        "prep": {"out": str(base / "prepared"), "shard_size": 64, "train_per_class": 80, "val_fraction": 0.2,
                 "test_fraction": 0.1},
        "model": {"backbone": "tiny", "weights": "none", "dense_units": 16},
        "train": {"batch_size": 16, "warmup": {"epochs": 1}, "finetune": {"epochs": 3, "patience": 10, "lr": 0.01}},
        "run": {"dir": str(base / "run")},
    }
    path = base / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _run(["-m", "data_prep", "--config", str(path)])
    return path


def _history(run_dir: Path):
    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _train(config, run_dir, *extra, env=None, check=True):
    return _run(["-m", "distributed.train", "--config", str(config), "--set", f"run.dir={run_dir}", *extra],
                env={"CXR_NO_HOROVOD": "1", **(env or {})}, check=check)


def test_kill_after_first_finetune_epoch_and_resume(config, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    _train(config, full)
    ref = _history(full)
    assert [(r["phase"], r["epoch"]) for r in ref] == [("warmup", "1"), ("finetune", "2"), ("finetune", "3"),
                                                       ("finetune", "4")]

    killed = _train(config, cut, env={"CXR_STOP_AFTER": "finetune:1"}, check=False)
    assert killed.returncode == STOP_EXIT_CODE, killed.stderr[-3000:]
    state = json.loads((cut / "checkpoints" / "state.json").read_text())
    assert (state["phase"], state["phase_epoch"], state["epoch"], state["complete"]) == ("finetune", 1, 2, False)
    assert not (cut / "model.keras").exists()  # killed: no final model
    assert len(_history(cut)) == 2

    resumed = _train(config, cut, "--resume")
    assert "resuming after epoch 2 (finetune epoch 1)" in resumed.stderr
    assert "optimizer state restored" in resumed.stderr
    hist = _history(cut)
    # the same epochs as the uninterrupted run, numbered continuously, none repeated
    assert [(r["phase"], r["epoch"]) for r in hist] == [(r["phase"], r["epoch"]) for r in ref]
    state = json.loads((cut / "checkpoints" / "state.json").read_text())
    assert state["complete"] and state["epoch"] == 4 and state["phase_epoch"] == 3
    assert (cut / "model.keras").is_file() and (cut / "saved_model" / "saved_model.pb").is_file()
    # the epochs before the kill are the uninterrupted run's; the learning rate curve continues
    for a, b in zip(hist[:2], ref[:2]):
        assert math.isclose(float(a["val_loss"]), float(b["val_loss"]), rel_tol=1e-4)
    for a, b in zip(hist[2:], ref[2:]):
        assert math.isclose(float(a["lr"]), float(b["lr"]), rel_tol=1e-5)
    assert "training on ONE process" in resumed.stderr  # the fallback says so (once)
    assert resumed.stderr.count("training on ONE process") == 1

    # resuming a finished run trains nothing more
    again = _train(config, cut, "--resume")
    assert len(_history(cut)) == 4 and "epoch 5" not in again.stderr


def test_resume_in_another_precision_says_so_and_carries_the_weights(config, tmp_path):
    run = tmp_path / "prec"
    killed = _train(config, run, "--set", "runtime.precision=float32", env={"CXR_STOP_AFTER": "warmup:1"},
                    check=False)
    assert killed.returncode == STOP_EXIT_CODE, killed.stderr[-3000:]
    assert json.loads((run / "checkpoints" / "state.json").read_text())["precision"] == "float32"
    assert "# runtime.precision float32: rank 0 computed in precision float32" in (run / "config.yaml").read_text()
    resumed = _train(config, run, "--resume", "--set", "runtime.precision=mixed_bfloat16",
                     "--set", "train.finetune.epochs=1")
    assert "the checkpoint was trained in float32, this run computes in mixed_bfloat16" in resumed.stderr
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    assert state["complete"] and state["precision"] == "mixed_bfloat16" and state["epoch"] == 2
    assert [r["phase"] for r in _history(run)] == ["warmup", "finetune"]


def test_resume_keeps_early_stopping_state(tmp_path):
    pytest.importorskip("tensorflow")
    from distributed.run_control import EarlyStopping
    from distributed.rundir import RunState

    class _M:
        stop_training = False

    state = RunState.from_json(RunState(phase="finetune", phase_epoch=3, epoch=4,
                                        early_stopping={"best": 0.5, "wait": 2, "stopped": False}).to_json())
    es = EarlyStopping(state, patience=3, active=True)
    es.model = _M()
    es.on_epoch_end(3, {"val_loss": 0.6})  # third epoch without improvement: stop now, not 3 epochs later
    assert es.model.stop_training and state.early_stopping["stopped"]
    fresh = RunState.from_json(json.loads(json.dumps(RunState().to_json())))
    assert math.isinf(fresh.best_val_loss) and fresh.early_stopping["wait"] == 0
