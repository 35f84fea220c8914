"""What each stage needs and leaves, so ``pipeline`` skips finished stages and resumes the rest.

* prep is complete when ``<prep.out>/manifest.json`` carries this config's prep hash;
* train is complete when ``<run.dir>/model.keras`` exists and ``<run.dir>/pipeline.json`` (written
  by the launcher when the train stage exits 0) carries this config's train hash; an unfinished
  run with checkpoints is continued with ``--resume``; a run of another definition in ``run.dir``
  (``distributed.rundir``) stops the launch before anything starts, naming the keys that differ;
* evaluate is complete when ``<run.dir>/report.md`` is newer than the model it evaluated (and,
  when the launcher recorded it, was made with this config's eval section).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from data_prep import config as cfgmod
from data_prep.fsutil import atomic_write_json
from distributed import rundir
from launch.hosts import LaunchError

STAGES = ("prep", "train", "evaluate")
MARKER = "pipeline.json"


def manifest_path(cfg) -> Path:
    return Path(cfg.prep.out) / "manifest.json"


def evaluated_model(cfg) -> Path:
    return rundir.evaluated_file(cfg.run.dir, cfg.eval.checkpoint, cfg.eval.checkpoint_phase)


def read_marker(cfg) -> dict:
    p = Path(cfg.run.dir) / MARKER
    try:
        data = json.loads(p.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_marker(cfg, stage: str, ranks: int, command: str) -> None:
    data = read_marker(cfg)
    h = cfgmod.stage_hash(cfg, stage)
    data[stage] = {"config_hash": h, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ranks": ranks,
                   "command": command}
    atomic_write_json(Path(cfg.run.dir) / MARKER, data)


@dataclass(frozen=True)
class Status:
    complete: bool
    why: str
    resume: bool = False


def _manifest_hash(cfg) -> str | None:
    p = manifest_path(cfg)
    try:
        return json.loads(p.read_text()).get("config_hash")
    except (OSError, ValueError, AttributeError):
        return None


def stage_status(stage: str, cfg) -> Status:
    run = Path(cfg.run.dir)
    if stage == "prep":
        h = _manifest_hash(cfg)
        if h is None:
            return Status(False, f"no manifest at {manifest_path(cfg)}")
        if h != cfgmod.prep_hash(cfg):
            return Status(False, f"{manifest_path(cfg)} was made with another config (hash {h})")
        return Status(True, f"{manifest_path(cfg)} matches this config (hash {h})")
    if stage == "train":
        model = run / rundir.FINAL
        marker = read_marker(cfg).get("train", {})
        ckpt = run / rundir.CHECKPOINTS
        # an epoch's checkpoint, or a step checkpoint (a stop signal in the first epoch)
        resume = (run / rundir.LAST).exists() or (run / rundir.STATE).exists() or any(ckpt.glob(rundir.STEP_GLOB))
        if model.exists() and marker.get("config_hash") == cfgmod.train_hash(cfg):
            return Status(True, f"{model} finished for this config")
        if model.exists() and not marker and _trainer_finished(cfg):
            return Status(True, f"{model} finished for this config ({rundir.STATE}, {rundir.CONFIG})")
        if model.exists() and marker:
            return Status(False, f"{model} was trained with another config", resume=False)
        diff = rundir.mismatch(cfg)
        if diff:  # never resumed: check_inputs stops the launch naming the keys
            return Status(False, f"{run} holds a run of another definition ({rundir.listing(diff)})", resume=False)
        if resume:
            return Status(False, f"checkpoints in {ckpt}: training continues", resume=True)
        return Status(False, "not trained yet")
    if stage == "evaluate":
        report, model = run / rundir.REPORT, evaluated_model(cfg)
        if not report.exists():
            return Status(False, f"no {report}")
        models = [m for m in (model, run / rundir.FINAL) if m.exists()]
        if not models or report.stat().st_mtime <= max(m.stat().st_mtime for m in models):
            return Status(False, f"{report} is older than the model")
        marker = read_marker(cfg).get("evaluate")
        if marker and marker.get("config_hash") != cfgmod.eval_hash(cfg):
            return Status(False, f"{report} was made with another eval config")
        return Status(True, f"{report} is newer than the model")
    raise ValueError(stage)


def _trainer_finished(cfg) -> bool:
    """A run trained without the launcher: the trainer's own state says complete, and the resolved
    config it saved has this config's train hash."""
    run = Path(cfg.run.dir)
    try:
        state = json.loads((run / rundir.STATE).read_text())
        if not state.get("complete"):
            return False
        saved = cfgmod.load_config(run / rundir.CONFIG)
    except (OSError, ValueError, cfgmod.ConfigError):
        return False
    return cfgmod.train_hash(saved) == cfgmod.train_hash(cfg)


def check_inputs(stage: str, cfg, config_arg: str, restart: bool = False) -> None:
    """Raise LaunchError (one sentence) when ``stage`` would start without its input (``restart``: the
    training starts over, so a run of another definition in run.dir is no obstacle)."""
    if stage == "prep":
        csv = Path(cfg.data.csv)
        if not csv.exists():
            raise LaunchError(f"prep needs the metadata CSV data.csv = {csv}, which does not exist; make a demo "
                              f"set with `python -m data_prep.synthetic --out DIR` or point data.csv at NIH's file")
        if not Path(cfg.data.images).is_dir():
            raise LaunchError(f"prep needs the image folder data.images = {cfg.data.images}, which does not exist")
        return
    h = _manifest_hash(cfg)
    if stage == "train":
        if h is None:
            raise LaunchError(f"train needs prepared data but {manifest_path(cfg)} does not exist; run "
                              f"`python -m launch prep --config {config_arg}` first (or `launch pipeline`)")
        if h != cfgmod.prep_hash(cfg):
            raise LaunchError(f"{manifest_path(cfg)} was prepared with another config than {config_arg}; rerun "
                              f"`python -m launch prep --config {config_arg}` (or `launch pipeline`)")
        diff = None if restart else rundir.mismatch(cfg)
        if diff:
            raise LaunchError(f"{cfg.run.dir} holds a run of another definition ({rundir.listing(diff)}); start "
                              f"over there with `python -m launch train --config {config_arg} --restart` (the "
                              f"old run is moved aside), or set another run.dir")
        return
    if stage == "evaluate":
        if h is None:
            raise LaunchError(f"evaluate needs prepared data but {manifest_path(cfg)} does not exist; run "
                              f"`python -m launch pipeline --config {config_arg}`")
        model = evaluated_model(cfg)
        if not model.exists() and not (Path(cfg.run.dir) / rundir.FINAL).exists():
            raise LaunchError(f"evaluate needs a trained model but {model} does not exist; run "
                              f"`python -m launch train --config {config_arg}` first (or `launch pipeline`)")
        return
    raise ValueError(stage)


def newest_mtime(path: Path) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0
