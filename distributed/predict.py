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
(``<name>.gradcam.png``) or, with a folder, into that folder. ``--model`` may be a ``.keras``
file or a run directory (its ``model.keras``, else ``checkpoints/best.keras``). Class names and
the default threshold come from the run's ``config.yaml`` when one is found beside the model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from data_prep.imaging import ImageError, load_xray


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
    from data_prep.config import ConfigError, load_config

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
            from data_prep.manifest import load_manifest

            classes = list(load_manifest(cfg.prep.out)["classes"])
            if len(classes) == num_outputs:
                return classes
        except Exception:  # noqa: BLE001 - the manifest is optional here
            pass
    if multilabel:
        try:
            from data_prep.metadata import FINDINGS
            if len(FINDINGS) == num_outputs:
                return list(FINDINGS)
        except ImportError:
            pass
        return [f"finding_{k}" for k in range(num_outputs)]
    if cfg is not None and num_outputs == 2:
        neg = "No Finding" if cfg.data.negative_rule == "no_finding" else f"not {cfg.data.positive_label}"
        return [neg, cfg.data.positive_label]
    return ["negative", "positive"] if num_outputs == 2 else [f"class_{k}" for k in range(num_outputs)]


def is_multilabel(model) -> bool:
    import tensorflow as tf

    act = getattr(model.layers[-1], "activation", None)
    # The contract: binary ends in a 2-way softmax, multilabel in K sigmoids.
    return act is tf.keras.activations.sigmoid and (model.output_shape[-1] or 0) > 1


def positive_probability(out: np.ndarray, multilabel: bool) -> np.ndarray:
    """Binary: probability of class 1 (softmax column 1, or the single sigmoid). Multilabel: all."""
    out = np.asarray(out, dtype=np.float32)
    if multilabel:
        return out
    return out[:, 1] if out.shape[-1] >= 2 else out[:, 0]


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


def original_gray(path, info: dict) -> np.ndarray:
    """The input as gray uint8 at its original size, through load_xray (no second decoder)."""
    from PIL import Image

    w, h = int(info["width"]), int(info["height"])
    gray, _ = load_xray(path, max(w, h))
    if (w, h) != (gray.shape[1], gray.shape[0]):
        gray = np.asarray(Image.fromarray(gray).resize((w, h), Image.BILINEAR))
    return gray


def write_overlay(path, heat: np.ndarray, src, info: dict) -> Path:
    from PIL import Image

    from data_prep.fsutil import atomic_write_bytes
    from distributed.gradcam import overlay
    import io

    rgb = overlay(original_gray(src, info), heat)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- main

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
    return p


def _fail(msg: str) -> int:
    print(f"cxr-predict: error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    images = list(args.images)
    # "--gradcam a.png b.png": argparse took the first image as DIR; it is an image.
    if args.gradcam and Path(args.gradcam).is_file():
        images.insert(0, args.gradcam)
        args.gradcam = ""
    if not images:
        parser.error("no image files given")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    try:
        model_path = resolve_model_path(args.model)
    except FileNotFoundError as e:
        return _fail(str(e))
    from distributed.model import load_model

    try:
        model = load_model(str(model_path))
    except Exception as e:  # noqa: BLE001 - any load failure is one clear line
        return _fail(f"{model_path}: cannot load model: {e}")

    shape = model.input_shape
    fixed = shape[1] if shape[1] is not None and shape[1] == shape[2] else None
    size = args.image_size or fixed
    if size is None:
        cfg0 = find_run_config(model_path)
        size = cfg0.data.image_size if cfg0 is not None else None
    if size is None:
        return _fail("the model's input size is not fixed: give --image-size")
    if fixed is not None and size != fixed:
        return _fail(f"--image-size {size} does not match the model's input size {fixed}")

    cfg = find_run_config(model_path)
    multilabel = is_multilabel(model)
    names = class_names_for(cfg, int(model.output_shape[-1]), multilabel)
    threshold = args.threshold if args.threshold is not None else (cfg.eval.threshold if cfg is not None else 0.5)

    results, batch, ok_idx = [], [], []
    for path in images:
        r = {"file": path}
        try:
            arr, info = load_xray(path, size)
        except ImageError as e:
            r["error"] = e.reason
        except Exception as e:  # noqa: BLE001 - one bad file never stops the others
            r["error"] = f"{type(e).__name__}: {e}"
        else:
            r.update(width=info["width"], height=info["height"], bits=info["bits"],
                     converted_from=info["converted_from"])
            r["_info"] = info
            batch.append(arr)
            ok_idx.append(len(results))
        results.append(r)

    if batch:
        x = np.stack(batch).astype(np.float32)[..., None]
        out = model.predict(x, batch_size=args.batch_size, verbose=0)
        probs = positive_probability(out, multilabel)
        cam = None
        if args.gradcam is not None:
            from distributed.gradcam import GradCAM

            cam = GradCAM(model)
            if multilabel:
                cls = np.argmax(probs, axis=1)
            else:
                cls = np.full(len(batch), 1 if out.shape[-1] >= 2 else 0)
            heats = cam(x, cls, batch_size=args.batch_size)
        used: set = set()
        for j, i in enumerate(ok_idx):
            r = results[i]
            if multilabel:
                r["probabilities"] = {n: float(v) for n, v in zip(names, probs[j])}
                r["findings"] = [n for n, v in zip(names, probs[j]) if v >= threshold]
            else:
                r["probability"] = float(probs[j])
                r["label"] = names[-1]
                r["prediction"] = names[1] if probs[j] >= threshold else names[0]
            if cam is not None:
                dest = overlay_path(Path(r["file"]), args.gradcam or None, used)
                try:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    write_overlay(dest, heats[j], r["file"], r["_info"])
                    r["gradcam"] = str(dest)
                except (OSError, ImageError) as e:
                    r["error"] = f"Grad-CAM overlay not written: {getattr(e, 'reason', e)}"
    for r in results:
        r.pop("_info", None)

    failed = sum(1 for r in results if "error" in r)
    if args.json:
        doc = {"model": str(model_path), "image_size": int(size), "threshold": threshold,
               "task": "multilabel" if multilabel else "binary", "classes": names, "results": results,
               "failed": failed}
        print(json.dumps(doc, indent=2))
    else:
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
