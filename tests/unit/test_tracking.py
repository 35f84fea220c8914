"""Experiment tracking with MLflow (issue 32, item 5): what is logged from a run folder (params, the per-epoch
history, the test metrics with intervals, the report and plots), read back from a temporary file store with
``mlflow.search_runs``; the MLflow run a folder keeps across a resume; and the run without MLflow."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.config import load_config
from distributed import rundir, tracking

ROOT = Path(__file__).resolve().parents[2]

HISTORY = [
    {"phase": "warmup", "epoch": 1, "loss": 0.9, "accuracy": 0.5, "val_loss": 0.8, "val_accuracy": 0.55,
     "val_auc": 0.61, "lr": 0.001, "seconds": 3.5, "images_per_s": 20.0, "ranks": 2},
    {"phase": "finetune", "epoch": 2, "loss": 0.7, "accuracy": 0.6, "val_loss": 0.65, "val_accuracy": 0.62,
     "val_auc": 0.7, "lr": 0.002, "seconds": 4.0, "images_per_s": 18.0, "ranks": 2},
    {"phase": "finetune", "epoch": 3, "loss": 0.6, "accuracy": 0.7, "val_loss": "", "val_accuracy": "",
     "val_auc": 0.75, "lr": 0.002, "seconds": 4.25, "images_per_s": 17.5, "ranks": 2},
]

METRICS = {
    "task": "binary", "n": 40, "provenance": {"evaluation": "internal"},
    "plain": {"auc": 0.8125, "auc_ci": {"low": 0.7, "high": 0.9, "n_valid": 20},
              "average_precision": 0.75, "average_precision_ci": {"low": 0.6, "high": 0.85},
              "brier": 0.2, "brier_ci": {"low": 0.15, "high": 0.25}, "ece": 0.05, "ece_ci": {"low": 0.01, "high": 0.1},
              "operating_point": {"source": "validation", "rule": "youden", "threshold": 0.4,
                                  "sensitivity": {"value": 0.8, "low": 0.6, "high": 0.9},
                                  "specificity": {"value": 0.7, "low": 0.5, "high": 0.85},
                                  "ppv": {"value": 0.6, "low": 0.4, "high": 0.75},
                                  "npv": {"value": 0.85, "low": 0.7, "high": 0.95},
                                  "accuracy": {"value": 0.74, "low": 0.6, "high": 0.85}}},
    "tta": {"auc": 0.83, "auc_ci": {"low": 0.72, "high": 0.92}, "operating_point": {"threshold": None}},
    "tta_minus_plain": {"auc_diff": 0.0175, "low": -0.01, "high": 0.04},
}


def _rank(monkeypatch, rank: int) -> None:
    """The launcher's rank variables (data_prep.log.env_rank) as under a launcher's rank ``rank``."""
    for k in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    if rank:
        monkeypatch.setenv("OMPI_COMM_WORLD_RANK", str(rank))


def _cfg(tmp_path, *sets, backend="mlflow"):
    return load_config(None, [f"run.dir={tmp_path / 'runs' / 'a'}", f"tracking.backend={backend}",
                              f"tracking.uri={(tmp_path / 'mlruns').as_uri()}", "tracking.experiment=t", *sets])


def _history(run: Path, rows) -> None:
    run.mkdir(parents=True, exist_ok=True)
    with open(run / rundir.HISTORY, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _run_folder(run: Path) -> None:
    """A finished run folder as training and evaluation leave it (the files tracking reads)."""
    from PIL import Image

    _history(run, HISTORY)
    (run / rundir.CONFIG).write_text("run: {name: a}\n")
    (run / rundir.TRAINED_LAYERS).write_text(json.dumps({"finetune": {"trainable_params": 123}}))
    (run / rundir.METRICS).write_text(json.dumps(METRICS))
    (run / rundir.REPORT).write_text("# Report\n\n![ROC](plots/roc.png)\n")
    (run / rundir.PLOTS).mkdir()
    Image.new("L", (8, 8), 128).save(run / rundir.PLOTS / "roc.png")


# --------------------------------------------------------------------------- what is logged (no MLflow)

def test_the_config_becomes_dotted_params_cut_to_mlflows_limit(tmp_path):
    cfg = load_config(None, ["train.finetune.freeze_first=7", "run.name=" + "x" * 7000])
    p = tracking.config_params(cfg)
    assert p["train.finetune.freeze_first"] == "7" and p["model.backbone"] == "vgg16"
    assert p["tracking.backend"] == "none" and p["train.augment.zoom"] == "0.1"
    assert len(p["run.name"]) == tracking.PARAM_VALUE_MAX and p["run.name"].endswith("...")
    assert len(p) == len(tracking.config_params(load_config(None)))  # one param per leaf key


def test_history_rows_become_metrics_per_phase_at_the_run_s_epoch():
    rows = [{k: str(v) for k, v in r.items()} for r in HISTORY]
    got = tracking.history_metrics(rows)
    assert ("loss", 0.9, 1) in got and ("warmup/loss", 0.9, 1) in got
    assert ("finetune/val_auc", 0.75, 3) in got and ("val_auc", 0.7, 2) in got and ("seconds", 4.25, 3) in got
    assert not [k for k, _, s in got if k.endswith("val_loss") and s == 3]  # an empty cell is no value
    assert not [k for k, _, _ in got if k in ("phase", "epoch") or k.endswith(("/phase", "/epoch"))]
    assert {s for _, _, s in tracking.history_metrics(rows, after_epoch=2)} == {3}


def test_the_test_metrics_carry_their_intervals_and_f1_at_the_operating_point():
    m = tracking.evaluation_metrics(METRICS)
    assert (m["test/auc"], m["test/auc_low"], m["test/auc_high"]) == (0.8125, 0.7, 0.9)
    assert (m["test/precision"], m["test/precision_low"], m["test/recall_high"]) == (0.6, 0.4, 0.9)
    assert m["test/f1"] == pytest.approx(2 * 0.6 * 0.8 / 1.4) and m["test/threshold"] == 0.4
    assert m["test/specificity"] == 0.7 and m["test/npv_low"] == 0.7 and m["test/brier_high"] == 0.25
    assert (m["test_tta/auc"], m["test_tta/auc_low"]) == (0.83, 0.72) and "test_tta/threshold" not in m
    assert (m["test/tta_minus_plain"], m["test/tta_minus_plain_high"]) == (0.0175, 0.04)
    multi = {"task": "multilabel", "plain": {"mean_auc": 0.7, "findings": {
        "Pleural_Thickening": {"auc": 0.66, "auc_ci": {"low": 0.5, "high": 0.8}}, "Hernia": {"auc": None}}}}
    mm = tracking.evaluation_metrics(multi, "ext/test")
    assert mm == {"ext/test/mean_auc": 0.7, "ext/test/auc/Pleural_Thickening": 0.66,
                  "ext/test/auc/Pleural_Thickening_low": 0.5, "ext/test/auc/Pleural_Thickening_high": 0.8}


def test_the_store_is_the_config_s_then_the_environment_s_then_beside_run_dir(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}/sweep/arm-1"])
    assert tracking.tracking_uri(cfg, {}) == (tmp_path / "sweep" / "mlruns").as_uri()
    assert tracking.tracking_uri(cfg, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}) == "http://127.0.0.1:5000"
    cfg = load_config(None, [f"run.dir={tmp_path}", "tracking.uri=file:///x/mlruns"])
    assert tracking.tracking_uri(cfg, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}) == "file:///x/mlruns"


def test_the_evaluation_is_read_where_it_wrote(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}"])
    assert tracking.evaluation_folder(cfg, {"provenance": {"evaluation": "internal"}}) == tmp_path / "run"
    assert tracking.evaluation_folder(cfg, {"provenance": None}) == tmp_path / "run"
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", f"eval.out={tmp_path / 'ext'}"])
    assert tracking.evaluation_folder(cfg, {"provenance": {"evaluation": "external"}}) == tmp_path / "ext"


def test_tracking_is_off_by_default_and_a_bad_backend_names_the_key():
    from data_prep.config import ConfigError

    assert load_config(None).tracking.backend == "none" and not tracking.enabled(load_config(None))
    with pytest.raises(ConfigError, match=r"^tracking\.backend: 'wandb' is not allowed; expected one of 'none', "
                                          r"'mlflow'$"):
        load_config(None, ["tracking.backend=wandb"])


def test_without_mlflow_tracking_on_is_one_line_naming_the_extra_and_off_is_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    _rank(monkeypatch, 0)
    tracking.require(_cfg(tmp_path, backend="none"))
    assert tracking.log_training(_cfg(tmp_path, backend="none")) is None
    with pytest.raises(tracking.TrackingError, match=r"^tracking\.backend is mlflow but MLflow cannot be imported "
                                                     r".*: pip install -r requirements-tracking\.txt, or set "
                                                     r"tracking\.backend: none$"):
        tracking.require(_cfg(tmp_path))


def test_training_with_tracking_on_stops_before_it_starts_without_mlflow(tmp_path):
    """The command's one line, exit code 1, before any data is read (prep.out does not even exist)."""
    code = ("import sys; sys.modules['mlflow'] = None\n"
            "from distributed.train import main\nsys.exit(main(sys.argv[1:]))")
    (tmp_path / "c.yaml").write_text("{}\n")
    p = subprocess.run([sys.executable, "-c", code, "--config", str(tmp_path / "c.yaml"), "--set",
                        f"run.dir={tmp_path / 'run'}", "--set", f"prep.out={tmp_path / 'none'}", "--set",
                        "tracking.backend=mlflow"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), CXR_NO_HOROVOD="1"))
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and lines[-1].startswith("cxr-train: error: tracking.backend is mlflow but MLflow "), \
        p.stderr[-2000:]
    assert "requirements-tracking.txt" in lines[-1] and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- logged and read back (MLflow)

@pytest.mark.needs_mlflow
def test_a_run_folder_logged_to_a_file_store_reads_back(tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    _rank(monkeypatch, 0)
    cfg = _cfg(tmp_path, "train.finetune.freeze_first=5")
    run = Path(cfg.run.dir)
    _run_folder(run)
    run_id = tracking.log_training(cfg)
    assert run_id and tracking.log_evaluation(cfg, METRICS) == run_id
    assert json.loads((run / rundir.TRACKING).read_text())["run_id"] == run_id

    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking.uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 opens a file store only when told to
    df = mlflow.search_runs(experiment_names=["t"])
    assert len(df) == 1 and df.loc[0, "run_id"] == run_id and df.loc[0, "status"] == "FINISHED"
    row = df.loc[0]
    assert row["params.train.finetune.freeze_first"] == "5" and row["params.model.backbone"] == "vgg16"
    assert row["metrics.test/auc"] == 0.8125 and row["metrics.test/auc_low"] == 0.7
    assert row["metrics.test/auc_high"] == 0.9 and row["metrics.test/recall"] == 0.8
    assert row["metrics.val_auc"] == 0.75  # the last epoch's value
    assert row["tags.cxr.folder"] == "a" and row["tags.cxr.parent"] == "runs" and row["tags.mlflow.runName"] == "a"
    client = MlflowClient(cfg.tracking.uri)
    hist = client.get_metric_history(run_id, "finetune/val_auc")
    assert sorted((m.step, m.value) for m in hist) == [(2, 0.7), (3, 0.75)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "warmup/loss")] == [(1, 0.9)]
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {rundir.REPORT, rundir.METRICS, rundir.HISTORY, rundir.CONFIG, rundir.TRAINED_LAYERS,
            rundir.PLOTS} <= top
    assert [a.path for a in client.list_artifacts(run_id, rundir.PLOTS)] == [f"{rundir.PLOTS}/roc.png"]
    report = client.download_artifacts(run_id, rundir.REPORT, str(tmp_path))
    assert Path(report).read_text() == (run / rundir.REPORT).read_text()
    # an external evaluation (another prep, its own folder): the same MLflow run, under the folder's name
    ext = run / "eval-0123abcd"
    ext.mkdir()
    (ext / rundir.REPORT).write_text("# External\n")
    other = {**METRICS, "plain": {**METRICS["plain"], "auc": 0.6}, "provenance": {"evaluation": "external"}}
    assert tracking.log_evaluation(cfg, other, ext) == run_id
    r = client.get_run(run_id)
    assert r.data.metrics["eval-0123abcd/test/auc"] == 0.6 and r.data.metrics["test/auc"] == 0.8125
    assert [a.path for a in client.list_artifacts(run_id, "eval-0123abcd")] == [f"eval-0123abcd/{rundir.REPORT}"]


@pytest.mark.needs_mlflow
def test_only_rank_0_logs_and_a_finished_folder_is_logged_after_the_fact(tmp_path, monkeypatch, capsys):
    cfg = _cfg(tmp_path)
    run = Path(cfg.run.dir)
    _run_folder(run)
    _rank(monkeypatch, 1)
    tracking.require(cfg)  # rank 1 logs nothing, so it needs no MLflow either
    assert tracking.log_training(cfg) is None and tracking.log_evaluation(cfg, METRICS) is None
    assert not (run / rundir.TRACKING).exists() and not (tmp_path / "mlruns").exists()
    _rank(monkeypatch, 0)
    (tmp_path / "c.yaml").write_text(f"run: {{dir: {run}}}\ntracking: {{uri: {cfg.tracking.uri}, experiment: t}}\n")
    assert tracking.main(["--config", str(tmp_path / "c.yaml")]) == 0  # tracking.backend none: the command turns it on
    rec = json.loads((run / rundir.TRACKING).read_text())
    assert capsys.readouterr().out.strip() == f"MLflow run {rec['run_id']} in {cfg.tracking.uri}"
    from mlflow.tracking import MlflowClient

    r = MlflowClient(cfg.tracking.uri).get_run(rec["run_id"])
    assert r.data.metrics["test/auc"] == 0.8125 and r.data.metrics["loss"] == 0.6 and rec["logged_epochs"] == 3
    assert rec["evaluated"] == str(run)
    (tmp_path / "empty.yaml").write_text(f"run: {{dir: {tmp_path / 'none'}}}\n")
    assert tracking.main(["--config", str(tmp_path / "empty.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m distributed.tracking: error: run.dir ") \
        and "holds no training run" in err[0]


@pytest.mark.needs_mlflow
def test_a_resume_logs_into_the_same_mlflow_run_once_and_a_new_training_opens_another(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    _rank(monkeypatch, 0)
    cfg = _cfg(tmp_path)
    run = Path(cfg.run.dir)
    _history(run, HISTORY[:2])
    first = tracking.log_training(cfg)
    _history(run, HISTORY)  # the resumed training added epoch 3
    assert tracking.log_training(cfg, resume=True) == first
    assert tracking.log_training(cfg, resume=True) == first  # again: nothing new, nothing twice
    client = MlflowClient(cfg.tracking.uri)
    assert sorted(m.step for m in client.get_metric_history(first, "loss")) == [1, 2, 3]
    # a later stage's config that differs: MLflow's params stay, the difference is a tag
    later = _cfg(tmp_path, "eval.tta_rounds=3")
    assert tracking.log_evaluation(later, {"task": "binary", "n": 4}, run) == first
    r = client.get_run(first)
    assert r.data.params["eval.tta_rounds"] == "5" and r.data.tags["config_changed.eval.tta_rounds"] == "3"
    # a training started afresh (no --resume), or a history that is not the one logged: a new MLflow run
    second = tracking.log_training(cfg)
    assert second != first
    _history(run, [{**HISTORY[0], "loss": 0.95}])
    third = tracking.log_training(cfg, resume=True)
    assert third not in (first, second)
    assert len(client.search_runs([r.info.experiment_id])) == 3
    # a damaged record is not guessed at: a new MLflow run
    (run / rundir.TRACKING).write_text(json.dumps({"run_id": third, "logged_epochs": "many"}))
    assert tracking.read_record(run) is None and tracking.log_training(cfg, resume=True) not in (first, second, third)
    # an experiment deleted in the store is one line, a warning after the stage
    client.delete_experiment(r.info.experiment_id)
    assert tracking.log_training(cfg) is None
    with pytest.raises(tracking.TrackingError, match=r"^tracking\.experiment: 't' is deleted in file://"):
        tracking.Tracker(cfg, reuse=False)


@pytest.mark.needs_mlflow
def test_a_store_that_refuses_is_a_warning_after_training(tmp_path, monkeypatch):
    said = []

    class Log:
        def warning(self, msg, *args):
            said.append(msg % args)
    monkeypatch.setattr(tracking, "get_logger", Log)
    _rank(monkeypatch, 0)
    (tmp_path / "file").write_text("not a folder")
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", "tracking.backend=mlflow",
                             f"tracking.uri={(tmp_path / 'file' / 'mlruns').as_uri()}"])
    _history(Path(cfg.run.dir), HISTORY)
    assert tracking.log_training(cfg) is None
    (err,) = said
    assert "MLflow: the training was not logged (tracking.uri file://" in err
    assert "NotADirectoryError" in err and "python -m distributed.tracking --config" in err
    assert not (Path(cfg.run.dir) / rundir.TRACKING).exists()


# --------------------------------------------------------------------------- a real run (tiny backbone, 1 process)

TINY = ["data.image_size=32", "prep.shard_size=16", "model.backbone=tiny", "model.weights=none",
        "model.dense_units=8", "train.batch_size=4", "train.steps_per_epoch=2", "train.warmup.epochs=1",
        "train.finetune.epochs=1", "eval.tta=false", "eval.bootstrap=20", "eval.gradcam_per_group=0",
        "runtime.precision=float32"]
HIDDEN = "import sys; sys.modules['mlflow'] = None\nfrom {0} import main\nsys.exit(main(sys.argv[1:]))"
MODULES = {"prep": "data_prep.__main__", "train": "distributed.train", "evaluate": "distributed.evaluate"}


def _run(args, stage, hide_mlflow=False):
    """A stage as a command on one process; ``hide_mlflow``: where ``import mlflow`` fails."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), CXR_NO_HOROVOD="1", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("MLFLOW_TRACKING_URI", None)
    code = HIDDEN.format(MODULES[stage]) if hide_mlflow else HIDDEN.replace("sys.modules['mlflow'] = None",
                                                                            "").format(MODULES[stage])
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, f"{stage}: {p.stderr[-3000:]}"
    return p


@pytest.mark.needs_mlflow
def test_a_tiny_run_trained_without_mlflow_then_evaluated_and_resumed_with_tracking(tmp_path, monkeypatch):
    """Training with tracking off works where MLflow cannot be imported; the evaluation with tracking on opens
    the folder's MLflow run in the default store beside run.dir, and a --resume of the finished training
    with tracking on adds its params and history to that same run."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    synth = subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--out", str(tmp_path / "data"), "--patients",
                            "30", "--image-size", "32", "--seed", "3", "--no-progress"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert synth.returncode == 0, synth.stderr[-2000:]
    (tmp_path / "c.yaml").write_text("{}\n")
    sets = [f"data.csv={tmp_path / 'data' / 'Data_Entry_2017.csv'}", f"data.images={tmp_path / 'data'}",
            f"prep.out={tmp_path / 'prepared'}", f"run.dir={tmp_path / 'runs' / 'tiny'}", *TINY]
    args = ["--config", str(tmp_path / "c.yaml"), *(a for s in sets for a in ("--set", s))]
    _run(args, "prep")
    run, store = tmp_path / "runs" / "tiny", tmp_path / "runs" / tracking.STORE_DIR
    _run(args, "train", hide_mlflow=True)
    assert (run / rundir.FINAL).is_file() and not (run / rundir.TRACKING).exists() and not store.exists()

    on = [*args, "--set", "tracking.backend=mlflow"]
    _run(on, "evaluate")
    first = json.loads((run / rundir.TRACKING).read_text())
    assert first["uri"] == store.as_uri() and first["logged_epochs"] == 0
    _run([*on, "--resume"], "train")  # finished: nothing to train, the history is logged
    rec = json.loads((run / rundir.TRACKING).read_text())
    assert rec["run_id"] == first["run_id"] and rec["logged_epochs"] == 2

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 opens a file store only when told to
    client = MlflowClient(store.as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == tracking.DEFAULT_EXPERIMENT]
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.run_id == rec["run_id"] and r.data.params["model.backbone"] == "tiny"
    m = json.loads((run / rundir.METRICS).read_text())
    assert r.data.metrics["test/auc"] == pytest.approx(m["plain"]["auc"])
    assert r.data.metrics["test/auc_low"] == pytest.approx(m["plain"]["auc_ci"]["low"])
    rows = rundir.read_history(run / rundir.HISTORY)
    hist = client.get_metric_history(r.info.run_id, "val_loss")
    assert [(h.step, h.value) for h in sorted(hist, key=lambda h: h.step)] == \
        [(int(x["epoch"]), pytest.approx(float(x["val_loss"]))) for x in rows]
    assert [h.step for h in client.get_metric_history(r.info.run_id, "finetune/loss")] == [2]
    top = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {rundir.REPORT, rundir.METRICS, rundir.HISTORY, rundir.PLOTS} <= top
    assert any(a.path.endswith(".png") for a in client.list_artifacts(r.info.run_id, rundir.PLOTS))


def test_mlflow_is_imported_in_tracking_only_and_only_inside_its_functions():
    import ast

    found = []
    for pkg in ("data_prep", "distributed", "launch", "benchmarks"):
        for path in sorted((ROOT / pkg).glob("*.py")):
            tree = ast.parse(path.read_text())
            top = {id(n) for n in tree.body}
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    if path.name != "tracking.py" or pkg != "distributed" or id(node) in top:
                        found.append(where)
    assert found == [], "mlflow imported outside distributed/tracking.py's functions: " + ", ".join(found)
