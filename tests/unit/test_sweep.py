"""launch sweep without training: the per-seed overrides, the summary, and a rerun that skips finished
seeds (a stand-in pipeline writes what the real one leaves). The real thing: tests/e2e/test_pipeline.py."""
import json
import os
import statistics
import time
from pathlib import Path

import pytest

from data_prep.config import load_config
from launch import pipeline as pl
from launch import sweep
from launch.hosts import LaunchError


def _config(tmp_path) -> Path:
    c = tmp_path / "c.yaml"
    c.write_text(f"prep: {{out: {tmp_path}/prep}}\nrun: {{dir: {tmp_path}/runs}}\n")
    return c


def fake_pipeline(calls, aucs):
    """What `launch pipeline` leaves in a seed's run.dir: model, report, metrics.json, markers."""
    def run(argv):
        calls.append(argv)
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        cfg = load_config(argv[argv.index("--config") + 1], sets)
        d = Path(cfg.run.dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.keras").write_text("m")
        old = time.time() - 10
        os.utime(d / "model.keras", (old, old))
        auc = aucs[cfg.train.seed]
        (d / "metrics.json").write_text(json.dumps({"task": "binary", "plain": {
            "auc": auc, "auc_ci": {"low": auc - 0.05, "high": auc + 0.05}}}))
        (d / "report.md").write_text("r")
        pl.write_marker(cfg, "train", 1, "x")
        pl.write_marker(cfg, "evaluate", 1, "x")
        return 0
    return run


def test_sweep_writes_the_summary_and_a_rerun_skips_finished_seeds(tmp_path, capsys):
    cfg = _config(tmp_path)
    calls, aucs = [], {0: 0.71, 3: 0.75}
    assert sweep.cli(["--config", str(cfg), "--seeds", "0,3", "--np", "2"], "sweep", fake_pipeline(calls, aucs)) == 0
    assert len(calls) == 2 and calls[0][:3] == ["pipeline", "--config", str(cfg)] and calls[0][-2:] == ["--np", "2"]
    assert f"run.dir={tmp_path}/runs/seed-3" in calls[1] and "train.seed=3" in calls[1]
    s = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert [r["auc"] for r in s["runs"]] == [0.71, 0.75]
    assert s["auc_mean"] == pytest.approx(0.73) and s["auc_sd"] == pytest.approx(statistics.stdev([0.71, 0.75]))
    assert s["runs"][1]["run_dir"] == f"{tmp_path}/runs/seed-3" and s["runs"][1]["auc_ci"]["low"] == pytest.approx(0.70)
    md = (tmp_path / "runs" / "sweep.md").read_text()
    assert "| 3 | 42 | 0.750 | 0.700 – 0.800 |" in md
    assert "n = 2 run(s) with a test ROC AUC: range 0.710 – 0.750 (min – max), mean 0.730; sample standard " \
           "deviation of the 2 runs 0.028 (ddof 1; a description of the spread between runs, not a confidence " \
           "interval)" in md and "±" not in md
    # the same command again: both seeds complete, nothing runs
    calls.clear()
    capsys.readouterr()
    assert sweep.cli(["--config", str(cfg), "--seeds", "0,3"], "sweep", fake_pipeline(calls, aucs)) == 0
    assert calls == [] and "skip seed 0" in capsys.readouterr().err
    # a seed added later runs alone
    aucs[5] = 0.80
    assert sweep.cli(["--config", str(cfg), "--seeds", "0,3,5"], "sweep", fake_pipeline(calls, aucs)) == 0
    assert len(calls) == 1 and "train.seed=5" in calls[0]
    assert len(json.loads((tmp_path / "runs" / "sweep.json").read_text())["runs"]) == 3


def test_resplit_varies_the_split_into_its_own_prep_folder(tmp_path):
    base = load_config(_config(tmp_path))
    assert sweep.seed_overrides(base, 2, resplit=True) == [
        "train.seed=2", f"run.dir={tmp_path}/runs/seed-2", "prep.seed=2", f"prep.out={tmp_path}/prep-seed-2"]
    assert sweep.seed_overrides(base, 2, resplit=False) == ["train.seed=2", f"run.dir={tmp_path}/runs/seed-2"]


@pytest.mark.parametrize("text", ["", "a,b", "1,1", "-1"])
def test_bad_seeds_are_refused(text):
    with pytest.raises(LaunchError, match="--seeds"):
        sweep.parse_seeds(text)


def test_a_failed_seed_stops_the_sweep(tmp_path, capsys):
    assert sweep.cli(["--config", str(_config(tmp_path)), "--seeds", "0,1"], "sweep", lambda argv: 3) == 3
    assert "seed 0 failed (exit code 3)" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "sweep.json").exists()


def test_sweep_says_what_it_varied_and_sd_only_from_two_seeds(tmp_path, capsys):
    cfg = _config(tmp_path)
    calls = []
    opt = "train.finetune.freeze=all_conv"
    assert sweep.cli(["--config", str(cfg), "--seeds", "0", "--set", opt], "sweep",
                     fake_pipeline(calls, {0: 0.5340909090909091})) == 0
    s = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert s["config"] == str(cfg) and s["overrides"] == [opt] and s["varied"] == ["train.seed", "run.dir"]
    assert s["auc_sd"] is None and s["runs"][0]["overrides"] == [opt, "train.seed=0", f"run.dir={tmp_path}/runs/seed-0"]
    md = (tmp_path / "runs" / "sweep.md").read_text()
    assert f"`{opt}`" in md and "`train.seed`" in md and "no standard deviation (fewer than 2 runs with a value)" in md
    assert "n = 1 run(s) with a test ROC AUC: range 0.534 – 0.534" in capsys.readouterr().err
    # the same seeds with another option: a sweep.md that says so
    other = tmp_path / "other"
    other.mkdir()
    cfg2 = _config(other)
    assert sweep.cli(["--config", str(cfg2), "--seeds", "0", "--set", "train.finetune.freeze=first_n"], "sweep",
                     fake_pipeline(calls, {0: 0.5340909090909091})) == 0
    md2 = (other / "runs" / "sweep.md").read_text()
    assert "freeze=first_n" in md2 and "freeze=all_conv" not in md2


def test_a_run_without_an_auc_is_listed_and_not_counted(tmp_path, capsys):
    """Issue 34.9: 'over 3 seeds' while one run had no AUC; n is the number of runs with a value, the run without
    one is in the table with its reason, and a sd needs two values."""
    cfg = _config(tmp_path)
    calls, aucs = [], {0: 0.70, 1: None, 2: 0.76}

    def pipeline(argv):
        rc = fake_pipeline(calls, {k: (v if v is not None else 0.0) for k, v in aucs.items()})(argv)
        d = Path(load_config(argv[argv.index("--config") + 1], [argv[i + 1] for i, a in enumerate(argv)
                                                                  if a == "--set"]).run.dir)
        if d.name == "seed-1":
            (d / "metrics.json").write_text(json.dumps({"task": "binary", "plain": {
                "auc": None, "note": "one class only: AUC undefined", "auc_ci": {"low": None, "high": None}}}))
        return rc
    assert sweep.cli(["--config", str(cfg), "--seeds", "0,1,2"], "sweep", pipeline) == 0
    s = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert s["auc_n"] == 2 and len(s["runs"]) == 3 and (s["auc_min"], s["auc_max"]) == (0.70, 0.76)
    assert s["auc_sd"] == pytest.approx(statistics.stdev([0.70, 0.76]))
    assert s["without_auc"] == [{"seed": 1, "why": "one class only: AUC undefined"}]
    md = (tmp_path / "runs" / "sweep.md").read_text()
    assert "| 1 | 42 | none: one class only: AUC undefined | – – – |" in md
    assert "n = 2 run(s) with a test ROC AUC of 3: range 0.700 – 0.760" in md
    assert "sample standard deviation of the 2 runs 0.042" in md and "over 3 seeds" not in md
    assert "With n = 2 a standard deviation says little: a 95% interval for the true one spans about 0.45–31.9" in md
    assert "n = 2 run(s) with a test ROC AUC of 3" in capsys.readouterr().err
    assert sweep.summary([0], [dict(s["runs"][1])], False)["auc_sd"] is None
