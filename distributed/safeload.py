"""Loading a model file as data: the network is rebuilt by this project's own code, the file gives weights.

A Keras model file can carry code (a ``Lambda`` layer's bytecode, a SavedModel's graph, custom
classes named by module). Predict, evaluate and ``--resume`` take model files from others, so by
default nothing in a file is deserialized as code:

* a ``.keras`` file (a zip) is opened with :mod:`zipfile`; its ``config.json`` is read as JSON
  (bounded in size), the parameters of :func:`distributed.model.build_model` are read from it
  (backbone, input size, outputs, head width, dropout, precision) and checked, the network is
  built from them by ``build_model``, and its architecture must equal the file's layer for layer
  (only the ``trainable`` flags may differ; they are copied). Then only the weights are read
  (``model.weights.h5`` inside the zip, plain HDF5 data), after its structure is checked
  (``data_prep.h5check``: no external storage, virtual datasets or links, no size beyond the file)
  and every dataset the load reads against the network's variable (shape, dtype);
* HDF5 (``.h5``, also an HDF5 file named ``.keras``), SavedModel folders and anything else are
  refused: they can only be loaded by Keras' own loader, which runs what they hold.

``trust=True`` (``predict --trust-model``, ``eval.trust_model: true``) hands the file to Keras'
loader as it is, Lambda layers and all: for files one made oneself.
"""
from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path

import numpy as np

from data_prep.cli import UserError, one_line

__all__ = ["UntrustedModel", "file_kind", "read_keras_config", "build_spec", "load_untrusted"]

MAX_CONFIG_BYTES = 64 << 20  # a VGG16 config.json is ~40 KB
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
OPT_IN = "pass --trust-model (predict) or set eval.trust_model=true (evaluate, resume) only for a file you trust"


class UntrustedModel(UserError, ValueError):
    """A model file that cannot be loaded as data only; the message says why and how to opt in."""


MAX_CONFIG_DEPTH = 64  # a functional model's config.json nests about 10 levels
WEIGHTS_MEMBER = "model.weights.h5"
WEIGHTS_SLACK = 16 << 20  # HDF5's own structures, beyond the values


def _depth_ok(tree, limit: int) -> bool:
    """``tree`` (parsed JSON) nests at most ``limit`` levels; iterative, so any depth is answered."""
    stack = [(tree, 1)]
    while stack:
        node, d = stack.pop()
        if d > limit:
            return False
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return True


class _Planned(dict):
    """A weights store that notes ``path -> (shape, dtype)`` of what a layer would save, nothing else."""

    def __init__(self, out: dict, prefix: str):
        super().__init__()
        self._out, self._prefix = out, prefix

    def __setitem__(self, key, value):
        a = np.asarray(value)
        self._out[f"{self._prefix}/{key}"] = (tuple(a.shape), a.dtype)


class _Plan:
    """``saving_lib``'s weights-store interface for a dry save: the datasets a load reads, by path."""

    def __init__(self):
        self.expected: dict = {}

    def make(self, path):
        return _Planned(self.expected, f"/{path}/vars" if path else "/vars")


class _Store:
    """``saving_lib.H5IOStore``'s read interface on an HDF5 file already open (and checked)."""

    def __init__(self, h5):
        self.h5 = h5

    def get(self, path):
        if not path:
            return self.h5["vars"]
        if path in self.h5 and "vars" in self.h5[path]:
            return self.h5[path]["vars"]
        return {}


def _expected_weights(model) -> dict:
    from keras.src.saving import saving_lib

    plan = _Plan()
    saving_lib._save_state(model, weights_store=plan, assets_store=None, inner_path="", visited_trackables=set())
    return plan.expected


def check_hdf5_file(path, error=UntrustedModel) -> None:
    """An HDF5 weights file (``model.weights``: an ``.h5`` of Keras' legacy format, ImageNet's included)
    walked by :func:`data_prep.h5check.walk` before Keras reads it: ``error`` naming the file and the
    dataset for external storage, virtual datasets, links or a size beyond the file. Not HDF5: nothing
    to check here (Keras' own error names it)."""
    import h5py

    from data_prep import h5check

    try:
        h = h5py.File(path, "r")
    except OSError:
        return
    with h:
        h5check.walk(h, str(path), error=error)


def load_weights_checked(model, p: Path) -> None:
    """``model``'s weights from the ``model.weights.h5`` of the ``.keras`` zip ``p``, as Keras'
    ``load_weights`` reads them, after :func:`data_prep.h5check.walk` and a check of every dataset
    the load reads against the network's variable (shape, dtype); the member's size is bounded by
    what the network's weights (and an optimizer's slots) take. UntrustedModel naming the dataset."""
    import h5py
    from keras.src.saving import saving_lib

    from data_prep import h5check

    expected = _expected_weights(model)
    need = sum(math.prod(s) * d.itemsize for s, d in expected.values())
    limit = 4 * need + WEIGHTS_SLACK  # the values, an optimizer's slots (saved by a compiled model), HDF5's own
    data = _zip_member(p, WEIGHTS_MEMBER, limit, f"more than this network's weights can take ({limit}); refused")
    where = f"{p} ({WEIGHTS_MEMBER})"
    try:
        h5 = h5py.File(io.BytesIO(data), "r")
    except OSError as e:
        raise UntrustedModel(f"{where}: not readable HDF5 ({one_line(e)[:160]}); the file is damaged") from None
    with h5:
        found = h5check.walk(h5, where, error=UntrustedModel)
        for path, (shape, dtype) in expected.items():
            ds = found.get(path)
            if ds is None:
                raise UntrustedModel(f"{where}: no dataset {path} (a variable of the network); the file is damaged "
                                     f"or was not written by this project")
            if tuple(ds.shape) != shape or ds.dtype.kind != dtype.kind or ds.dtype.itemsize != dtype.itemsize:
                raise UntrustedModel(f"{where}: dataset {path} is {ds.dtype} {tuple(ds.shape)}, the network's "
                                     f"variable is {dtype} {shape}; refused")
        try:
            saving_lib._load_state(model, weights_store=_Store(h5), assets_store=None, inner_path="",
                                   skip_mismatch=False, visited_trackables=set())
        except (ValueError, KeyError, OSError, TypeError) as e:
            raise UntrustedModel(f"{p}: cannot read its weights ({one_line(e)[:200]}); the file is damaged or "
                                 f"was not written by this project") from None


def _zip_member(path: Path, name: str, limit: int, too_big: str) -> bytes:
    """Member ``name`` of the ``.keras`` zip ``path``, refused (UntrustedModel, ``too_big`` saying why) when
    its header claims more than ``limit`` bytes or more than ``limit`` come out of it."""
    try:
        with zipfile.ZipFile(path) as z:
            try:
                info = z.getinfo(name)
            except KeyError:
                raise UntrustedModel(f"{path}: not a Keras model file (no {name} inside)") from None
            if info.file_size > limit:
                raise UntrustedModel(f"{path}: its {name} claims {info.file_size} bytes, {too_big}")
            with z.open(info) as f:
                data = f.read(limit + 1)
    except zipfile.BadZipFile as e:
        raise UntrustedModel(f"{path}: damaged model file ({e})") from None
    if len(data) > limit:
        raise UntrustedModel(f"{path}: its {name} holds more than its header claims, {too_big}")
    return data


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
    text = _zip_member(path, "config.json", MAX_CONFIG_BYTES, "more than any network of this project needs")
    try:
        tree = json.loads(text)
    except ValueError as e:
        raise UntrustedModel(f"{path}: config.json is not JSON ({e})") from None
    except RecursionError:
        tree = None
    if tree is None or not _depth_ok(tree, MAX_CONFIG_DEPTH):
        raise UntrustedModel(f"{path}: its config.json nests deeper than {MAX_CONFIG_DEPTH} levels; not a network "
                             f"of this project")
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
            label = (x.get("config", {}).get("name", i)
                     if isinstance(x, dict) and isinstance(x.get("config"), dict) else i)
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
    load_weights_checked(model, p)  # its model.weights.h5, checked, read as saving_lib.load_weights_only reads it
    return model
