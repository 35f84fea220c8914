"""A run folder knows its config: a resume or a rerun of another definition is refused, --restart moves it aside.

The run folders here are fabricated as a killed run leaves them (history, checkpoints, run.json) so
that no training is needed; the refusal comes before any data is read.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_prep import config as cfgmod
from data_prep.config import load_config
from distributed import rundir

ROOT = Path(__file__).resolve().parents[2]


def _killed_run(run: Path, cfg) -> None:
    """What a run killed after its first epoch leaves: its record, history and an epoch checkpoint."""
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "state.json").write_text(json.dumps({"phase": "warmup", "epoch": 1}))
    (run / "checkpoints" / "last.keras").write_bytes(b"weights of the first task")
    (run / "history.csv").write_text("phase,epoch,loss\nwarmup,1,0.7\n")
    (run / "train.log").write_text("first run\n")
    rundir.prepare(cfg)


def _cfg(tmp_path, *sets):
    return load_config(None, [f"run.dir={tmp_path / 'run'}", f"prep.out={tmp_path / 'prepared'}", *sets])


def test_the_definition_leaves_out_how_and_how_long_a_run_runs(tmp_path):
    base = _cfg(tmp_path)
    same = _cfg(tmp_path, "runtime.intra_op_threads=3", "train.finetune.epochs=40", "train.stop_check_s=1",
                "prep.out=elsewhere", "run.name=x")
    assert cfgmod.run_hash(same) == cfgmod.run_hash(base)
    for key in ("data.positive_label=Effusion", "train.finetune.lr=0.01", "train.seed=7", "model.dense_units=9",
                "prep.seed=3"):
        other = _cfg(tmp_path, key)
        assert cfgmod.run_hash(other) != cfgmod.run_hash(base), key
        assert rundir.differences(cfgmod.run_definition(base), other) == [
            f"{key.split('=')[0]} {cfgmod.run_definition(base)[key.split('=')[0]]!r} -> "
            f"{cfgmod.run_definition(other)[key.split('=')[0]]!r}"]


def test_a_changed_label_is_refused_naming_the_key_and_restart_moves_the_old_run_aside(tmp_path):
    cfg = _cfg(tmp_path)
    run = tmp_path / "run"
    _killed_run(run, cfg)
    other = _cfg(tmp_path, "data.positive_label=Effusion", "train.finetune.lr=0.01")
    with pytest.raises(rundir.RunMismatch) as e:
        rundir.prepare(other)
    msg = str(e.value)
    assert "\n" not in msg and "data.positive_label 'Infiltration' -> 'Effusion'" in msg
    assert "train.finetune.lr 0.001 -> 0.01" in msg and "--restart" in msg
    assert (run / "checkpoints" / "last.keras").read_bytes() == b"weights of the first task"
    rundir.prepare(cfg)  # the same definition: accepted (a resume)
    (run / ".cxr-lock").write_text("")
    moved = rundir.prepare(other, restart=True)
    assert moved.parent == tmp_path and moved.name.startswith("run.replaced-")
    assert (moved / "checkpoints" / "last.keras").read_bytes() == b"weights of the first task"
    assert (moved / "history.csv").exists() and (moved / "train.log").read_text() == "first run\n"
    assert sorted(os.listdir(run)) == [".cxr-lock", "run.json"]
    assert json.loads((run / "run.json").read_text())["definition"]["data.positive_label"] == "Effusion"


def test_a_run_older_than_run_json_is_judged_by_its_config_yaml(tmp_path):
    cfg = _cfg(tmp_path)
    run = tmp_path / "run"
    _killed_run(run, cfg)
    (run / "run.json").unlink()
    cfgmod.save_resolved(cfg, run)
    assert rundir.mismatch(_cfg(tmp_path, "train.seed=5")) == ["train.seed 1234 -> 5"]
    assert rundir.mismatch(cfg) == []


@pytest.mark.parametrize("key, manifest", [
    ("data.positive_label", {"task": "binary", "image_size": 384, "classes": ["No Finding", "Effusion"]}),
    ("data.image_size", {"task": "binary", "image_size": 224, "classes": ["No Finding", "Infiltration"]}),
    ("data.task", {"task": "multilabel", "image_size": 384, "classes": ["Atelectasis"]}),
])
def test_prepared_data_of_another_label_or_size_is_refused_naming_the_key(tmp_path, key, manifest):
    with pytest.raises(rundir.RunMismatch, match=key.replace(".", r"\.")):
        rundir.check_prep(_cfg(tmp_path), manifest, tmp_path / "prepared")
    rundir.check_prep(_cfg(tmp_path), {"task": "binary", "image_size": 384,
                                       "classes": ["No Finding", "Infiltration"]}, tmp_path / "prepared")


def _train(config, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CXR_NO_HOROVOD="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "distributed.train", "--config", str(config), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_train_resume_with_a_changed_label_is_refused_and_restart_moves_the_run_aside(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run": {"dir": str(tmp_path / "run")}, "prep": {"out": str(tmp_path / "none")},
                                      "model": {"backbone": "tiny", "weights": "none"},
                                      "runtime": {"precision": "float32"}}))
    run = tmp_path / "run"
    _killed_run(run, load_config(config))
    r = _train(config, "--resume", "--set", "data.positive_label=Effusion")
    errors = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "data.positive_label 'Infiltration' -> 'Effusion'" in errors[0] and "--restart" in errors[0]
    assert (run / "history.csv").exists() and (run / "checkpoints" / "last.keras").exists()

    r = _train(config, "--restart", "--set", "data.positive_label=Effusion")
    # the old run is moved aside first; then this fabricated setup has no prepared data: one line
    assert r.returncode != 0 and "Traceback" not in r.stderr and "manifest.json" in r.stderr, r.stderr[-3000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "last.keras").exists()
    assert not (run / "history.csv").exists() and not (run / "checkpoints").exists()
    r = _train(config, "--restart", "--resume")
    assert r.returncode == 2 and "--resume" in r.stderr and "--restart" in r.stderr


def test_launch_train_and_pipeline_stop_before_starting_on_a_run_of_another_definition(tmp_path):
    from launch import pipeline as pl
    from launch.hosts import LaunchError

    cfg = _cfg(tmp_path)
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "manifest.json").write_text(json.dumps({"config_hash": cfgmod.prep_hash(cfg)}))
    _killed_run(tmp_path / "run", cfg)
    pl.check_inputs("train", cfg, "c.yaml")  # the same definition: the pipeline resumes it
    other = _cfg(tmp_path, "train.finetune.optimizer=adam")
    with pytest.raises(LaunchError) as e:
        pl.check_inputs("train", other, "c.yaml")
    assert "train.finetune.optimizer 'sgd' -> 'adam'" in str(e.value) and "--restart" in str(e.value)


def test_the_pipeline_does_not_offer_to_resume_a_run_of_another_definition(tmp_path):
    from launch import pipeline as pl

    cfg = _cfg(tmp_path)
    _killed_run(tmp_path / "run", cfg)
    assert pl.stage_status("train", cfg).resume
    st = pl.stage_status("train", _cfg(tmp_path, "train.warmup.optimizer=adam"))
    assert not st.resume and not st.complete and "train.warmup.optimizer 'rmsprop' -> 'adam'" in st.why
