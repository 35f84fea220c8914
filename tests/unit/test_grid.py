"""launch sweep --grid / --preset without training: grid parsing, arm names, prep sharing, the preset's arms,
the best point chosen on validation, and the paired difference recomputed from fabricated predictions.csv
files with an explicit resampling of patients. The real thing: tests/e2e/test_sweep_grid.py."""
import csv
import json
import os
import random
import time
from pathlib import Path

import pytest

from data_prep.config import load_config
from launch import grid, paired
from launch import pipeline as pl
from launch.hosts import LaunchError


def _config(tmp_path, extra: str = "") -> Path:
    c = tmp_path / "c.yaml"
    c.write_text(f"prep: {{out: {tmp_path}/prep}}\nrun: {{dir: {tmp_path}/runs}}\nmodel: {{backbone: tiny}}\n"
                 "eval: {bootstrap: 200}\n" + extra)
    return c


def test_grid_items_are_parsed_and_bad_ones_named():
    assert grid.parse_grid(["train.finetune.freeze_first=2,6", "train.lr_warmup_epochs=0"]) == [
        ("train.finetune.freeze_first", ["2", "6"]), ("train.lr_warmup_epochs", ["0"])]
    for bad, says in [("train.finetune.freeze_first", "expected KEY=V1,V2"), ("k=1,,2", "expected KEY=V1,V2"),
                      ("k=1,1", "repeated"), ("run.dir=a,b", "sets run.dir per arm"), ("=1", "expected KEY")]:
        with pytest.raises(LaunchError, match=says):
            grid.parse_grid([bad])
    with pytest.raises(LaunchError, match="given twice"):
        grid.parse_grid(["a.b=1", "a.b=2"])


def test_points_are_the_product_named_from_their_values():
    pts = grid.grid_points([("train.finetune.freeze_first", ["2", "6"]), ("train.finetune.lr", ["1e-3", "a/b"])])
    assert [p.name for p in pts] == ["freeze_first-2__lr-1e-3", "freeze_first-2__lr-a_b",
                                     "freeze_first-6__lr-1e-3", "freeze_first-6__lr-a_b"]
    assert pts[1].sets == (("train.finetune.freeze_first", "2"), ("train.finetune.lr", "a/b"))
    same_leaf = grid.grid_points([("train.warmup.lr", ["1"]), ("train.finetune.lr", ["2"])])
    assert same_leaf[0].name == "train.warmup.lr-1__train.finetune.lr-2"
    with pytest.raises(LaunchError, match="same folder name"):
        grid.grid_points([("k", ["a/b", "a_b"])])


def test_arms_share_the_prep_unless_their_prep_config_differs(tmp_path):
    cfg = _config(tmp_path)
    pts = grid.grid_points([("train.finetune.freeze_first", ["2", "6"])])
    arms = grid.make_arms(str(cfg), [], pts, [0, 1], resplit=False)
    assert [a.name for a in arms] == ["freeze_first-2_seed-0", "freeze_first-2_seed-1", "freeze_first-6_seed-0",
                                      "freeze_first-6_seed-1"]
    assert arms[3].overrides == ["train.finetune.freeze_first=6", "train.seed=1",
                                 f"run.dir={tmp_path}/runs/freeze_first-6_seed-1"]
    outs = {load_config(cfg, a.overrides).prep.out for a in arms}
    assert outs == {f"{tmp_path}/prep"}  # train.* only: one prep for all four
    by_prep = grid.make_arms(str(cfg), ["train.batch_size=4"],
                             grid.grid_points([("prep.test_fraction", ["0.2", "0.3"])]), [0, 1], resplit=False)
    outs = [load_config(cfg, a.overrides).prep.out for a in by_prep]
    assert outs[0] == outs[1] == f"{tmp_path}/prep"  # 0.2 is the base's value: the base's prep
    assert outs[2] == outs[3] != outs[0] and outs[2].startswith(f"{tmp_path}/prep-")
    assert all(a.overrides[0] == "train.batch_size=4" for a in by_prep)
    resplit = grid.make_arms(str(cfg), [], pts, [0, 1], resplit=True)
    assert len({load_config(cfg, a.overrides).prep.out for a in resplit}) == 2  # one prep per seed, not per arm


def test_a_bad_grid_key_or_value_is_one_line_naming_it(tmp_path):
    cfg = _config(tmp_path)
    with pytest.raises(LaunchError, match=r"^grid point freez-2: train.finetune.freez: unknown key") as e:
        grid.make_arms(str(cfg), [], grid.grid_points([("train.finetune.freez", ["2"])]), None, False)
    assert "\n" not in str(e.value)
    with pytest.raises(LaunchError, match="train.finetune.freeze_blocks: 7 is out of range"):
        grid.make_arms(str(cfg), [], grid.grid_points([("train.finetune.freeze_blocks", ["7"])]), None, False)
    with pytest.raises(LaunchError, match="use --seeds"):
        grid.make_arms(str(cfg), [], grid.grid_points([("train.seed", ["1"])]), [0], False)


def test_the_transfer_options_preset_is_option_a_and_b_at_each_block_boundary(tmp_path):
    pts = grid.preset_points("transfer-options", "tiny")
    assert [p.name for p in pts] == ["A-head-only", "B-frozen-block1", "B-frozen-block2", "B-frozen-block3",
                                     "B-frozen-block4"]
    assert pts[0].sets == (("train.finetune.freeze", "all_conv"),)
    assert pts[3].sets == (("train.finetune.freeze", "blocks"), ("train.finetune.freeze_blocks", "3"))
    assert [p.name for p in grid.preset_points("transfer-options", "resnet50")][1:] == [
        "B-frozen-conv1", "B-frozen-conv2", "B-frozen-conv3", "B-frozen-conv4"]
    arms = grid.make_arms(str(_config(tmp_path)), [], pts, None, False)
    cfgs = [load_config(_config(tmp_path), a.overrides) for a in arms]
    assert [(c.train.finetune.freeze, c.train.finetune.freeze_blocks) for c in cfgs][1:] == [
        ("blocks", 1), ("blocks", 2), ("blocks", 3), ("blocks", 4)]
    assert arms[2].name == "B-frozen-block2" and cfgs[2].run.dir == f"{tmp_path}/runs/B-frozen-block2"


# --------------------------------------------------------------------------- a sweep with a stand-in pipeline

PATIENTS = 30


def _labels():
    rng = random.Random(7)
    rows = []  # (image, patient, label): 1-3 images per patient
    for p in range(PATIENTS):
        for k in range(rng.randint(1, 3)):
            rows.append((f"{p:03d}_{k}.png", 100 + p, int(rng.random() < 0.4)))
    return rows


def _write_predictions(path: Path, rows, skill: float, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "image", "patient", "view", "sex", "age", "label", "probability"])
        for i, (img, pat, y) in enumerate(rows):
            p = min(1.0, max(0.0, 0.5 + skill * (y - 0.5) + rng.gauss(0, 0.25)))
            w.writerow([i, img, pat, "PA", "M", 50, y, f"{p:.9g}"])


# skill on test and on validation per freeze_first: 6 is better on validation, 2 on test
SKILL = {2: (0.5, 0.1), 6: (0.2, 0.6)}


def fake_pipeline(calls):
    """What `launch pipeline` leaves in an arm's run.dir, with predictions whose skill depends on the arm."""
    rows = _labels()

    def run(argv):
        calls.append(argv)
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        cfg = load_config(argv[argv.index("--config") + 1], sets)
        d = Path(cfg.run.dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.keras").write_text("m")
        old = time.time() - 10
        os.utime(d / "model.keras", (old, old))
        ft = cfg.train.finetune
        n = {"first_n": ft.freeze_first, "all_conv": 45, "blocks": [0, 4, 7, 11, 15, 45][ft.freeze_blocks]}[ft.freeze]
        test_skill, val_skill = SKILL.get(n, (0.1 + n / 100, 0.1 + n / 100))
        _write_predictions(d / "predictions.csv", rows, test_skill, cfg.train.seed)
        _write_predictions(d / "val_predictions.csv", rows, val_skill, 100 + cfg.train.seed)
        auc = paired.auc_of(d / "predictions.csv")
        (d / "metrics.json").write_text(json.dumps({"task": "binary", "plain": {
            "auc": auc, "auc_ci": {"low": auc - 0.1, "high": min(1, auc + 0.1)}}}))
        (d / "trained_layers.json").write_text(json.dumps({
            "warmup": {"backbone_layers": 45, "frozen": ["x"] * 45, "trained": [], "trainable_params": 100},
            "finetune": {"backbone_layers": 45, "frozen": ["x"] * n, "trained": ["y"] * (45 - n),
                         "trainable_params": 1000 - 10 * n}}))
        (d / "history.csv").write_text("phase,epoch,seconds\nwarmup,1,2.0\nfinetune,2,3.0\nfinetune,3,5.0\n")
        (d / "report.md").write_text("r")
        pl.write_marker(cfg, "train", 1, "x")
        pl.write_marker(cfg, "evaluate", 1, "x")
        return 0
    return run


def test_grid_sweep_summary_best_on_validation_and_a_rerun_skips(tmp_path, capsys):
    cfg = _config(tmp_path)
    calls = []
    argv = ["--config", str(cfg), "--grid", "train.finetune.freeze_first=2,6", "--seeds", "0,1", "--np", "2"]
    assert grid.cli(argv, "sweep", fake_pipeline(calls)) == 0
    assert len(calls) == 4 and calls[0][-2:] == ["--np", "2"]
    s = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert [p["point"] for p in s["points"]] == ["freeze_first-2", "freeze_first-6"]
    assert s["reference"] == "freeze_first-2" and s["best"] == "freeze_first-6"  # validation, though worse on test
    p2, p6 = s["points"]
    assert p6["best"] and not p2["best"] and p2["auc_mean"] > p6["auc_mean"] and p6["val_auc_mean"] > p2["val_auc_mean"]
    a = {x["arm"]: x for x in s["arms"]}
    assert a["freeze_first-6_seed-1"]["layers"]["finetune"] == {
        "trainable_params": 940, "non_trainable_params": None, "backbone_layers": 45, "frozen_layers": 6,
        "trained_layers": 39}
    assert a["freeze_first-6_seed-1"]["s_per_epoch"] == {"warmup": 2.0, "finetune": 4.0}
    d = a["freeze_first-6_seed-1"]["vs_reference"]
    assert d["reference_arm"] == "freeze_first-2_seed-1" and d["n_boot"] == 200 and d["n_valid"] == 200
    assert d["low"] < d["auc_diff"] < d["high"] and d["auc_diff"] == pytest.approx(
        a["freeze_first-6_seed-1"]["auc"] - a["freeze_first-2_seed-1"]["auc"])
    assert a["freeze_first-2_seed-0"]["vs_reference"] is None
    assert p6["auc_diff_mean"] == pytest.approx(
        (d["auc_diff"] + a["freeze_first-6_seed-0"]["vs_reference"]["auc_diff"]) / 2)
    md = (tmp_path / "runs" / "sweep.md").read_text()
    assert "| `freeze_first-6` **best** |" in md and "| 6 of 45 | 940 | 2.0 | 4.0 |" in md
    assert f"{d['auc_diff']:+.3f} [{d['low']:.3f}, {d['high']:.3f}]" in md
    assert (tmp_path / "runs" / "sweep.png").stat().st_size > 1000
    calls.clear()
    capsys.readouterr()
    assert grid.cli(argv, "sweep", fake_pipeline(calls)) == 0
    err = capsys.readouterr().err
    assert calls == [] and err.count("[sweep] skip ") == 4
    assert json.loads((tmp_path / "runs" / "sweep.json").read_text())["arms"] == s["arms"]


def _weighted_auc_brute(y, p, w):
    num = den = 0.0
    for i in range(len(y)):
        for j in range(len(y)):
            if y[i] == 1 and y[j] == 0:
                den += w[i] * w[j]
                num += w[i] * w[j] * (1.0 if p[i] > p[j] else 0.5 if p[i] == p[j] else 0.0)
    return num / den if den else None


def test_a_paired_difference_recomputed_with_an_explicit_patient_resampling(tmp_path):
    """Issue 32: the same interval from the two predictions.csv files, patients drawn by hand."""
    np = pytest.importorskip("numpy")
    rows = _labels()
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    _write_predictions(a, rows, 0.3, 1)
    _write_predictions(b, rows, 0.5, 2)
    got = paired.paired_difference(a, b, n_boot=150, seed=5)
    ya, pa = zip(*[(int(r["label"]), float(r["probability"])) for r in csv.DictReader(open(a))])
    pb = [float(r["probability"]) for r in csv.DictReader(open(b))]
    patients = [str(p) for _, p, _ in rows]
    ids = sorted(set(patients))
    rng, diffs = random.Random(5), []
    for _ in range(150):
        drawn = [ids[rng.randrange(len(ids))] for _ in ids]
        w = [drawn.count(p) for p in patients]
        da, db = _weighted_auc_brute(ya, pa, w), _weighted_auc_brute(ya, pb, w)
        if da is not None and db is not None:
            diffs.append(db - da)
    low, high = np.quantile(diffs, [0.025, 0.975])
    assert got["n_valid"] == len(diffs) and got["low"] == pytest.approx(low) and got["high"] == pytest.approx(high)
    ones = [1] * len(rows)
    assert got["auc_diff"] == pytest.approx(_weighted_auc_brute(ya, pb, ones) - _weighted_auc_brute(ya, pa, ones))
    other = tmp_path / "c.csv"
    _write_predictions(other, rows[:-1], 0.5, 2)
    with pytest.raises(paired.NotPaired, match="not predictions for the same test images"):
        paired.paired_difference(a, other)


def test_the_preset_writes_the_articles_table_with_measured_rows(tmp_path):
    """Issue 32.3 on the tiny backbone's blocks: option A and B frozen through blocks 1-4, one row each."""
    cfg = _config(tmp_path)
    calls = []
    assert grid.cli(["--config", str(cfg), "--preset", "transfer-options"], "sweep", fake_pipeline(calls)) == 0
    sets = [[x for x in c if x.startswith("train.finetune.freeze")] for c in calls]
    assert sets == [["train.finetune.freeze=all_conv"]] + [
        ["train.finetune.freeze=blocks", f"train.finetune.freeze_blocks={k}"] for k in (1, 2, 3, 4)]
    s = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert s["kind"] == "preset" and s["preset"] == "transfer-options" and s["backbone"] == "tiny"
    assert s["seeds"] is None and [a["seed"] for a in s["arms"]] == [None] * 5
    assert [a["train_seed"] for a in s["arms"]] == [1234] * 5
    # the fake's validation skill grows with the frozen layers: all frozen (A) is best on validation
    assert s["best"] == "A-head-only" and s["reference"] == "A-head-only"
    assert [p["frozen_layers"] for p in s["points"]] == [45, 4, 7, 11, 15]
    assert all(a["vs_reference"] is None or a["vs_reference"]["auc_diff"] is not None for a in s["arms"])
    md = (tmp_path / "runs" / "sweep.md").read_text()
    assert "# Sweep `transfer-options` of" in md and "Seeds: the config's train.seed." in md
    assert "| `A-head-only` **best** (reference) | A: train the head only | 45 of 45 | 550 | 2.0 | 4.0 |" in md
    b2 = next(a for a in s["arms"] if a["arm"] == "B-frozen-block2")
    row = (f"| `B-frozen-block2` | B: fine-tune above block2 | 7 of 45 | 930 | 2.0 | 4.0 | {b2['val_auc']:.3f} | "
           f"{b2['auc']:.3f} [{b2['auc_ci']['low']:.3f}, {b2['auc_ci']['high']:.3f}] |")
    assert row in md
    assert "| `B-frozen-block2` | 1234 | 930 |" in md
    with pytest.raises(LaunchError, match="--reference 'nope': not a grid point"):
        grid.cli(["--config", str(cfg), "--preset", "transfer-options", "--reference", "nope"], "sweep",
                 fake_pipeline([]))


def test_a_multilabel_paired_difference_is_the_mean_over_findings_by_hand(tmp_path):
    """Multi-label arms: the difference of the mean AUC over the findings with both classes (a finding with one
    class in the test labels is left out), with the same explicit patient resampling."""
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(7)
    n, patients = 40, [f"p{i // 2:02d}" for i in range(40)]
    y = {"A": rng.integers(0, 2, n), "B": rng.integers(0, 2, n), "C": np.zeros(n, int)}  # C: one class only
    pa = {k: np.round(rng.random(n), 2) for k in y}
    pb = {k: np.round(np.clip(0.3 * y[k] + 0.7 * rng.random(n), 0, 1), 2) for k in y}

    def write(path, probs):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "patient", *[c for k in y for c in (f"label_{k}", f"probability_{k}")]])
            for i in range(n):
                w.writerow([f"im{i}.png", patients[i], *[v for k in y for v in (int(y[k][i]), float(probs[k][i]))]])

    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    write(a, pa)
    write(b, pb)
    got = paired.paired_difference(a, b, n_boot=60, seed=3)
    assert got["findings"] == 2

    def mean_auc(probs, w):
        vals = [_weighted_auc_brute(y[k], probs[k], w) for k in ("A", "B")]
        return None if None in vals else sum(vals) / 2

    ids = sorted(set(patients))
    r, diffs = random.Random(3), []
    for _ in range(60):
        drawn = [ids[r.randrange(len(ids))] for _ in ids]
        w = [drawn.count(p) for p in patients]
        da, db = mean_auc(pa, w), mean_auc(pb, w)
        if da is not None and db is not None:
            diffs.append(db - da)
    low, high = np.quantile(diffs, [0.025, 0.975])
    assert got["n_valid"] == len(diffs) and got["low"] == pytest.approx(low) and got["high"] == pytest.approx(high)
    assert got["auc_diff"] == pytest.approx(mean_auc(pb, [1] * n) - mean_auc(pa, [1] * n))
