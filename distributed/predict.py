"""Predict chest X-ray files with a trained model: ``cxr-predict`` / ``python -m distributed.predict``.

    python -m distributed.predict --model runs/demo/model.keras a.png b.jpg [--json]
                                  [--gradcam [DIR]] [--image-size PX] [--threshold T]

Every file goes through ``data_prep.imaging.load_xray`` -- the very function the prep stage
used for the training shards -- so PNG/JPEG, 8/16-bit, gray/RGB/RGBA are read the same way.
The image size is the model's input size unless ``--image-size`` says otherwise (only for a
model whose input size is not fixed). A file that cannot be read gets its own error line and
the others still run; the exit code is 1 when any file failed, 0 otherwise (2 for a bad model
or arguments).

``--gradcam`` writes a Grad-CAM overlay at the input's ORIGINAL size beside each input file
(``<name>.gradcam.png``) or, with a folder, into that folder; each file is decoded once for
both the network input and the overlay (``load_xray_and_original``). ``--model`` may be a ``.keras``
file or a run directory (its ``model.keras``, else ``checkpoints/best.keras``). Class names and
the default threshold come from the run's ``config.yaml`` when one is found beside the model.
A run's ``calibration.json`` (``cxr-eval`` with ``eval.calibrate``/``eval.prior_correction``) is applied
when it lists this model file's sha256: ``probability`` is then the calibrated one (and the threshold
applies to it), ``raw_probability`` the network's, and the output says what was done.

TensorFlow is imported only once a model is to be loaded (``distributed.model``,
``distributed.gradcam``): argument errors answer at once, and ``TF_CPP_MIN_LOG_LEVEL`` is set
before TensorFlow reads it.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.cli import UsageError, UserError, add_debug_arg, command
from data_prep.config import ConfigError, load_config
from data_prep.fsutil import atomic_write_bytes, sha256_file
from data_prep.imaging import ImageError, load_xray, load_xray_and_original
from data_prep.manifest import load_manifest
from data_prep.metadata import FINDINGS
from distributed.precision import cpu_flags, decide, plan_precision


# --------------------------------------------------------------------------- model and its run

def resolve_model_path(path) -> Path:
    p = Path(path)
    if p.is_dir():
        for cand in (p / "model.keras", p / "checkpoints" / "best.keras", p / "checkpoints" / "last.keras"):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"{p}: no model.keras or checkpoints/best.keras in this run directory")
    if not p.exists():
        raise FileNotFoundError(f"{p}: model file not found")
    return p


def find_run_config(model_path: Path):
    """The run's resolved config beside the model (run dir or its checkpoints/), or None."""
    for folder in (model_path.parent, model_path.parent.parent):
        for name in ("config.yaml", "eval_config.yaml"):
            f = folder / name
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


def find_calibration(model_path: Path) -> dict | None:
    """``calibration.json`` of the run (written by cxr-eval with ``eval.calibrate``/``eval.prior_correction``)
    and whether it belongs to this model file: ``{"file", "applied", "why", "temperature", "shift", ...}``."""
    for folder in (model_path.parent, model_path.parent.parent):
        f = folder / "calibration.json"
        if not f.is_file():
            continue
        try:
            cal = json.loads(f.read_text())
            temperature, shift = float(cal["temperature"]), float(cal["shift"])
            models = dict(cal.get("models") or {})
        except (OSError, ValueError, KeyError, TypeError) as e:
            return {"file": str(f), "applied": False, "why": f"unreadable ({type(e).__name__})"}
        if not (temperature > 0 and np.isfinite(temperature) and np.isfinite(shift)):
            return {"file": str(f), "applied": False, "why": "temperature or shift out of range"}
        if sha256_file(model_path) not in models.values():
            return {"file": str(f), "applied": False,
                    "why": f"made for {', '.join(models) or 'another model'}, not this model file"}
        return {"file": str(f), "applied": True, "temperature": temperature, "shift": shift,
                "prior_correction": bool(cal.get("prior_correction")), "target_prevalence": cal.get("target_prevalence"),
                "method": cal.get("method")}
    return None


def calibration_note(cal: dict | None) -> str | None:
    if cal is None:
        return None
    if not cal["applied"]:
        return f"{cal['file']} not applied: {cal['why']}; probabilities are the network's"
    parts = []
    if cal.get("method") == "temperature":
        parts.append(f"temperature {cal['temperature']:.3f}")
    if cal.get("prior_correction"):
        parts.append(f"prior correction to prevalence {cal['target_prevalence']:.3f} (logit shift {cal['shift']:+.3f})")
    return f"probabilities calibrated by {cal['file']}: " + ", ".join(parts) + " (--json: raw_probability is the network's)"


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
    p.add_argument("--model", "-m", required=True, help=".keras model file or run directory")
    p.add_argument("images", nargs="*", metavar="IMG", help="PNG or JPEG files (8/16-bit, gray, RGB, RGBA)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.add_argument("--gradcam", nargs="?", const="", default=None, metavar="DIR",
                   help="write a Grad-CAM overlay per image, beside the image or into DIR")
    p.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="network input size; default: the model's input size")
    p.add_argument("--threshold", type=float, default=None,
                   help="decision threshold; default: the run's eval.threshold, else 0.5")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", choices=("auto", "float32", "mixed_bfloat16"), default="auto",
                   help="compute precision (default auto: bfloat16 on CPUs with AMX-BF16, else float32; not measured "
                        "here); "
                        "probabilities are float32 either way")
    p.add_argument("--trust-model", action="store_true",  # distributed.safeload: a model file is data by default
                   help="load the file with Keras' own loader (HDF5, SavedModel, Lambda layers: code in the file "
                        "runs); only for files you trust")
    add_debug_arg(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    # "--gradcam a.png b.png": argparse took the first image as DIR; it is an image.
    if args.gradcam and Path(args.gradcam).is_file():
        args.images.insert(0, args.gradcam)
        args.gradcam = ""
    if not args.images:
        parser.error("no image files given")
    return args


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
                    multilabel: bool) -> None:
    for d, p in zip(decoded, probs):
        r = results[d.row]
        if multilabel:
            r["probabilities"] = {n: float(v) for n, v in zip(names, p)}
            r["findings"] = [n for n, v in zip(names, p) if v >= threshold]
        else:
            r["probability"] = float(p)
            r["label"] = names[-1]
            r["prediction"] = names[1] if p >= threshold else names[0]


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


@command("cxr-predict")  # a bad argument exits 2, a model that cannot be loaded 1: one line each
def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # read by TensorFlow at import: before open_model
    # bfloat16 needs oneDNN, which TensorFlow reads at import: decide before open_model imports it.
    precision = plan_precision(args.precision, environ=os.environ)
    # auto is measured by training and evaluation (distributed/calibrate.py), not for a few images here:
    # unmeasured it is bfloat16 on AMX-BF16, float32 elsewhere.
    precision = decide(precision, None, flags=cpu_flags())
    if precision.onednn_env:
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", precision.onednn_env)
    model_path, model = open_model(args.model, precision.precision, trust=args.trust_model)
    cfg = find_run_config(model_path)
    size = input_size(model, cfg, args.image_size)
    multilabel = is_multilabel(model)
    names = class_names_for(cfg, int(model.output_shape[-1]), multilabel)
    threshold = args.threshold if args.threshold is not None else (cfg.eval.threshold if cfg is not None else 0.5)

    cal = None if multilabel else find_calibration(model_path)
    results, decoded = read_images(args.images, size, keep_original=args.gradcam is not None)
    if decoded:
        x = np.stack([d.image for d in decoded]).astype(np.float32)[..., None]
        out = model.predict(x, batch_size=args.batch_size, verbose=0)
        probs = positive_probability(out, multilabel)
        if cal and cal["applied"] and not multilabel:
            from distributed.metrics import adjust  # the transform cxr-eval fitted (no TensorFlow)

            raw, probs = probs, adjust(probs, cal["temperature"], cal["shift"]).astype(np.float32)
            for d, v in zip(decoded, raw):
                results[d.row]["raw_probability"] = float(v)
        add_predictions(results, decoded, probs, names, threshold, multilabel)
        if args.gradcam is not None:
            add_overlays(model, x, gradcam_classes(out, probs, multilabel), results, decoded, args.gradcam or None,
                         args.batch_size)
    return report(results, args.json, model_path, size, threshold, multilabel, names, cal)


def report(results: list[dict], as_json: bool, model_path, size: int, threshold: float, multilabel: bool,
           names, calibration: dict | None = None) -> int:
    """Print the results (JSON or a table), one stderr line per error; the exit code."""
    failed = sum(1 for r in results if "error" in r)
    note = calibration_note(calibration)
    if as_json:
        doc = {"model": str(model_path), "image_size": int(size), "threshold": threshold,
               "task": "multilabel" if multilabel else "binary", "classes": names, "results": results,
               "failed": failed, "calibration": {**calibration, "note": note} if calibration else None}
        print(json.dumps(doc, indent=2))
    else:
        if note:
            print(f"# {note}")
        print_table(results, multilabel, threshold)
    for r in results:
        if "error" in r:
            print(f"cxr-predict: {r['file']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def print_table(results, multilabel: bool, threshold: float) -> None:
    w = max([len("file")] + [len(r["file"]) for r in results])
    if multilabel:
        print(f"{'file':<{w}}  {'size':>11}  findings (probability, top 5; >= {threshold:g} marked *)")
    else:
        label = next((r["label"] for r in results if "label" in r), "positive")
        print(f"{'file':<{w}}  {'P(' + label + ')':>{max(11, len(label) + 3)}}  {'prediction':<14}  {'size':>11}  note")
    for r in results:
        if "error" in r and "width" not in r:
            print(f"{r['file']:<{w}}  ERROR: {r['error']}")
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
            print(f"{r['file']:<{w}}  {size:>11}  {txt}" + (f"  [{'; '.join(note)}]" if note else ""))
        else:
            lw = max(11, len(r["label"]) + 3)
            print(f"{r['file']:<{w}}  {r['probability']:>{lw}.4f}  {r['prediction']:<14}  {size:>11}  {'; '.join(note)}")


if __name__ == "__main__":
    sys.exit(main())
