"""Two ranks under ``horovodrun -np 2``: both phases, identical weights on both ranks at the end,
checkpoints written once, by rank 0, each rank logging its own thread settings.

``CXR_TEST_DUMP`` makes every rank write ``rank<r>.json`` with a checksum of its weights and how
many checkpoint commits it wrote. Gloo is the controller here: on a node whose cores are all
taken by the ranks, Open MPI's busy-polling progress engine slows the first steps down a lot.
"""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.needs_horovod  # skipped without it, a failure under CI=true (tests/conftest.py)


def _run(cmd, env=None, timeout=600):
    e = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    e.pop("CXR_NO_HOROVOD", None)
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}"
    return p


def test_two_ranks_train_both_phases_identically(tmp_path):
    _run([sys.executable, "-m", "data_prep.synthetic", "--out", str(tmp_path / "data"), "--patients", "120",
          "--image-size", "32", "--seed", "5", "--no-progress"])
    run_dir, dump = tmp_path / "run", tmp_path / "dump"
    cfg = {
        "data": {"csv": str(tmp_path / "data" / "Data_Entry_2017.csv"), "images": str(tmp_path / "data"),
                 "image_size": 32},
        "prep": {"out": str(tmp_path / "prepared"), "shard_size": 64, "train_per_class": 80, "val_fraction": 0.2,
                 "test_fraction": 0.1},
        "model": {"backbone": "tiny", "weights": "none", "dense_units": 16},
        "train": {"batch_size": 16, "warmup": {"epochs": 1}, "finetune": {"epochs": 2, "patience": 10}},
        "run": {"dir": str(run_dir)},
    }
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    _run([sys.executable, "-m", "data_prep", "--config", str(config)])

    p = _run(["horovodrun", "--gloo", "-np", "2", "-H", "localhost:2",
              sys.executable, "-m", "distributed.train", "--config", str(config)],
             env={"CXR_TEST_DUMP": str(dump),
                  # a cache of its own: another test's cached calibration would make this one measure nothing
                  "CXR_CACHE_DIR": str(tmp_path / "cache")})
    out = p.stdout + p.stderr
    if len(os.sched_getaffinity(0)) >= 2:  # Gloo's launcher binds nothing: each rank binds itself
        bound = [line for line in out.splitlines() if "INFO threads:" in line and "(Gloo launcher)" in line]
        assert any("[rank 0]" in line for line in bound) and any("[rank 1]" in line for line in bound), out[-3000:]

    ranks = [json.loads((dump / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["horovod"] and r["size"] == 2 for r in ranks)
    # the same model on both ranks: gradients averaged, start broadcast, BatchNorm statistics averaged
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]

    with open(run_dir / "history.csv", newline="") as f:
        hist = list(csv.DictReader(f))
    assert [(h["phase"], h["epoch"]) for h in hist] == [("warmup", "1"), ("finetune", "2"), ("finetune", "3")]
    assert all(0.0 <= float(h["val_auc"]) <= 1.0 for h in hist)
    # Horovod recipe: lr scaled by 2 ranks after the warm-up ramp (SGD 1e-3 -> 2e-3)
    assert abs(float(hist[-1]["lr"]) - 2e-3) < 1e-4

    # checkpoints once, by rank 0 only, committed atomically (no temporary files left)
    assert ranks[0]["checkpoint_writes"] == 3 and ranks[1]["checkpoint_writes"] == 0
    assert sorted(x.name for x in (run_dir / "checkpoints").iterdir()) == \
        ["best-finetune.keras", "best.keras", "last-optimizer.npz", "last.keras", "state.json"]
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    assert state["writer_rank"] == 0 and state["size"] == 2 and state["complete"]
    # runtime.precision auto: on a bfloat16 CPU rank 0 alone measures, both ranks take its choice (the
    # identical weights above could not come from two precisions)
    from distributed.precision import cpu_flags

    if cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        assert len(re.findall(r"\(auto: measured .*ms per ", out)) == 1, out[-3000:]  # one calibration
    assert (run_dir / "model.keras").is_file() and (run_dir / "saved_model" / "saved_model.pb").is_file()
    # the run's lock stays
    assert not [x for x in run_dir.iterdir() if x.name.startswith(".") and x.name != ".cxr-lock"]

    # every rank logs its own thread settings, computed for 2 ranks on this node
    from distributed import tuning

    intra = tuning.plan_threads(tuning.detect_topology(), 2).intra_op
    for r in range(2):
        assert f"[rank {r}] INFO threads: intra_op={intra} " in out, out[-4000:]
    assert "Horovod 0.28.1: 2 rank(s)" in out
    # and the log says what TensorFlow really runs (auto = TensorFlow's choice for this CPU)
    assert re.search(r"oneDNN custom ops (on|off) \((TensorFlow's default for this CPU|TF_ENABLE_ONEDNN_OPTS from the "
                     r"environment)\)", out), out[-4000:]
