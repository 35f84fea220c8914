"""Experiment tracking with MLflow: ``tracking.backend: mlflow`` (optional extra: requirements-tracking.txt).

One MLflow run per training run (``run.dir``; a sweep's arms are runs, each its own). Rank 0, after
training (:func:`log_training`, from ``distributed.train.main``): the resolved config as params (dotted
keys), the per-epoch history (``history.csv``: every numeric column under its own name and under
``<phase>/<column>``, the step being the epoch counted over the whole run), and ``config.yaml``,
``history.csv`` and ``trained_layers.json`` as artifacts. Rank 0, after evaluation (:func:`log_evaluation`,
from ``distributed.evaluate.main``), into the same MLflow run: the test metrics with their intervals
(``test/auc``, ``test/auc_low``, ``test/auc_high``, precision, recall, F1, specificity, NPV and accuracy at
the operating point chosen on validation; ``test_tta/...`` for test-time augmentation and
``test/tta_minus_plain``), and ``report.md``, ``metrics.json`` and the plots and Grad-CAM grids as
artifacts (an external evaluation under the name of its folder). ``python -m distributed.tracking --config
C`` logs a finished run folder after the fact (a run trained before tracking was turned on, or a stage
``launch pipeline`` skipped as complete).

The store: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the local file store
``<run.dir>/../mlruns`` (beside the run folder: a sweep's arms share their sweep's store). The MLflow run's
id is recorded in ``run.dir/tracking.json`` (``rundir.TRACKING``): a resumed training and the evaluation
log into it; a training started afresh opens a new MLflow run.

MLflow is imported here only, and only when tracking is on; with tracking on and MLflow missing, rank 0
stops before training or evaluation starts with one line naming requirements-tracking.txt
(:func:`require`). Nothing here imports TensorFlow or Horovod; a failure of the store after training is a
warning (the trained run stays valid; the command above logs it again).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

from data_prep import config as cfgmod
from data_prep.cli import UserError, command
from data_prep.fsutil import atomic_write_json
from data_prep.log import env_rank, get_logger
from distributed import rundir

STORE_DIR = "mlruns"                 # the local file store beside run.dir
DEFAULT_EXPERIMENT = "cxr-transfer"
INSTALL = "pip install -r requirements-tracking.txt"
PARAM_VALUE_MAX = 6000               # MLflow's limit on a param's value (mlflow.utils.validation)
PARAMS_PER_BATCH = 100               # MLflow's limit on params per log_batch
METRICS_PER_BATCH = 1000             # and on metrics
NOT_METRICS = ("phase", "epoch")     # history.csv columns that are not per-epoch values


class TrackingError(UserError):
    """Tracking is on but cannot work (MLflow missing, the store refused): one line, exit code 1."""


def enabled(cfg) -> bool:
    return cfg.tracking.backend == "mlflow"


def chief() -> bool:
    """The project's rank-0 check: Horovod's rank once it runs, else the launcher's."""
    from distributed import hvd

    return hvd.is_root() if hvd.enabled() else env_rank() == 0


def _mlflow():
    """``mlflow`` and its client class; TrackingError with the install line when it cannot be imported."""
    try:
        import mlflow
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise TrackingError(f"tracking.backend is mlflow but MLflow cannot be imported ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}): {INSTALL}, or set "
                            "tracking.backend: none") from None
    return mlflow, MlflowClient


def require(cfg) -> None:
    """Before training or evaluation starts, on rank 0 (the one that logs): MLflow importable when tracking is on."""
    if enabled(cfg) and env_rank() == 0:
        _mlflow()


def tracking_uri(cfg, environ=None) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``file://<run.dir>/../mlruns``."""
    environ = os.environ if environ is None else environ
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if environ.get("MLFLOW_TRACKING_URI"):
        return environ["MLFLOW_TRACKING_URI"]
    return (Path(cfg.run.dir).resolve().parent / STORE_DIR).as_uri()


def _is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or "://" not in uri and not uri.startswith(("databricks", "sqlite"))


# --------------------------------------------------------------------------- what is logged (pure)

def config_params(cfg, limit: int = PARAM_VALUE_MAX) -> dict[str, str]:
    """The resolved config as ``{dotted key: text}``; a value longer than MLflow allows is cut, marked with '...'."""
    out = {}

    def walk(node, prefix):
        for f in dataclasses.fields(node):
            value, key = getattr(node, f.name), f"{prefix}.{f.name}" if prefix else f.name
            if dataclasses.is_dataclass(value):
                walk(value, key)
            else:
                text = str(value)
                out[key] = text if len(text) <= limit else text[:limit - 3] + "..."
    walk(cfg, "")
    return out


def _number(text) -> float | None:
    try:
        x = float(text)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def history_metrics(rows: list[dict], after_epoch: int = 0) -> list[tuple[str, float, int]]:
    """``(key, value, step)`` of ``history.csv``'s rows after epoch ``after_epoch``: each numeric column under
    its own name and under ``<phase>/<column>``, the step being the run's epoch (counted over both phases)."""
    out = []
    for r in rows:
        step = _number(r.get("epoch"))
        if step is None or int(step) <= after_epoch:
            continue
        phase = (r.get("phase") or "").strip()
        for k, v in r.items():
            x = _number(v)
            if k in NOT_METRICS or k is None or x is None:
                continue
            out.append((k, x, int(step)))
            if phase:
                out.append((f"{phase}/{k}", x, int(step)))
    return out


def _put(out: dict, key: str, value) -> None:
    x = _number(value) if not isinstance(value, bool) else None
    if x is not None:
        out[key] = x


def _with_interval(out: dict, key: str, point: dict | None) -> None:
    """``key``, ``key_low``, ``key_high`` from ``{value, low, high}``."""
    if isinstance(point, dict):
        _put(out, key, point.get("value"))
        _put(out, f"{key}_low", point.get("low"))
        _put(out, f"{key}_high", point.get("high"))


def evaluation_metrics(metrics: dict, prefix: str = "test") -> dict[str, float]:
    """The numbers of ``metrics.json`` worth a chart, by name: AUC with its interval, average precision,
    Brier and ECE, and at the operating point precision (PPV), recall (sensitivity), F1, specificity, NPV,
    accuracy and the threshold; ``<prefix>_tta/...`` the same with test-time augmentation; multi-label:
    the mean AUC and each finding's AUC with its interval."""
    out: dict[str, float] = {}
    _put(out, f"{prefix}/n", metrics.get("n"))
    multilabel = metrics.get("task") == "multilabel"
    for kind, name in (("plain", prefix), ("tta", f"{prefix}_tta")):
        m = metrics.get(kind)
        if not isinstance(m, dict):
            continue
        if multilabel:
            _put(out, f"{name}/mean_auc", m.get("mean_auc"))
            for finding, f in (m.get("findings") or {}).items():
                if isinstance(f, dict):
                    key = f"{name}/auc/{_key(finding)}"
                    _with_interval(out, key, {"value": f.get("auc"), **(f.get("auc_ci") or {})})
            continue
        _with_interval(out, f"{name}/auc", {"value": m.get("auc"), **(m.get("auc_ci") or {})})
        _with_interval(out, f"{name}/average_precision",
                       {"value": m.get("average_precision"), **(m.get("average_precision_ci") or {})})
        for k in ("brier", "ece"):
            _with_interval(out, f"{name}/{k}", {"value": m.get(k), **(m.get(f"{k}_ci") or {})})
        op = m.get("operating_point") or {}
        _put(out, f"{name}/threshold", op.get("threshold"))
        for src, dst in (("ppv", "precision"), ("sensitivity", "recall"), ("specificity", "specificity"),
                         ("npv", "npv"), ("accuracy", "accuracy")):
            _with_interval(out, f"{name}/{dst}", op.get(src))
        p, r = out.get(f"{name}/precision"), out.get(f"{name}/recall")
        if p is not None and r is not None and p + r > 0:
            out[f"{name}/f1"] = 2 * p * r / (p + r)
    diff = metrics.get("tta_minus_plain")
    if isinstance(diff, dict):
        _with_interval(out, f"{prefix}/tta_minus_plain",
                       {"value": diff.get("auc_diff", diff.get("mean_auc_diff")), **diff})
    return out


def _key(name: str) -> str:
    """A name as MLflow allows in a key (letters, digits, _ - . / and spaces)."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in str(name))


# --------------------------------------------------------------------------- the store

def read_record(run_dir) -> dict | None:
    """``run.dir/tracking.json``: the MLflow run this run folder logs into; None when there is none."""
    try:
        doc = json.loads((Path(run_dir) / rundir.TRACKING).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("run_id"), str):
        return None
    epochs = doc.get("logged_epochs", 0)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        return None  # not a record this module wrote: a new MLflow run rather than a guess
    return doc


class Tracker:
    """The MLflow run of a run folder, opened through ``MlflowClient`` (no global state of mlflow's)."""

    def __init__(self, cfg, reuse: bool = True):
        _, client_cls = _mlflow()
        from mlflow.entities import Metric, Param, RunTag

        self._Metric, self._Param, self._Tag = Metric, Param, RunTag
        self.cfg, self.run_dir, self.uri = cfg, Path(cfg.run.dir), tracking_uri(cfg)
        if _is_file_store(self.uri):
            # MLflow 3 refuses its file store unless this says it is wanted (it suggests a database instead)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self.client = client_cls(tracking_uri=self.uri)
            self.record = self._open(reuse)
        except TrackingError:
            raise
        except Exception as e:  # noqa: BLE001 - MlflowException, OSError, connection errors: the store refused
            raise TrackingError(f"tracking.uri {self.uri}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") \
                from None
        self.run_id = self.record["run_id"]

    def _open(self, reuse: bool) -> dict:
        rec = read_record(self.run_dir)
        rows = rundir.read_history(self.run_dir / rundir.HISTORY) if rec else []
        # the epochs it logged must be this history's: else another training (started afresh since) is here
        if reuse and rec and rec.get("uri") == self.uri and \
                rec.get("history_sha256") == _history_digest(rows, int(rec.get("logged_epochs") or 0)):
            try:
                run = self.client.get_run(rec["run_id"])
                if run.info.lifecycle_stage == "active":
                    return rec
            except Exception:  # noqa: BLE001 - deleted from the store: a new run below
                pass
        name = self.cfg.tracking.experiment or DEFAULT_EXPERIMENT
        exp_id = self._experiment(name)
        run = self.client.create_run(exp_id, run_name=self.cfg.run.name or self.run_dir.name, tags=self._tags())
        rec = {"backend": "mlflow", "uri": self.uri, "experiment": name, "experiment_id": exp_id,
               "run_id": run.info.run_id, "logged_epochs": 0, "history_sha256": _history_digest([], 0)}
        self._write(rec)
        return rec

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(name)
            except Exception:  # noqa: BLE001 - made meanwhile by another run (two sweeps, two pipelines)
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage != "active":
            raise TrackingError(f"tracking.experiment: {name!r} is deleted in {self.uri}; restore it "
                                "(mlflow experiments restore) or name another experiment")
        return exp.experiment_id

    def _tags(self) -> dict:
        """The run folder, its definition's hash, and its folder and parent's names: a sweep arm's and its sweep's."""
        run = self.run_dir.resolve()
        return {"cxr.run_dir": str(run), "cxr.run_hash": cfgmod.run_hash(self.cfg), "cxr.folder": run.name,
                "cxr.parent": run.parent.name}

    def _write(self, rec: dict) -> None:
        atomic_write_json(self.run_dir / rundir.TRACKING,
                          {**rec, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def log_params(self, params: dict[str, str]) -> list[str]:
        """Log the params the run lacks; a value that differs from the logged one (a later stage's
        config: MLflow's params never change) becomes the tag ``config_changed.<key>``. Returns those keys."""
        have = self.client.get_run(self.run_id).data.params
        new = [self._Param(k, v) for k, v in params.items() if k not in have]
        changed = {k: v for k, v in params.items() if k in have and have[k] != v}
        for i in range(0, len(new), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + PARAMS_PER_BATCH])
        tags = [self._Tag(f"config_changed.{k}", v) for k, v in changed.items()]
        for i in range(0, len(tags), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=tags[i:i + PARAMS_PER_BATCH])
        return sorted(changed)

    def log_metrics(self, items: list[tuple[str, float, int]]) -> None:
        now = int(time.time() * 1000)
        ms = [self._Metric(k, float(v), now, int(step)) for k, v, step in items]
        for i in range(0, len(ms), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=ms[i:i + METRICS_PER_BATCH])

    def log_files(self, folder: Path, names, artifact_path: str | None = None) -> list[str]:
        done = []
        for n in names:
            p = Path(folder) / n
            if p.is_file():
                self.client.log_artifact(self.run_id, str(p), artifact_path)
                done.append(n)
        return done

    def log_pngs(self, folder: Path, artifact_path: str) -> int:
        pngs = sorted(Path(folder).glob("*.png")) if Path(folder).is_dir() else []
        for p in pngs:
            self.client.log_artifact(self.run_id, str(p), artifact_path)
        return len(pngs)

    def mark(self, **fields) -> None:
        self.record = {**self.record, **fields}
        self._write(self.record)

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


# --------------------------------------------------------------------------- the stages' hooks

def log_training(cfg, resume: bool = False) -> str | None:
    """Rank 0 after training: params, the history not logged yet, the training's files. A resumed training
    logs into its MLflow run; one started afresh opens a new one. Returns the MLflow run id (None: off)."""
    if not enabled(cfg) or not chief():
        return None
    return _guarded(cfg, "training", lambda: _log_training(cfg, reuse=resume))


def _history_digest(rows: list[dict], epochs: int) -> str:
    kept = [r for r in rows if (_number(r.get("epoch")) or 0) <= epochs]
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def _log_training(cfg, reuse: bool) -> str:
    t = Tracker(cfg, reuse=reuse)
    run_dir = t.run_dir
    rows = rundir.read_history(run_dir / rundir.HISTORY)
    t.log_params(config_params(cfg))
    done = int(t.record.get("logged_epochs") or 0)
    t.log_metrics(history_metrics(rows, after_epoch=done))
    last = max((int(x) for x in (_number(r.get("epoch")) for r in rows) if x is not None), default=done)
    t.log_files(run_dir, [rundir.CONFIG, rundir.HISTORY, rundir.TRAINED_LAYERS])
    t.mark(logged_epochs=max(done, last), history_sha256=_history_digest(rows, max(done, last)))
    t.finish()
    get_logger().info("MLflow: training logged to run %s (%d epochs) in %s", t.run_id, last, t.uri)
    return t.run_id


def evaluation_folder(cfg, metrics: dict) -> Path:
    """Where the evaluation wrote: ``eval.out``, else run.dir for the run's own prep, else (an external
    evaluation) the folder ``distributed.provenance`` names."""
    if cfg.eval.out:
        return Path(cfg.eval.out)
    if (metrics.get("provenance") or {}).get("evaluation") != "external":
        return Path(cfg.run.dir)
    from distributed import provenance

    return Path(provenance.check(cfg, Path(cfg.run.dir))["out_dir"])


def log_evaluation(cfg, metrics, out_dir=None) -> str | None:
    """Rank 0 after evaluation (``metrics``: the ``distributed.results.EvalResult`` it returned, or its JSON
    form; None off rank 0): into the run folder's MLflow run, the test metrics with intervals and the report,
    metrics.json, plots and Grad-CAM grids."""
    if not enabled(cfg) or metrics is None or not chief():
        return None
    if not isinstance(metrics, dict):
        metrics = metrics.to_json()  # metrics.json's own form: the keys evaluation_metrics reads
    return _guarded(cfg, "evaluation", lambda: _log_evaluation(cfg, metrics, out_dir))


def _log_evaluation(cfg, metrics: dict, out_dir=None) -> str:
    out = Path(out_dir) if out_dir is not None else evaluation_folder(cfg, metrics)
    t = Tracker(cfg, reuse=True)
    own = out.resolve() == t.run_dir.resolve()
    where = None if own else _key(out.name)  # an external evaluation: its metrics and files under its folder's name
    changed = t.log_params(config_params(cfg))
    numbers = evaluation_metrics(metrics, "test" if own else f"{where}/test")
    t.log_metrics([(k, v, 0) for k, v in numbers.items()])
    t.log_files(out, [rundir.REPORT, rundir.METRICS, rundir.EVAL_CONFIG, rundir.OPERATING_POINT,
                      rundir.CALIBRATION], where)
    n = t.log_pngs(out / rundir.PLOTS, f"{where}/{rundir.PLOTS}" if where else rundir.PLOTS)
    n += t.log_pngs(out / rundir.GRADCAM, f"{where}/{rundir.GRADCAM}" if where else rundir.GRADCAM)
    t.mark(evaluated=str(out))
    t.finish()
    get_logger().info("MLflow: evaluation logged to run %s (%d metrics, %d images%s) in %s", t.run_id, len(numbers),
                      n, f"; config differs from the training's in {', '.join(changed)}" if changed else "", t.uri)
    return t.run_id


def _guarded(cfg, stage: str, fn):
    """Run a logging step after its stage finished: a store failure is a warning (the stage's outputs stand)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the trained model and report are valid without the tracking copy
        get_logger().warning("MLflow: the %s was not logged (%s); once fixed: python -m distributed.tracking "
                             "--config ... (the same config)", stage, str(e).splitlines()[0][:300] if str(e) else
                             type(e).__name__)
        return None


# --------------------------------------------------------------------------- a finished run folder, after the fact

@command("python -m distributed.tracking")
def main(argv=None) -> int:
    """``python -m distributed.tracking --config C [--set k=v]``: log run.dir (training and evaluation) to MLflow."""
    ap = cfgmod.add_config_args(argparse.ArgumentParser(prog="python -m distributed.tracking",
                                                        description=main.__doc__))
    args = ap.parse_args(argv)
    cfg = cfgmod.config_from_args(args)
    if not enabled(cfg):
        cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, backend="mlflow"))
    run_dir = Path(cfg.run.dir)
    if not rundir.holds_run(run_dir):
        raise TrackingError(f"run.dir {run_dir} holds no training run (no {rundir.HISTORY}, {rundir.FINAL} or "
                            "checkpoints)")
    run_id = _log_training(cfg, reuse=True)
    metrics_file = run_dir / rundir.METRICS
    if metrics_file.is_file():
        from distributed import results

        _log_evaluation(cfg, results.read(metrics_file).to_json(), run_dir)
    print(f"MLflow run {run_id} in {tracking_uri(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
