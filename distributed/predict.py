"""Predict chest X-ray files with a trained model: ``cxr-predict`` / ``python -m distributed.predict``.

    python -m distributed.predict {--model runs/demo/model.keras | --config C [--set k=v]} a.png b.jpg DIR
                                  [--recursive] [--json]
                                  [--out FILE.csv] [--gradcam [DIR]] [--image-size PX] [--threshold T] [--raw]

Every file goes through ``data_prep.imaging.load_xray`` -- the very function the prep stage
used for the training shards -- so PNG/JPEG, 8/16-bit, gray/RGB/RGBA are read the same way.
A folder stands for the PNG and JPEG files in it (``--recursive``: and in its subfolders; symlinks
leading outside it are not followed). The image size is the model's input size unless ``--image-size``
says otherwise (only for a model whose input size is not fixed). A file that cannot be read gets its
own error line and the others still run; the exit code is 1 when any file failed, 0 otherwise (2 for a
bad model or arguments). ``--out FILE.csv`` writes one row per image: file, probability, raw
probability, prediction, threshold, error (text cells neutralised for spreadsheets).

``--gradcam`` writes a Grad-CAM overlay at the input's ORIGINAL size beside each input file
(``<name>.gradcam.png``) or, with a folder, into that folder; each file is decoded once for
both the network input and the overlay (``load_xray_and_original``). ``--model`` may be a ``.keras``
file, a run directory (its ``model.keras``, else ``checkpoints/best.keras``) or a bundle written by
``cxr-export`` (a folder with ``model.json``: its ``model.keras``, loaded as data, with the classes,
threshold and calibration its ``model.json`` lists, checked by :mod:`distributed.bundle`; the same
answers as the run it came from). ``--config C`` (with ``--set k=v``) names the run by its ``run.dir``
and gives ``runtime.precision`` and ``eval.trust_model``; options on the command line win.

Everything that comes from the run is read from the RUN FOLDER only (the folder of the model file, or
the folder above ``checkpoints/``), never from its parent, and applied only when it lists this model
file's sha256:

* ``operating_point.json`` (written by ``cxr-eval``): the decision threshold the report validated
  (rule, threshold, chosen on the validation split), compared with the network's probability as the
  CSVs hold it (``%.9g``), exactly as the report counted; ``--threshold T`` overrides it (compared with
  ``probability``); without one the threshold is 0.5, and the output says which it is;
* ``calibration.json`` (``eval.calibrate``/``eval.prior_correction``): ``probability`` is then
  ``sigmoid((logit(p) - center) / temperature + center + shift)`` (center: logit of the training
  prevalence), ``raw_probability`` the network's, and the output prints the whole transform. A run
  whose ``metrics.json`` says its predictions are calibrated refuses to give uncalibrated ones when
  ``calibration.json`` is missing or unreadable (``--raw`` asks for them);
* class names from the run's ``config.yaml``.

TensorFlow is imported only once a model is to be loaded (``distributed.model``,
``distributed.gradcam``): argument errors answer at once, and ``TF_CPP_MIN_LOG_LEVEL`` is set
before TensorFlow reads it.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.cli import UsageError, UserError, command, quiet_tensorflow
from data_prep.config import ConfigError, add_config_args, load_config
from data_prep.fsutil import atomic_write_bytes, atomic_write_text, sha256_file, walk_tree
from data_prep.imaging import ImageError, load_xray, load_xray_and_original
from data_prep.manifest import load_manifest
from data_prep.metadata import FINDINGS
from data_prep.textsafe import console, csv_row
from distributed import results, rundir
from distributed.bundle import is_bundle, read_bundle
from distributed.precision import cpu_flags, decide, plan_precision

# --------------------------------------------------------------------------- model and its run

def resolve_model_path(path) -> Path:
    p = Path(path)
    if p.is_dir():
        found = rundir.model_in(p)
        if found is None:
            raise FileNotFoundError(f"{p}: no {rundir.FINAL} or {rundir.BEST} in this run directory")
        return found
    if not p.exists():
        raise FileNotFoundError(f"{p}: model file not found")
    return p


# The threshold cxr-eval writes when its rule makes nothing positive (distributed.metrics.NOTHING_POSITIVE, the
# float after 1.0): a probability of 1.0 stays negative. Accepted beside thresholds in [0, 1].
NOTHING_POSITIVE = float(np.nextafter(1.0, 2.0))


def run_folder(model_path: Path) -> Path:
    """The run folder of a model file: its folder, or the one above ``checkpoints/``. Never further up."""
    return rundir.run_folder_of(model_path)


def find_run_config(model_path: Path):
    """The run's resolved config in the run folder (:func:`run_folder`), or None."""
    for name in (rundir.CONFIG, rundir.EVAL_CONFIG):
        f = run_folder(model_path) / name
        if f.is_file():
            try:
                return load_config(f)
            except (ConfigError, OSError):
                continue
    return None


def class_names_for(cfg, num_outputs: int, multilabel: bool) -> list[str]:
    """Class names: the manifest's when it can be found, else derived from the config."""
    if cfg is not None:
        try:
            classes = list(load_manifest(cfg.prep.out)["classes"])
            if len(classes) == num_outputs:
                return classes
        except Exception:  # noqa: BLE001 - the manifest is optional here
            pass
    if multilabel:
        if len(FINDINGS) == num_outputs:
            return list(FINDINGS)
        return [f"finding_{k}" for k in range(num_outputs)]
    if cfg is not None and num_outputs == 2:
        neg = "No Finding" if cfg.data.negative_rule == "no_finding" else f"not {cfg.data.positive_label}"
        return [neg, cfg.data.positive_label]
    return ["negative", "positive"] if num_outputs == 2 else [f"class_{k}" for k in range(num_outputs)]


def is_multilabel(model) -> bool:
    import tensorflow as tf  # loaded with the model already; not at the top (module docstring)

    act = getattr(model.layers[-1], "activation", None)
    # The contract: binary ends in a 2-way softmax, multilabel in K sigmoids.
    return act is tf.keras.activations.sigmoid and (model.output_shape[-1] or 0) > 1


def positive_probability(out: np.ndarray, multilabel: bool) -> np.ndarray:
    """Binary: probability of class 1 (softmax column 1, or the single sigmoid). Multilabel: all."""
    out = np.asarray(out, dtype=np.float32)
    if multilabel:
        return out
    return out[:, 1] if out.shape[-1] >= 2 else out[:, 0]


def _run_json(path: Path):
    """(document, None) of a run's JSON file, or (None, why not)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"unreadable ({type(e).__name__})"
    return (doc, None) if isinstance(doc, dict) else (None, "not a JSON object")


def _listed(doc: dict, digest: str) -> tuple[bool, str]:
    models = doc.get("models") if isinstance(doc.get("models"), dict) else {}
    if digest in models.values():
        return True, ""
    return False, f"made for {', '.join(map(str, models)) or 'another model'}, not this model file"


def find_calibration(model_path: Path, digest: str | None = None) -> dict | None:
    """``calibration.json`` of the run folder (written by cxr-eval with ``eval.calibrate``/
    ``eval.prior_correction``) and whether it belongs to this model file: ``{"file", "applied", "why",
    "temperature", "shift", ...}``; None when the run folder has none."""
    f = run_folder(model_path) / rundir.CALIBRATION
    if not f.is_file():
        return None
    cal, why = _run_json(f)
    if cal is None:
        return {"file": str(f), "applied": False, "why": why, "broken": True}
    try:
        temperature, shift = float(cal["temperature"]), float(cal["shift"])
        center = float(cal.get("center") or 0.0)  # logit of the training prevalence (metrics.adjust); 0 in older files
    except (KeyError, TypeError, ValueError) as e:
        return {"file": str(f), "applied": False, "why": f"unreadable ({type(e).__name__})", "broken": True}
    if not (temperature > 0 and np.isfinite(temperature) and np.isfinite(shift) and np.isfinite(center)):
        return {"file": str(f), "applied": False, "why": "temperature, shift or center out of range", "broken": True}
    ok, why = _listed(cal, digest or sha256_file(model_path))
    if not ok:
        return {"file": str(f), "applied": False, "why": why}
    return {"file": str(f), "applied": True, "temperature": temperature, "shift": shift, "center": center,
            "prior_correction": bool(cal.get("prior_correction")), "target_prevalence": cal.get("target_prevalence"),
            "method": cal.get("method")}


def report_says_calibrated(model_path: Path) -> str | None:
    """Where the run's evaluation says its predictions are calibrated (its ``metrics.json``), or None."""
    f = run_folder(model_path) / rundir.METRICS
    m = results.read_if_valid(f)
    if m is not None and getattr(m.plain, "calibrated", None):
        return str(f)
    return None


def find_operating_point(model_path: Path, digest: str | None = None) -> dict:
    """The run's validated operating point (``operating_point.json`` in the run folder) when it lists
    this model file: ``{"threshold", "rule", "source", "file", "applied": True}``; else
    ``{"applied": False, "why"}``."""
    f = run_folder(model_path) / rundir.OPERATING_POINT
    if not f.is_file():
        return {"applied": False, "why": f"no operating_point.json in the run folder {run_folder(model_path)}"}
    op, why = _run_json(f)
    if op is None:
        return {"applied": False, "file": str(f), "why": f"{f} {why}"}
    try:
        t = float(op["threshold"])
    except (KeyError, TypeError, ValueError):
        return {"applied": False, "file": str(f), "why": f"{f} has no threshold"}
    if not 0.0 <= t <= NOTHING_POSITIVE:
        return {"applied": False, "file": str(f), "why": f"{f}: threshold {t!r} outside [0, 1]"}
    ok, why = _listed(op, digest or sha256_file(model_path))
    if not ok:
        return {"applied": False, "file": str(f), "why": f"{f} {why}"}
    return {"applied": True, "file": str(f), "threshold": t, "rule": str(op.get("rule")),
            "source": str(op.get("source")), "probability": op.get("probability", "raw")}


def calibration_note(cal: dict | None) -> str | None:
    if cal is None:
        return None
    if cal.get("raw"):
        return "raw probabilities (--raw): the network's, no calibration applied"
    if not cal["applied"]:
        return f"{cal['file']} not applied: {cal['why']}; probabilities are the network's"
    T, S = cal["temperature"], cal["shift"]
    what = [f"temperature {T:.6g}" + (" (fitted on validation)" if cal.get("method") == "temperature" else ""),
            f"shift {S:+.6g}" + (f" (prior correction to prevalence {cal['target_prevalence']:.3f})"
                                 if cal.get("prior_correction") and cal.get("target_prevalence") is not None else "")]
    C = cal.get("center", 0.0)
    form = (f"sigmoid((logit(p) - {C:+.6g}) / {T:.6g} + {C + S:+.6g})" if C
            else f"sigmoid(logit(p) / {T:.6g} + {S:+.6g})")
    return (f"probabilities calibrated by {cal['file']}: {form} ("
            + ", ".join(what) + "; --json: raw_probability is the network's)")


def threshold_note(th: dict) -> str:
    if th["source"] == "--threshold":
        return f"threshold {th['threshold']:.9g} (--threshold), applied to probability"
    if th["source"] == "operating point":
        where = "chosen on the validation split" if th["chosen_on"] == "validation" else \
            f"{th['chosen_on']}, not chosen on validation"
        return (f"threshold {th['threshold']:.9g}: the run's operating point ({th['rule']}, {where}; {th['file']}), "
                "applied to the network's probability as the report did")
    return f"threshold 0.5: {th['why']}; --threshold T to choose one"


# --------------------------------------------------------------------------- overlays

def overlay_path(src: Path, folder: str | None, used: set) -> Path:
    base = Path(folder) if folder else src.parent
    out = base / f"{src.stem}.gradcam.png"
    k = 1
    while str(out) in used:  # two inputs with the same name into one folder
        out = base / f"{src.stem}.{k}.gradcam.png"
        k += 1
    used.add(str(out))
    return out


def write_overlay(path, heat: np.ndarray, gray: np.ndarray) -> Path:
    """The heat map over ``gray`` (the input at its original size) as an RGB PNG at ``path``."""
    from distributed.gradcam import overlay  # imports TensorFlow (module docstring)

    buf = io.BytesIO()
    Image.fromarray(overlay(gray, heat), mode="RGB").save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- main

class ModelError(UserError):
    """A ``--model`` that is missing or is not a model: one error line, exit code 1."""


@dataclass(frozen=True)
class Decoded:
    """One readable input: its row in the results, the network input, the original-size gray."""
    row: int
    image: np.ndarray
    original: np.ndarray | None  # only with --gradcam


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxr-predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default=None,
                   help=".keras model file, run directory or exported bundle (cxr-export) (default: run.dir of "
                        "--config)")
    p.add_argument("images", nargs="*", metavar="IMG",
                   help="PNG or JPEG files (8/16-bit, gray, RGB, RGBA), or folders of them")
    p.add_argument("--recursive", "-r", action="store_true", help="read folders with their subfolders")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.add_argument("--out", metavar="FILE.csv", default=None,
                   help="also write one CSV row per image (probability, prediction, threshold, error)")
    p.add_argument("--gradcam", nargs="?", const="", default=None, metavar="DIR",
                   help="write a Grad-CAM overlay per image, beside the image or into DIR")
    p.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="network input size; default: the model's input size")
    p.add_argument("--threshold", type=float, default=None,
                   help="decision threshold on probability; default: the run's validated operating point "
                        "(operating_point.json), else 0.5")
    p.add_argument("--raw", action="store_true",
                   help="the network's probabilities, without the run's calibration.json")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", choices=("auto", "float32", "mixed_bfloat16"), default=None,
                   help="compute precision (default: runtime.precision of --config, else auto: bfloat16 on CPUs "
                        "with AMX-BF16, else float32; not measured here); probabilities are float32 either way")
    p.add_argument("--trust-model", action="store_true", default=None,  # distributed.safeload: data by default
                   help="load the file with Keras' own loader (HDF5, SavedModel, Lambda layers: code in the file "
                        "runs); only for files you trust (also eval.trust_model of --config)")
    add_config_args(p, required=False)
    return p


def _from_config(args, parser) -> None:
    """Fill what the command line left open from ``--config``/``--set``: the model (``run.dir``), the
    precision (``runtime.precision``) and ``eval.trust_model``; the command line wins."""
    if args.config is None:
        if args.overrides:
            parser.error("--set needs --config")
        if args.model is None:
            parser.error("--model (or --config, whose run.dir is the model) is required")
        args.precision = args.precision or "auto"
        args.trust_model = bool(args.trust_model)
        return
    cfg = load_config(args.config, args.overrides)
    args.model = args.model or cfg.run.dir
    args.precision = args.precision or cfg.runtime.precision
    args.trust_model = cfg.eval.trust_model if args.trust_model is None else args.trust_model


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    _from_config(args, parser)
    # "--gradcam a.png b.png": argparse took the first image as DIR; it is an image.
    if args.gradcam and Path(args.gradcam).is_file():
        args.images.insert(0, args.gradcam)
        args.gradcam = ""
    if not args.images:
        parser.error("no image files given")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        parser.error(f"--threshold {args.threshold}: expected a probability in [0, 1]")
    return args


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")  # files given by name are read by content


def expand_inputs(paths, recursive: bool) -> list[str]:
    """Files as given; a folder as its PNG/JPEG files in sorted order (with ``recursive`` also those of its
    subfolders; hidden folders and symlinks leading outside it left out). A folder without any is an error
    row of its own."""
    out = []
    for p in paths:
        if not Path(p).is_dir():
            out.append(p)
            continue
        found = []
        for d, files in walk_tree(p):
            found += [os.path.join(d, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
            if not recursive:
                break
        out += found or [p]
    return out


def open_model(path, precision: str | None = None, trust: bool = False):
    """(model file, Keras model computing in ``precision``) for ``--model``; ModelError when it
    cannot be loaded."""
    try:
        model_path = resolve_model_path(path)
    except FileNotFoundError as e:
        raise ModelError(str(e)) from None
    from distributed.model import load_model  # imports TensorFlow (module docstring)

    try:
        return model_path, load_model(str(model_path), precision=precision, trust=trust)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any load failure is one clear line
        raise ModelError(f"{model_path}: cannot load model: {e}") from None


def input_size(model, cfg, requested: int | None) -> int:
    """The network input size: ``--image-size``, else the model's fixed size, else the run's."""
    shape = model.input_shape
    fixed = shape[1] if shape[1] is not None and shape[1] == shape[2] else None
    size = requested or fixed
    if size is None and cfg is not None:
        size = cfg.data.image_size
    if size is None:
        raise UsageError("the model's input size is not fixed: give --image-size")
    if fixed is not None and size != fixed:
        raise UsageError(f"--image-size {size} does not match the model's input size {fixed}")
    return size


def read_images(paths, size: int, keep_original: bool) -> tuple[list[dict], list[Decoded]]:
    """A result row per file (an ``error`` where it cannot be read) and the decoded inputs."""
    results, decoded = [], []
    for path in paths:
        r = {"file": path}
        if Path(path).is_dir():
            r["error"] = "a folder without PNG or JPEG files (--recursive also reads its subfolders)"
            results.append(r)
            continue
        try:
            if keep_original:
                arr, original, info = load_xray_and_original(path, size)
            else:
                (arr, info), original = load_xray(path, size), None
        except ImageError as e:
            r["error"] = e.reason
        except Exception as e:  # noqa: BLE001 - one bad file never stops the others
            r["error"] = f"{type(e).__name__}: {e}"
        else:
            r.update(width=info["width"], height=info["height"], bits=info["bits"],
                     converted_from=info["converted_from"])
            decoded.append(Decoded(len(results), arr, original))
        results.append(r)
    return results, decoded


def add_predictions(results: list[dict], decoded: list[Decoded], probs, names, threshold: float,
                    multilabel: bool, decide_on=None) -> None:
    """Probabilities and the decision ``decide_on >= threshold`` (default: the probabilities themselves)."""
    decide_on = probs if decide_on is None else decide_on
    for d, p, q in zip(decoded, probs, decide_on):
        r = results[d.row]
        if multilabel:
            r["probabilities"] = {n: float(v) for n, v in zip(names, p)}
            r["findings"] = [n for n, v in zip(names, q) if v >= threshold]
        else:
            r["probability"] = float(p)
            r["label"] = names[-1]
            r["prediction"] = names[1] if q >= threshold else names[0]


def gradcam_classes(out: np.ndarray, probs: np.ndarray, multilabel: bool) -> np.ndarray:
    """The class each overlay shows: the most probable finding (multi-label), else the positive class."""
    return np.argmax(probs, axis=1) if multilabel else np.full(len(out), 1 if out.shape[-1] >= 2 else 0)


def add_overlays(model, x, cls, results: list[dict], decoded: list[Decoded], folder: str | None,
                 batch_size: int) -> None:
    """Grad-CAM of class ``cls[i]`` over input ``i`` at its original size, one PNG per input."""
    from distributed.gradcam import GradCAM  # imports TensorFlow (module docstring)

    heats = GradCAM(model)(x, cls, batch_size=batch_size)
    used: set = set()
    for d, heat in zip(decoded, heats):
        r = results[d.row]
        dest = overlay_path(Path(r["file"]), folder, used)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_overlay(dest, heat, d.original)
            r["gradcam"] = str(dest)
        except (OSError, ImageError) as e:
            r["error"] = f"Grad-CAM overlay not written: {getattr(e, 'reason', e)}"


def choose_threshold(args, model_path: Path, digest: str, multilabel: bool) -> dict:
    """The decision threshold and where it comes from: ``--threshold``, the run's operating point, or 0.5."""
    if args.threshold is not None:
        return {"threshold": float(args.threshold), "source": "--threshold", "on": "probability"}
    if multilabel:
        return {"threshold": 0.5, "source": "default", "why": "no operating point for multi-label runs",
                "on": "probability"}
    op = find_operating_point(model_path, digest)
    if not op["applied"]:
        return {"threshold": 0.5, "source": "default", "why": op["why"], "on": "probability"}
    return {"threshold": op["threshold"], "source": "operating point", "rule": op["rule"], "chosen_on": op["source"],
            "file": op["file"], "on": "raw_probability"}


def choose_calibration(args, model_path: Path, digest: str, multilabel: bool) -> dict | None:
    """The run's calibration for this model, None when there is none, ``{"raw": True}`` for ``--raw``;
    a run whose metrics.json says calibrated but whose calibration.json is missing or broken: ModelError."""
    if multilabel:
        return None
    if args.raw:
        return {"raw": True, "applied": False}
    cal = find_calibration(model_path, digest)
    says = report_says_calibrated(model_path)
    if says and (cal is None or cal.get("broken")):
        what = "missing" if cal is None else cal["why"]
        raise ModelError(f"{says} says this run's predictions are calibrated, but "
                         f"{run_folder(model_path) / rundir.CALIBRATION} is {what}: rerun cxr-eval for it, or give "
                         "--raw for the network's uncalibrated probabilities")
    return cal


def bundle_threshold(args, bundle) -> dict:
    """:func:`choose_threshold` for an exported bundle: ``--threshold``, else its model.json's decision."""
    if args.threshold is not None:
        return {"threshold": float(args.threshold), "source": "--threshold", "on": "probability"}
    f = str(bundle.folder / "model.json")
    if bundle.threshold_on == "raw_probability":
        return {"threshold": bundle.threshold, "source": "operating point", "rule": bundle.rule,
                "chosen_on": bundle.chosen_on, "file": f, "on": "raw_probability"}
    return {"threshold": bundle.threshold, "source": "default", "why": f"{f} has no validated operating point",
            "on": "probability"}


def bundle_calibration(args, bundle) -> dict | None:
    """:func:`choose_calibration` for an exported bundle: its model.json's calibration, ``--raw``, or None."""
    if args.raw:
        return {"raw": True, "applied": False}
    if bundle.calibration is None:
        return None
    return {"file": str(bundle.folder / "model.json"), "applied": True, **bundle.calibration}


@command("cxr-predict")  # a bad argument exits 2, a model that cannot be loaded 1: one line each
def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_tensorflow(argv=argv)  # read by TensorFlow at import: before open_model
    # bfloat16 needs oneDNN, which TensorFlow reads at import: decide before open_model imports it.
    precision = plan_precision(args.precision, environ=os.environ)
    # auto is measured by training and evaluation (distributed/precision_probe.py), not for a few images here:
    # unmeasured it is bfloat16 on AMX-BF16, float32 elsewhere.
    precision = decide(precision, None, flags=cpu_flags())
    if precision.onednn_env:
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", precision.onednn_env)
    bundle = read_bundle(args.model) if is_bundle(args.model) else None
    if bundle is not None:  # its model.keras, loaded as data as any model file; the SavedModel is not loaded
        model_path, model = open_model(bundle.model_file, precision.precision, trust=False)
        cfg, digest = None, bundle.sha256
        size = input_size(model, cfg, args.image_size)
        if size != bundle.image_size:
            raise ModelError(f"{bundle.model_file}: input size {size}, but its model.json says {bundle.image_size}")
        multilabel = is_multilabel(model)
        if multilabel or int(model.output_shape[-1]) != 2:
            raise ModelError(f"{bundle.model_file}: not the binary model its model.json describes")
        names = list(bundle.classes)
        th = bundle_threshold(args, bundle)
        cal = bundle_calibration(args, bundle)
    else:
        model_path, model = open_model(args.model, precision.precision, trust=args.trust_model)
        digest = sha256_file(model_path)
        cfg = find_run_config(model_path)
        size = input_size(model, cfg, args.image_size)
        multilabel = is_multilabel(model)
        names = class_names_for(cfg, int(model.output_shape[-1]), multilabel)
        th = choose_threshold(args, model_path, digest, multilabel)
        cal = choose_calibration(args, model_path, digest, multilabel)

    files = expand_inputs(args.images, args.recursive)
    results, decoded = read_images(files, size, keep_original=args.gradcam is not None)
    if decoded:
        from distributed.metrics import adjust, as_written  # the transforms cxr-eval used (no TensorFlow)

        x = np.stack([d.image for d in decoded]).astype(np.float32)[..., None]
        out = model.predict(x, batch_size=args.batch_size, verbose=0)
        # as the CSVs of the evaluation hold them (float32, %.9g): the operating point was chosen on these
        raw = probs = as_written(positive_probability(out, multilabel))
        if cal and cal["applied"]:
            probs = as_written(adjust(raw, cal["temperature"], cal["shift"], cal.get("center", 0.0)))
            for d, v in zip(decoded, raw):
                results[d.row]["raw_probability"] = float(v)
        add_predictions(results, decoded, probs, names, th["threshold"], multilabel,
                        decide_on=raw if th["on"] == "raw_probability" else probs)
        if args.gradcam is not None:
            add_overlays(model, x, gradcam_classes(out, probs, multilabel), results, decoded, args.gradcam or None,
                         args.batch_size)
    if args.out:
        write_csv(args.out, results, th, multilabel)
    return report(results, args.json, model_path, size, th, multilabel, names, cal)


def write_csv(path, results: list[dict], th: dict, multilabel: bool) -> Path:
    """``--out``: one row per input file, in input order; text cells neutralised (data_prep.textsafe)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if multilabel:
        w.writerow(["file", "findings", "threshold", "probabilities", "error"])
    else:
        w.writerow(["file", "probability", "raw_probability", "prediction", "threshold", "threshold_source", "error"])
    for r in results:
        if multilabel:
            probs = ";".join(f"{k}={v:.9g}" for k, v in (r.get("probabilities") or {}).items())
            row = [r["file"], "|".join(r.get("findings") or []), f"{th['threshold']:.9g}", probs, r.get("error", "")]
        else:
            has = "probability" in r
            row = [r["file"], f"{r['probability']:.9g}" if has else "",
                   f"{r.get('raw_probability', r.get('probability')):.9g}" if has else "",
                   r.get("prediction", ""), f"{th['threshold']:.9g}", th["source"], r.get("error", "")]
        w.writerow(csv_row(row))
    return atomic_write_text(path, buf.getvalue())


def report(results: list[dict], as_json: bool, model_path, size: int, th: dict, multilabel: bool,
           names, calibration: dict | None = None) -> int:
    """Print the results (JSON or a table), one stderr line per error; the exit code."""
    failed = sum(1 for r in results if "error" in r)
    note = calibration_note(calibration)
    threshold = th["threshold"]
    if as_json:
        doc = {"model": str(model_path), "image_size": int(size), "threshold": threshold,
               "threshold_source": {k: v for k, v in th.items() if k != "threshold"},
               "threshold_note": threshold_note(th),
               "task": "multilabel" if multilabel else "binary", "classes": names, "results": results,
               "failed": failed, "calibration": {**calibration, "note": note} if calibration else None}
        print(json.dumps(doc, indent=2))
    else:
        for n in (note, threshold_note(th)):
            if n:
                print(f"# {console(n)}")
        print_table(results, multilabel, threshold, names)
    for r in results:
        if "error" in r:
            print(f"cxr-predict: {console(r['file'])}: {console(r['error'])}", file=sys.stderr)
    return 1 if failed else 0


def print_table(results, multilabel: bool, threshold: float, names=None) -> None:
    files = {id(r): console(r["file"]) for r in results}
    w = max([len("file")] + [len(f) for f in files.values()])
    if multilabel:
        print(f"{'file':<{w}}  {'size':>11}  findings (probability, top 5; >= {threshold:g} marked *)")
    else:
        label = console(names[-1] if names else next((r["label"] for r in results if "label" in r), "positive"))
        print(f"{'file':<{w}}  {'P(' + label + ')':>{max(11, len(label) + 3)}}  {'prediction':<14}  {'size':>11}  note")
    for r in results:
        if "error" in r and "width" not in r:
            print(f"{files[id(r)]:<{w}}  ERROR: {console(r['error'])}")
            continue
        size = f"{r['width']}x{r['height']}"
        note = []
        if r.get("converted_from"):
            note.append(f"from {r['converted_from']}")
        if r.get("bits", 8) != 8:
            note.append(f"{r['bits']}-bit")
        if r.get("gradcam"):
            note.append(f"gradcam {r['gradcam']}")
        if "error" in r:
            note.append(f"ERROR: {r['error']}")
        if multilabel:
            top = sorted(r["probabilities"].items(), key=lambda kv: -kv[1])[:5]
            txt = ", ".join(f"{n} {v:.3f}{'*' if v >= threshold else ''}" for n, v in top)
            print(f"{files[id(r)]:<{w}}  {size:>11}  {console(txt)}"
                  + (f"  [{console('; '.join(note))}]" if note else ""))
        else:
            lw = max(11, len(console(r["label"])) + 3)
            print(f"{files[id(r)]:<{w}}  {r['probability']:>{lw}.4f}  {console(r['prediction']):<14}  {size:>11}  "
                  f"{console('; '.join(note))}")


if __name__ == "__main__":
    sys.exit(main())
