"""``python -m launch sweep --grid train.finetune.freeze_first=2,6 --seeds 0,1 --np 2`` on a tiny generated
data set (tiny backbone, 32 px, one epoch per phase): four arms, one prep, sweep.json with two grid points x
two seeds, the best point chosen on validation, paired differences with intervals, one of them recomputed
from the arms' predictions.csv with an explicit resampling of patients; the same command again skips all four.
"""
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_pipeline import env  # the subprocess environment of the e2e pipeline tests

from distributed import metrics

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.needs_mpirun, pytest.mark.needs_horovod]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep_grid")
    subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--out", str(d / "data"), "--patients", "30",
                    "--image-size", "64", "--seed", "5", "--no-progress"], cwd=ROOT, env=env(), check=True,
                   capture_output=True, timeout=300)
    (d / "c.yaml").write_text(
        f"data: {{csv: {d}/data/Data_Entry_2017.csv, images: {d}/data, image_size: 32}}\n"
        f"prep: {{out: {d}/prepared, shard_size: 32, train_per_class: 24, val_fraction: 0.25, test_fraction: 0.3}}\n"
        "model: {backbone: tiny, weights: none, dense_units: 8}\n"
        "train: {batch_size: 8, warmup: {epochs: 1}, finetune: {epochs: 1, patience: 10}}\n"
        "eval: {tta: false, bootstrap: 50, gradcam_per_group: 0}\n"
        f"run: {{dir: {d}/sweep}}\n"
        "runtime: {precision: float32}\n")
    return d


def sweep(work, timeout):
    cmd = [sys.executable, "-m", "launch", "sweep", "--config", str(work / "c.yaml"),
           "--grid", "train.finetune.freeze_first=2,6", "--seeds", "0,1", "--np", "2"]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_grid_of_two_values_and_two_seeds_then_a_rerun_skips_all_four(work):
    r = sweep(work, 900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.count("[launch] skip prep") == 3  # prep ran once, for the first arm; the others share it
    assert sorted(p.name for p in work.iterdir() if p.name.startswith("prepared")) == ["prepared"]
    s = json.loads((work / "sweep" / "sweep.json").read_text())
    assert [(p["point"], p["seeds"]) for p in s["points"]] == [("freeze_first-2", [0, 1]), ("freeze_first-6", [0, 1])]
    assert len(s["arms"]) == 4 and s["reference"] == "freeze_first-2"
    for a in s["arms"]:
        run = Path(a["run_dir"])
        assert run == work / "sweep" / a["arm"] and a["arm"] == f"{a['point']}_seed-{a['seed']}"
        m = json.loads((run / "metrics.json").read_text())
        assert a["auc"] == m["plain"]["auc"] and a["auc_ci"]["low"] == m["plain"]["auc_ci"]["low"]
        layers = json.loads((run / "trained_layers.json").read_text())["finetune"]
        assert a["layers"]["finetune"]["frozen_layers"] == len(layers["frozen"]) == int(a["values"][
            "train.finetune.freeze_first"])
        assert a["layers"]["finetune"]["trainable_params"] == layers["trainable_params"]
        assert a["s_per_epoch"]["warmup"] > 0 and a["s_per_epoch"]["finetune"] > 0
        val = _rows(run / "val_predictions.csv")
        assert a["val_auc"] == pytest.approx(metrics.auc([int(x["label"]) for x in val],
                                                         [float(x["probability"]) for x in val]))
    means = {p["point"]: p["val_auc_mean"] for p in s["points"]}
    assert s["best"] == max(means, key=means.get) and [p["best"] for p in s["points"]].count(True) == 1
    b = next(a for a in s["arms"] if a["arm"] == "freeze_first-6_seed-1")
    d = b["vs_reference"]
    assert d["reference_arm"] == "freeze_first-2_seed-1" and d["n_boot"] == 50
    assert d["low"] <= d["auc_diff"] <= d["high"]
    # the same interval from the two predictions.csv, patients drawn by hand (random.Random(0), sorted ids)
    ref, arm = _rows(work / "sweep" / "freeze_first-2_seed-1" / "predictions.csv"), _rows(Path(b["predictions"]))
    assert [x["image"] for x in ref] == [x["image"] for x in arm]
    ids = sorted({x["patient"] for x in ref})
    rng, diffs = random.Random(0), []
    for _ in range(50):
        drawn = [ids[rng.randrange(len(ids))] for _ in ids]
        take = [i for i, x in enumerate(ref) for _ in range(drawn.count(x["patient"]))]  # a patient k times: k copies
        y = [int(ref[i]["label"]) for i in take]
        if len(set(y)) == 2:
            diffs.append(metrics.auc(y, [float(arm[i]["probability"]) for i in take])
                         - metrics.auc(y, [float(ref[i]["probability"]) for i in take]))
    low, high = np.quantile(diffs, [0.025, 0.975])
    assert d["n_valid"] == len(diffs) and d["low"] == pytest.approx(low) and d["high"] == pytest.approx(high)
    assert d["auc_diff"] == pytest.approx(b["auc"] - s["arms"][1]["auc"])
    md = (work / "sweep" / "sweep.md").read_text()
    assert f"`{s['best']}` **best**" in md and f"{d['auc_diff']:+.3f} [{d['low']:.3f}, {d['high']:.3f}]" in md
    assert (work / "sweep" / "sweep.png").stat().st_size > 1000
    t0 = time.monotonic()
    r = sweep(work, 300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.count("[sweep] skip ") == 4 and "distributed.train" not in r.stderr
    assert time.monotonic() - t0 < 60
    assert json.loads((work / "sweep" / "sweep.json").read_text())["arms"] == s["arms"]
