"""Loading a model file as data: the network is rebuilt by this project's own code, the file gives weights.

A Keras model file can carry code (a ``Lambda`` layer's bytecode, a SavedModel's graph, custom
classes named by module). Predict, evaluate and ``--resume`` take model files from others, so by
default nothing in a file is deserialized as code:

* a ``.keras`` file (a zip) is opened with :mod:`zipfile`; its ``config.json`` is read as JSON
  (bounded in size), the parameters of :func:`distributed.model.build_model` are read from it
  (backbone, input size, outputs, head width, dropout, precision) and checked, the network is
  built from them by ``build_model``, and its architecture must equal the file's layer for layer
  (only the ``trainable`` flags may differ; they are copied). Then only the weights are read
  (``model.weights.h5`` inside the zip, plain HDF5 data);
* HDF5 (``.h5``, also an HDF5 file named ``.keras``), SavedModel folders and anything else are
  refused: they can only be loaded by Keras' own loader, which runs what they hold.

``trust=True`` (``predict --trust-model``, ``eval.trust_model: true``) hands the file to Keras'
loader as it is, Lambda layers and all: for files one made oneself.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

from data_prep.cli import UserError

__all__ = ["UntrustedModel", "file_kind", "read_keras_config", "build_spec", "load_untrusted"]

MAX_CONFIG_BYTES = 64 << 20  # a VGG16 config.json is ~40 KB
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
OPT_IN = "pass --trust-model (predict) or set eval.trust_model=true (evaluate, resume) only for a file you trust"


class UntrustedModel(UserError, ValueError):
    """A model file that cannot be loaded as data only; the message says why and how to opt in."""


def file_kind(path: Path) -> str:
    """``keras`` (a zip), ``savedmodel`` (a folder), ``hdf5`` or ``unknown``, from the bytes, not the name."""
    p = Path(path)
    if p.is_dir():
        return "savedmodel"
    with open(p, "rb") as f:
        head = f.read(8)
    if head == HDF5_SIGNATURE:
        return "hdf5"
    if zipfile.is_zipfile(p):
        return "keras"
    return "unknown"


def read_keras_config(path: Path) -> dict:
    """The ``config.json`` of a ``.keras`` zip, as plain JSON data."""
    try:
        with zipfile.ZipFile(path) as z:
            try:
                info = z.getinfo("config.json")
            except KeyError:
                raise UntrustedModel(f"{path}: not a Keras model file (no config.json inside)") from None
            if info.file_size > MAX_CONFIG_BYTES:
                raise UntrustedModel(f"{path}: its config.json is {info.file_size} bytes, more than any "
                                     f"network of this project needs")
            with z.open(info) as f:
                text = f.read(MAX_CONFIG_BYTES + 1)
    except zipfile.BadZipFile as e:
        raise UntrustedModel(f"{path}: damaged model file ({e})") from None
    try:
        tree = json.loads(text)
    except ValueError as e:
        raise UntrustedModel(f"{path}: config.json is not JSON ({e})") from None
    if not isinstance(tree, dict) or not isinstance(tree.get("config"), dict) \
            or not isinstance(tree["config"].get("layers"), list):
        raise UntrustedModel(f"{path}: config.json does not describe a functional Keras model")
    return tree


def _layers(tree: dict) -> dict:
    out = {}
    for layer in tree["config"]["layers"]:
        if isinstance(layer, dict) and isinstance(layer.get("config"), dict):
            out[layer["config"].get("name")] = layer
    return out


def _num(value, kind, lo, hi, what, path):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)) \
            or not lo <= value <= hi:
        raise UntrustedModel(f"{path}: {what} {value!r} is not a value this project builds ({lo}..{hi})")
    return kind(value)


def build_spec(tree: dict, path: Path, backbones, precisions) -> dict:
    """The arguments of ``build_model`` a file's config implies, each checked (raises UntrustedModel);
    ``backbones``/``precisions``: the names ``distributed.model`` knows."""
    layers = _layers(tree)
    cls = [layer.get("class_name") for layer in tree["config"]["layers"] if isinstance(layer, dict)]
    if "Lambda" in cls:
        raise UntrustedModel(f"{path}: holds a Lambda layer (Python code); refused. {OPT_IN}")
    name = str(tree["config"].get("name", ""))
    backbone = name[4:] if name.startswith("cxr_") else ""
    if backbone not in backbones or not {"image", "predictions", "head_dense", "head_dropout"} <= set(layers):
        raise UntrustedModel(f"{path}: not a network built by distributed.model (model {name[:60]!r}); {OPT_IN}")
    try:
        shape = layers["image"]["config"]["batch_input_shape"]
        pred, dense = layers["predictions"]["config"], layers["head_dense"]["config"]
        rate = layers["head_dropout"]["config"]["rate"]
    except (KeyError, TypeError):
        raise UntrustedModel(f"{path}: not a network built by distributed.model; {OPT_IN}") from None
    if not isinstance(shape, list) or len(shape) != 4 or shape[1] != shape[2] or shape[3] != 1:
        raise UntrustedModel(f"{path}: input shape {shape!r} is not a square gray image; {OPT_IN}")
    activation = pred.get("activation")
    if activation not in ("softmax", "sigmoid"):
        raise UntrustedModel(f"{path}: output activation {activation!r} is not softmax or sigmoid; {OPT_IN}")
    precision = "float32"
    for layer in tree["config"]["layers"]:
        if layer.get("class_name") == "Conv2D":
            dtype = layer["config"].get("dtype")
            precision = dtype.get("config", {}).get("name") if isinstance(dtype, dict) else dtype
            break
    if precision not in precisions:
        raise UntrustedModel(f"{path}: compute precision {precision!r} is not one of {', '.join(precisions)}")
    return {"backbone": backbone, "precision": precision, "multilabel": activation == "sigmoid",
            "image_size": _num(shape[1], int, 8, 4096, "input size", path),
            "num_classes": _num(pred.get("units"), int, 1, 10000, "output count", path),
            "dense_units": _num(dense.get("units"), int, 1, 65536, "head width", path),
            "dropout": _num(rate, float, 0.0, 0.999, "dropout rate", path)}


def _strip(node, drop=("trainable", "shared_object_id")):
    """A config without the keys that may differ between the file and the rebuilt network."""
    if isinstance(node, dict):
        return {k: _strip(v, drop) for k, v in node.items() if k not in drop}
    if isinstance(node, (list, tuple)):
        return [_strip(v, drop) for v in node]
    return node


def _first_difference(a, b, where="config"):
    if type(a) is not type(b):
        return where
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{where}.{k}"
            d = _first_difference(a[k], b[k], f"{where}.{k}")
            if d:
                return d
        return ""
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where} (length {len(a)} vs {len(b)})"
        for i, (x, y) in enumerate(zip(a, b)):
            label = x.get("config", {}).get("name", i) if isinstance(x, dict) and isinstance(x.get("config"), dict) else i
            d = _first_difference(x, y, f"{where}[{label}]")
            if d:
                return d
        return ""
    return "" if a == b else where


def load_untrusted(path, build, backbones, precisions):
    """The model in ``path`` made by ``build(spec)`` (``distributed.model``'s ``build_model`` with the
    file's checked parameters), with the file's weights; UntrustedModel when the file is not one this
    project writes (HDF5, SavedModel, other architectures, Lambda layers)."""
    import tensorflow as tf  # after the caller's runtime settings

    p = Path(path)
    kind = file_kind(p)
    if kind == "savedmodel":
        raise UntrustedModel(f"{p} is a SavedModel folder, which runs its stored graph when loaded; "
                             f"give the run's model.keras, or {OPT_IN}")
    if kind == "hdf5":
        raise UntrustedModel(f"{p} is an HDF5 (legacy Keras) model, which can run code stored in it "
                             f"(Lambda layers) when loaded; give a .keras file written by training, or {OPT_IN}")
    if kind != "keras":
        raise UntrustedModel(f"{p} is not a Keras model file (neither a .keras zip nor HDF5)")
    if p.suffix != ".keras":
        raise UntrustedModel(f"{p}: a Keras zip model must be named *.keras")
    tree = read_keras_config(p)
    model = build(build_spec(tree, p, backbones, precisions))
    ours = json.loads(json.dumps(tf.keras.saving.serialize_keras_object(model)["config"], default=str))
    diff = _first_difference(_strip(ours), _strip(tree["config"]))
    if diff:
        raise UntrustedModel(f"{p}: its network differs from the one distributed.model builds for it "
                             f"(at {diff[:160]}); {OPT_IN}")
    flags = {name: layer["config"].get("trainable", True) for name, layer in _layers(tree).items()}
    for layer in model.layers:
        if isinstance(flags.get(layer.name), bool):
            layer.trainable = flags[layer.name]
    try:
        model.load_weights(str(p))  # .keras zip: its model.weights.h5, HDF5 data only (saving_lib.load_weights_only)
    except (ValueError, KeyError, OSError) as e:
        raise UntrustedModel(f"{p}: cannot read its weights ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
                             f"; the file is damaged or was not written by this project") from None
    return model
