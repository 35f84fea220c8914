"""Export a trained run as a bundle another team can run: ``cxr-export`` / ``python -m distributed.export``.

    python -m distributed.export {--run RUN | --config C [--set k=v]} [--out DIR] [--format savedmodel[,onnx]] [--force]

The bundle (default ``RUN/export``; written under a temporary name and renamed, so it is whole or absent):

* ``saved_model/``: a TensorFlow SavedModel that takes what a file decoder gives and does the rest in its
  graph (:mod:`distributed.tfprep`: Pillow's resize with ``reducing_gap=1.3`` and the per-image min-max,
  equal to ``data_prep.imaging.load_xray``), then the network, the run's calibration and its operating point.
  Signatures (``images``: ``(N, H, W)`` grayscale, one image as a batch of one; a batch shares one size):

  ===========================  ==========================  =================================================
  signature                    input                       outputs
  ===========================  ==========================  =================================================
  ``serving_default``,         ``images`` uint8            ``raw_probability`` (float32, the network's),
  ``predict_uint8``                                        ``probability`` (calibrated when the run is),
  ``predict_uint16``           ``images`` uint16           ``positive`` (bool), ``label`` (class name)
  ``predict_preprocessed``     ``images`` uint8 (N, S, S)  the same, for input preprocessed already
  ``preprocess_uint8``,        ``images``                  ``image``: uint8 (N, S, S), the network input
  ``preprocess_uint16``
  ===========================  ==========================  =================================================

  The decision is ``raw_probability >= threshold`` at the run's validated operating point
  (``operating_point.json``), as ``cxr-predict`` and the report decide; without one, ``probability >= 0.5``.
  Decoding is the caller's: gray as libjpeg/Pillow give it (colour to gray by ITU-R 601 luma; a JPEG
  decoded with the DCT scale ``tfprep.jpeg_draft_ratio`` names, e.g. ``tf.io.decode_jpeg(data, channels=1,
  ratio=r, dct_method="INTEGER_ACCURATE")``), 16-bit PNGs as uint16.
* ``model.keras``: the run's model file, byte for byte (``cxr-predict --model BUNDLE`` loads it as data);
* ``model.json``: classes, positive class, image size and input types, the decision (threshold, rule, the
  split it was chosen on), the calibration, the training data's identity (prep hash, manifest sha256 and
  format, split sizes), the test metrics at the operating point (copied from ``metrics.json``), every
  file's sha256 and the project version (schema and checks: :mod:`distributed.bundle`);
* ``MODEL_CARD.md`` (:mod:`distributed.modelcard`), the Grad-CAM grids it links (``gradcam/``), and the
  run's ``config.yaml``.

``--format savedmodel,onnx`` adds ``onnx/predict_uint8.onnx`` and ``onnx/predict_uint16.onnx`` (tf2onnx, opset 17):
the same graph, preprocessing included, for ONNX Runtime (``tests/e2e/test_export.py``: the same probabilities
as TensorFlow within 1e-4, the same preprocessed pixels). tf2onnx declares ``protobuf~=3.20`` but works with
TensorFlow 2.15's protobuf 4.25; it is installed without its declared dependencies (``requirements-onnx.txt``).

Only binary runs are exported.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from data_prep.cli import UsageError, UserError, command, note_output, quiet_tensorflow
from data_prep.config import add_config_args, load_config
from data_prep.fsutil import atomic_write_text, sha256_file
from distributed import results, rundir
from distributed.bundle import FORMAT, FORMAT_VERSION, MODEL_FILE, MODEL_JSON

FORMATS = ("savedmodel", "onnx")
ONNX_OPSET = 17
ONNX_SIGNATURES = ("predict_uint8", "predict_uint16")  # onnx/<signature>.onnx
ONNX_MISSING = ("--format onnx needs tf2onnx and onnx: pip install --no-deps -r requirements-onnx.txt "
                "(make deps does)")


class ExportError(UserError):
    """A run that cannot be exported: one line, exit code 1."""


def project_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cxr-transfer")
    except PackageNotFoundError:
        return "unknown"


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


# --------------------------------------------------------------------------- what the run says

def run_facts(run: Path) -> dict:
    """Everything the bundle takes from the run folder, checked; ExportError naming what is missing.
    No TensorFlow."""
    from data_prep.config import ConfigError, load_config
    from distributed.predict import find_calibration, find_operating_point, report_says_calibrated, resolve_model_path

    if not run.is_dir():
        raise ExportError(f"{run}: not a run folder")
    try:
        model_path = resolve_model_path(run)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None
    metrics = results.read_if_valid(run / rundir.METRICS)
    if metrics is None:
        raise ExportError(f"{run / rundir.METRICS} is missing or unreadable: evaluate the run first (cxr-eval)")
    if metrics.task != "binary":
        raise ExportError(f"{run}: a {metrics.task!r} run; only binary runs are exported")
    classes = metrics.classes
    if not (isinstance(classes, list) and len(classes) == 2 and all(isinstance(c, str) for c in classes)):
        raise ExportError(f"{run / rundir.METRICS}: no two class names")
    digest = sha256_file(model_path)
    op = find_operating_point(model_path, digest)
    cal = find_calibration(model_path, digest)
    says = report_says_calibrated(model_path)
    if says and (cal is None or not cal.get("applied")):
        why = "missing" if cal is None else cal["why"]
        raise ExportError(f"{says} says this run's predictions are calibrated, but its calibration.json is {why}")
    # the evaluation's resolved config (the one metrics.json came from), else the training's
    cfg_file = next((run / n for n in (rundir.EVAL_CONFIG, rundir.CONFIG) if (run / n).is_file()), None)
    try:
        cfg = load_config(cfg_file) if cfg_file is not None else None
    except (ConfigError, OSError) as e:
        raise ExportError(f"{cfg_file}: unreadable config: {e}") from None
    if cfg is None:
        raise ExportError(f"{run}: no eval_config.yaml or config.yaml in the run folder")
    return {"run": run, "model_path": model_path, "digest": digest, "metrics": metrics, "classes": classes,
            "operating_point": op, "calibration": cal if cal and cal.get("applied") else None, "config": cfg,
            "training_prep": _read_json(run / rundir.TRAINING_PREP),
            "config_yaml": cfg_file.read_text()}


def decision(facts: dict) -> dict:
    op = facts["operating_point"]
    if op.get("applied"):
        return {"threshold": op["threshold"], "applied_to": "raw_probability", "compare": ">=",
                "rule": op["rule"], "chosen_on": op["source"], "source": rundir.OPERATING_POINT}
    return {"threshold": 0.5, "applied_to": "probability", "compare": ">=", "rule": "default", "chosen_on": None,
            "source": None, "note": op.get("why")}


def calibration_doc(facts: dict) -> dict:
    cal = facts["calibration"]
    if cal is None:
        return {"applied": False}
    return {"applied": True, "method": cal.get("method"), "temperature": cal["temperature"], "shift": cal["shift"],
            "center": cal.get("center", 0.0), "prior_correction": cal.get("prior_correction", False),
            "target_prevalence": cal.get("target_prevalence"),
            "formula": "sigmoid((logit(p) - center) / temperature + center + shift), logit on p clipped to "
                       "[1e-7, 1 - 1e-7], in float64 (distributed.metrics.adjust)",
            "fitted_on": "validation"}


def training_data(facts: dict) -> dict:
    """The training data's identity: training_prep.json (written by training) and the manifest, when readable."""
    from data_prep.manifest import load_manifest

    tp = facts["training_prep"] or {}
    out = {k: tp.get(k) for k in ("prep_out", "manifest_sha256", "config_hash", "prep_seed", "created")}
    out["prep_hash"] = out.pop("config_hash")
    out["training_prep_format"] = tp.get("format")
    out["split_patients"] = {s: (v or {}).get("patients") for s, v in (tp.get("splits") or {}).items()}
    try:
        m = load_manifest(facts["config"].prep.out)
    except Exception:  # noqa: BLE001 - the shards may live on another machine; the hashes above identify them
        m = None
    if m is not None:
        out["manifest_format"] = m.get("format")
        out["split_method"] = m.get("split_method")
        out["splits"] = {s: {"count": v.get("count"), "label_counts": v.get("label_counts")}
                         for s, v in (m.get("splits") or {}).items()}
    data = facts["config"].data
    out["source"] = {"csv": str(data.csv), "images": str(data.images),
                     "synthetic": synthetic_marker(data.csv) is not None}
    return out


def synthetic_marker(csv_path) -> Path | None:
    """``SYNTHETIC.txt`` beside the data CSV (written by ``data_prep.synthetic``), or None."""
    f = Path(str(csv_path)).parent / "SYNTHETIC.txt"
    return f if f.is_file() else None


def test_metrics(metrics: results.EvalResult) -> dict:
    """The test split's numbers as metrics.json holds them (copied, not recomputed)."""
    plain = metrics.plain
    op = metrics.chosen_operating_point()
    keys = ("sensitivity", "specificity", "ppv", "npv", "accuracy")
    ci = plain.auc_ci or results.AucInterval()
    out = {"split": "test", "n": plain.n, "positives": plain.positives,
           "prevalence": plain.prevalence, "patients": plain.patients,
           "auc": {"value": plain.auc, "low": ci.low, "high": ci.high, "level": ci.level,
                   "by": ci.by, "n_boot": ci.n_boot},
           "average_precision": plain.average_precision, "brier": plain.brier, "ece": plain.ece,
           "operating_point": {"threshold": op.threshold, "rule": op.rule, "source": op.source,
                               **{k: getattr(op, k).to_json() for k in keys if getattr(op, k) is not None}}}
    if plain.calibrated is not None:
        out["calibrated"] = {"brier": plain.calibrated.brier, "ece": plain.calibrated.ece}
    return out


def model_json(facts: dict, size: int, files: dict) -> dict:
    m = facts["metrics"]
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "project": {"name": "cxr-transfer", "version": project_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": "binary", "classes": list(facts["classes"]), "positive_class": facts["classes"][1],
        "input": {"image_size": int(size), "dtypes": ["uint8", "uint16"],
                  "layout": "(N, H, W) grayscale, a batch of same-size images",
                  "preprocessing": "data_prep.imaging.load_xray after the decode (distributed/tfprep.py): Pillow "
                                   "BILINEAR resize with reducing_gap 1.3, per-image min-max to 0..255",
                  "decode": "gray as Pillow/libjpeg decode it; colour -> ITU-R 601 luma; JPEG at the DCT scale of "
                            "Pillow's draft('L', (S, S)); 16-bit PNG as uint16"},
        "backbone": facts["config"].model.backbone,
        "decision": decision(facts),
        "calibration": calibration_doc(facts),
        "training_data": training_data(facts),
        "metrics": test_metrics(m),
        "selected_checkpoint": m.selected_checkpoint.to_json() if m.selected_checkpoint is not None else None,
        "source_run": {"dir": str(facts["run"]), "model_file": facts["model_path"].name
                       if facts["model_path"].parent == facts["run"] else
                       str(facts["model_path"].relative_to(facts["run"])), "sha256": facts["digest"]},
        "files": files,
    }


# --------------------------------------------------------------------------- the SavedModel

def serving_module(model, size: int, classes, dec: dict, cal: dict):
    """A ``tf.Module`` holding the network with the signatures of the module doc."""
    import tensorflow as tf

    from distributed.tfprep import preprocess, to_float32

    threshold = float(dec["threshold"])
    on_raw = dec["applied_to"] == "raw_probability"
    names = tf.constant([str(c) for c in classes])

    class Serving(tf.Module):
        def __init__(self):
            super().__init__(name="cxr_serving")
            self.model = model
            self.image_size = tf.constant(size, tf.int32)
            self.threshold = tf.constant(threshold, tf.float64)

        def _decide(self, x):  # x: (N, S, S) uint8
            out = self.model(tf.cast(x, tf.float32)[..., None], training=False)
            raw = tf.cast(out[:, 1], tf.float32)
            prob = raw
            if cal.get("applied"):
                p = tf.clip_by_value(tf.cast(raw, tf.float64), 1e-7, 1 - 1e-7)  # metrics.logit's clip
                c = float(cal["center"])
                # log(1 - p), not log1p: ONNX has no Log1p; in float64 the two differ far below float32's ulp
                z = (tf.math.log(p) - tf.math.log(1.0 - p) - c) / float(cal["temperature"]) + c + float(cal["shift"])
                prob = tf.cast(1.0 / (1.0 + tf.exp(-z)), tf.float32)
            positive = (tf.cast(raw, tf.float64) if on_raw else to_float32(prob)) >= self.threshold
            return {"raw_probability": raw, "probability": prob, "positive": positive,
                    "label": tf.gather(names, tf.cast(positive, tf.int32))}

        @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.uint8, name="images")])
        def preprocess_uint8(self, images):
            return {"image": preprocess(images, size)}

        @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.uint16, name="images")])
        def preprocess_uint16(self, images):
            return {"image": preprocess(images, size)}

        @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.uint8, name="images")])
        def predict_uint8(self, images):
            return self._decide(preprocess(images, size))

        @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.uint16, name="images")])
        def predict_uint16(self, images):
            return self._decide(preprocess(images, size))

        @tf.function(input_signature=[tf.TensorSpec([None, size, size], tf.uint8, name="images")])
        def predict_preprocessed(self, images):
            return self._decide(images)

    return Serving()


def save_serving(module, folder: Path) -> None:
    import tensorflow as tf

    sigs = {"serving_default": module.predict_uint8, "predict_uint8": module.predict_uint8,
            "predict_uint16": module.predict_uint16, "predict_preprocessed": module.predict_preprocessed,
            "preprocess_uint8": module.preprocess_uint8, "preprocess_uint16": module.preprocess_uint16}
    tf.saved_model.save(module, str(folder), signatures=sigs)


# --------------------------------------------------------------------------- the bundle

def onnx_available() -> bool:
    from importlib.util import find_spec

    return find_spec("tf2onnx") is not None and find_spec("onnx") is not None


def save_onnx(saved_model: Path, folder: Path) -> dict:
    """tf2onnx's conversion of the SavedModel's full-graph signatures (preprocessing included), one
    ``folder/<signature>.onnx`` each, by its own command line in a child process (what docs/export.md
    shows); ExportError with tf2onnx's last line when it fails."""
    import subprocess
    from importlib.metadata import version

    folder.mkdir()
    files = {}
    for sig in ONNX_SIGNATURES:
        dest = folder / f"{sig}.onnx"
        r = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved_model), "--tag",
                            "serve", "--signature_def", sig, "--opset", str(ONNX_OPSET), "--output", str(dest)],
                           capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        if r.returncode != 0 or not dest.is_file():
            last = next((x for x in reversed(r.stderr.splitlines()) if x.strip()), f"exit code {r.returncode}")
            raise ExportError(f"ONNX conversion of {sig} failed: {last.strip()}")
        files[sig] = f"{folder.name}/{dest.name}"
    return {"opset": ONNX_OPSET, "converter": f"tf2onnx {version('tf2onnx')}", "files": files,
            "inputs": {"predict_uint8": "images uint8 (N, H, W)", "predict_uint16": "images uint16 (N, H, W)"},
            "outputs": ["raw_probability", "probability", "positive", "label"]}


def file_digests(folder: Path) -> dict:
    """sha256 of every file under ``folder`` (model.json excluded), by relative path."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MODEL_JSON:
            out[p.relative_to(folder).as_posix()] = sha256_file(p)
    return out


def export(run, out=None, formats=FORMATS, force: bool = False, log=print) -> Path:
    """Write the bundle of ``run`` into ``out`` (default ``run/export``); returns its folder."""
    run = Path(run)
    out = Path(out) if out else run / "export"
    for f in formats:
        if f not in FORMATS:
            raise UsageError(f"--format {f}: expected one of {', '.join(FORMATS)}")
    if "onnx" in formats and not onnx_available():
        raise UsageError(ONNX_MISSING)
    if out.exists() and not force:
        raise ExportError(f"{out} exists: remove it, give another --out, or --force to replace it")
    facts = run_facts(run)
    from distributed.model import load_model
    from distributed.modelcard import model_card

    try:
        model = load_model(str(facts["model_path"]), precision="float32")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any load failure is one line
        raise ExportError(f"{facts['model_path']}: cannot load model: {e}") from None
    size = int(model.input_shape[1])
    dec, cal = decision(facts), calibration_doc(facts)
    out.parent.mkdir(parents=True, exist_ok=True)
    note_output(out.parent)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_serving(serving_module(model, size, facts["classes"], dec, cal), tmp / "saved_model")
        onnx = save_onnx(tmp / "saved_model", tmp / "onnx") if "onnx" in formats else None
        shutil.copyfile(facts["model_path"], tmp / MODEL_FILE)
        if sha256_file(tmp / MODEL_FILE) != facts["digest"]:
            raise ExportError(f"{facts['model_path']} changed while it was copied; export again")
        if facts["config_yaml"] is not None:
            (tmp / rundir.CONFIG).write_text(facts["config_yaml"])
        grids = {}
        for name, rel in (facts["metrics"].gradcam or {}).items():
            src = run / str(rel)
            if isinstance(rel, str) and src.is_file() and src.resolve().is_relative_to(run.resolve()):
                (tmp / "gradcam").mkdir(exist_ok=True)
                shutil.copyfile(src, tmp / "gradcam" / src.name)
                grids[name] = f"gradcam/{src.name}"
        doc = model_json(facts, size, {})
        doc["onnx"] = onnx
        (tmp / "MODEL_CARD.md").write_text(model_card(facts, doc, grids))
        doc["files"] = file_digests(tmp)
        atomic_write_text(tmp / MODEL_JSON, json.dumps(doc, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"bundle of {run} written to {out}: saved_model/ (preprocessing in the graph), "
        f"{'onnx/, ' if onnx else ''}{MODEL_FILE}, {MODEL_JSON}, MODEL_CARD.md; threshold {dec['threshold']:.9g} "
        f"on {dec['applied_to']}, calibration {'applied' if cal['applied'] else 'none'}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxr-export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="the run folder (model.keras, metrics.json, config.yaml, ...; "
                                               "default: run.dir of --config)")
    p.add_argument("--out", default=None, help="bundle folder (default RUN/export)")
    p.add_argument("--format", default="savedmodel", help="comma-separated: savedmodel (always written), onnx "
                                                          "(also onnx/predict_uint8.onnx, onnx/predict_uint16.onnx)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    add_config_args(p, required=False)
    return p


@command("cxr-export")
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        args.run = args.run or load_config(args.config, args.overrides).run.dir
    elif args.overrides:
        parser.error("--set needs --config")
    if args.run is None:
        parser.error("--run (or --config, whose run.dir is the run) is required")
    formats = [f.strip().lower() for f in args.format.split(",") if f.strip()]
    if not formats:
        raise UsageError("--format: give at least one format")
    formats = ["savedmodel"] + [f for f in formats if f != "savedmodel"]  # ONNX is converted from the SavedModel
    quiet_tensorflow(argv=argv)
    export(args.run, args.out, formats, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
