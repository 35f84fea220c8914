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
    assert "| 3 | 42 | 0.750 | 0.700 – 0.800 |" in md and "Mean 0.730" in md
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
    assert f"`{opt}`" in md and "`train.seed`" in md and "standard deviation n/a" in md
    assert "AUC mean 0.534, sd n/a" in capsys.readouterr().err
    # the same seeds with another option: a sweep.md that says so
    other = tmp_path / "other"
    other.mkdir()
    cfg2 = _config(other)
    assert sweep.cli(["--config", str(cfg2), "--seeds", "0", "--set", "train.finetune.freeze=first_n"], "sweep",
                     fake_pipeline(calls, {0: 0.5340909090909091})) == 0
    md2 = (other / "runs" / "sweep.md").read_text()
    assert "freeze=first_n" in md2 and "freeze=all_conv" not in md2
