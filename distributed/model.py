"""The network: an ImageNet backbone from ``tf.keras.applications`` with a new head.

Input ``image`` (S, S, 1) float32 in [0, 255]. Inside the model, two registered, serializable
layers replicate the gray channel to RGB and apply the backbone's own ``preprocess_input``, so a
saved model takes raw pixels and nobody can forget the preprocessing. The backbone is built FLAT
on that tensor (``input_tensor=``), so its layers (``block5_conv3`` ...) are layers of the model,
which Grad-CAM and layer freezing need. Head: global average pooling, Dense relu, Dropout, Dense
softmax (sigmoid for multilabel).

No Horovod, no MPI here: the same model serves training, evaluation and prediction.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import SimpleNamespace

import tensorflow as tf

from data_prep.backbones import BACKBONES, Backbone, backbone_of, frozen_through_block
from data_prep.cli import UserError
from distributed import safeload

__all__ = ["build_model", "load_model", "last_conv_layer", "backbone_layers", "set_trainable", "trainable_summary",
           "GrayToRGB", "BackbonePreprocess", "WeightsUnavailable", "CUSTOM_OBJECTS", "BACKBONES", "Backbone",
           "imagenet_weights_file", "copy_weights", "precision_of", "convert_precision", "PRECISIONS"]

_PREPROCESS = {  # the backbone modules' own preprocess_input (imagenet_utils modes)
    "caffe": lambda x: tf.keras.applications.vgg16.preprocess_input(x),
    "torch": lambda x: tf.keras.applications.densenet.preprocess_input(x),
    "tf": lambda x: tf.keras.applications.mobilenet_v2.preprocess_input(x),
}
HEAD_LAYERS = ("head_gap", "head_dense", "head_dropout", "predictions")
PRECISIONS = ("float32", "mixed_bfloat16")  # runtime.precision once chosen (distributed.precision)
# Layers that compute in float32 whatever the policy: exact pixel arithmetic in, softmax and loss out.
FLOAT32_LAYERS = ("gray_to_rgb", "preprocess", "predictions")


class WeightsUnavailable(UserError, RuntimeError):
    """Pretrained weights cannot be found or loaded; the message says which file goes where."""


@tf.keras.utils.register_keras_serializable(package="cxr")
class GrayToRGB(tf.keras.layers.Layer):
    """(…, 1) gray to (…, 3) by replication: ImageNet backbones expect three channels."""

    def call(self, x):
        return tf.concat([x, x, x], axis=-1)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-1].concatenate([3])


@tf.keras.utils.register_keras_serializable(package="cxr")
class BackbonePreprocess(tf.keras.layers.Layer):
    """The backbone's ``preprocess_input`` on RGB in [0, 255] (caffe: BGR minus ImageNet mean;
    torch: /255, minus mean, over std; tf: to [-1, 1])."""

    def __init__(self, mode: str = "caffe", **kwargs):
        super().__init__(**kwargs)
        if mode not in _PREPROCESS:
            raise ValueError(f"unknown preprocess mode {mode!r}; expected one of {sorted(_PREPROCESS)}")
        self.mode = mode

    def call(self, x):
        return _PREPROCESS[self.mode](x)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


CUSTOM_OBJECTS = {"GrayToRGB": GrayToRGB, "BackbonePreprocess": BackbonePreprocess,
                  "cxr>GrayToRGB": GrayToRGB, "cxr>BackbonePreprocess": BackbonePreprocess}


# --------------------------------------------------------------------------- masked labels
# A target of -1 is a masked label (data.uncertain: ignore, blank CheXpert labels; distributed.data.fed): it
# adds nothing to the loss or the accuracy. Without masked labels the stock Keras loss and metric are used.

@tf.keras.saving.register_keras_serializable(package="cxr")
def masked_binary_crossentropy(y_true, y_pred):
    """Per image: the mean binary cross-entropy over its labelled outputs (0 when none is labelled)."""
    y_true = tf.cast(y_true, y_pred.dtype)
    w = tf.cast(y_true >= 0, y_pred.dtype)
    p = tf.clip_by_value(y_pred, 1e-7, 1 - 1e-7)
    y = tf.maximum(y_true, 0.0)
    bce = -(y * tf.math.log(p) + (1 - y) * tf.math.log(1 - p))
    return tf.reduce_sum(bce * w, axis=-1) / tf.maximum(tf.reduce_sum(w, axis=-1), 1.0)


@tf.keras.saving.register_keras_serializable(package="cxr")
def masked_categorical_crossentropy(y_true, y_pred):
    """Categorical cross-entropy; an image whose one-hot row is masked (-1) counts 0."""
    y_true = tf.cast(y_true, y_pred.dtype)
    w = tf.cast(tf.reduce_all(y_true >= 0, axis=-1), y_pred.dtype)
    p = tf.clip_by_value(y_pred, 1e-7, 1 - 1e-7)
    return -tf.reduce_sum(tf.maximum(y_true, 0.0) * tf.math.log(p), axis=-1) * w


@tf.keras.saving.register_keras_serializable(package="cxr")
def masked_accuracy(y_true, y_pred):
    """Share of the labelled outputs on the right side of 0.5 (per image)."""
    y_true = tf.cast(y_true, y_pred.dtype)
    w = tf.cast(y_true >= 0, y_pred.dtype)
    hit = tf.cast(tf.equal(y_pred > 0.5, y_true > 0.5), y_pred.dtype)
    return tf.reduce_sum(hit * w, axis=-1) / tf.maximum(tf.reduce_sum(w, axis=-1), 1.0)


def training_loss(multilabel: bool, masked: bool = False):
    if not masked:
        return "binary_crossentropy" if multilabel else "categorical_crossentropy"
    return masked_binary_crossentropy if multilabel else masked_categorical_crossentropy


def training_metrics(masked: bool = False) -> list:
    return [masked_accuracy] if masked else ["accuracy"]


def _tiny_backbone(x):
    """VGG16's shape (5 blocks of 2-2-3-3-3 3x3 convs, max pooling, the same layer names) at 1/8 to
    1/4 of the width, each conv followed by batch normalization so that it learns from scratch in
    a few epochs: fast enough for tests and CI. Its last conv is ``block5_conv3``; the Grad-CAM
    layer (:func:`last_conv_layer`) is the activation after it, ``block5_relu3``."""
    widths, convs = (8, 16, 32, 64, 64), (2, 2, 3, 3, 3)
    for b, (w, n) in enumerate(zip(widths, convs), start=1):
        for c in range(1, n + 1):
            x = tf.keras.layers.Conv2D(w, 3, padding="same", use_bias=False, kernel_initializer="he_normal",
                                       name=f"block{b}_conv{c}")(x)
            x = tf.keras.layers.BatchNormalization(momentum=0.9, name=f"block{b}_bn{c}")(x)
            x = tf.keras.layers.Activation("relu", name=f"block{b}_relu{c}")(x)
        x = tf.keras.layers.MaxPooling2D(2, strides=2, name=f"block{b}_pool")(x)
    return x


def keras_cache_dir() -> Path:
    base = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(base) / "models"


def imagenet_weights_file(backbone: str) -> tuple[str, str]:
    """(file name, download URL) of the backbone's ImageNet no-top weights."""
    b = BACKBONES[backbone]
    if b.weights_file is None:
        raise WeightsUnavailable(f"model.backbone={backbone!r} has no ImageNet weights (it is a test network); "
                                 f"set model.weights=none or a path to an .h5 file")
    return b.weights_file, b.weights_url


def _imagenet_path(backbone: str) -> str:
    fname, url = imagenet_weights_file(backbone)
    cached = keras_cache_dir() / fname
    if cached.is_file():
        return str(cached)
    try:  # Keras' own cache and download, when the network allows it
        return tf.keras.utils.get_file(fname, url, cache_subdir="models")
    except Exception as e:  # noqa: BLE001 - any download failure means the same to the user
        raise WeightsUnavailable(
            f"ImageNet weights for {backbone} are not in the Keras cache and cannot be downloaded "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). Put {fname} in "
            f"{keras_cache_dir()}/ (download it from {url} on a machine with network access), or set "
            f"model.weights to the path of that .h5 file, or model.weights=none to train from scratch.") from None


def _load_weight_file(path: str, base: tf.keras.Model, model: tf.keras.Model, backbone: str):
    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsUnavailable(f"model.weights={path!r}: no such file; expected 'imagenet', 'none' or the path "
                                 f"of an .h5 weight file (e.g. {BACKBONES[backbone].weights_file or 'weights.h5'})")
    safeload.check_hdf5_file(p, WeightsUnavailable)  # HDF5 is data: no external storage, links, size claims
    errors = []
    for target, what in ((base, "backbone (no-top)"), (model, "whole model")):
        try:
            target.load_weights(str(p))
            return what
        except (ValueError, KeyError, OSError) as e:
            errors.append(f"as {what}: {str(e).splitlines()[0][:200]}")
    raise WeightsUnavailable(f"cannot load {p} into a {backbone} model; " + "; ".join(errors))


@contextlib.contextmanager
def _policy(precision: str):
    """Keras' global dtype policy while layers are made (the applications take no dtype argument)."""
    if precision not in PRECISIONS:
        raise ValueError(f"runtime.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    old = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(precision)
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(old)


def build_model(model_cfg, image_size: int, num_classes: int, multilabel: bool = False,
                precision: str = "float32") -> tf.keras.Model:
    """The network for ``model_cfg`` (the config's ``model`` section: backbone, weights,
    dense_units, dropout), square gray input of ``image_size`` pixels, ``num_classes`` outputs.

    ``precision`` ``mixed_bfloat16``: the backbone and the head compute in bfloat16 with float32
    variables; the input layers (gray to RGB, preprocessing: exact pixel arithmetic) and the
    classifier (softmax/sigmoid and so the loss) stay float32 (``FLOAT32_LAYERS``)."""
    backbone = model_cfg.backbone
    if backbone not in BACKBONES:
        raise ValueError(f"model.backbone: {backbone!r} is not one of {sorted(BACKBONES)}")
    ctor, mode = BACKBONES[backbone].constructor, BACKBONES[backbone].preprocess
    with _policy(precision):
        image = tf.keras.Input((image_size, image_size, 1), dtype="float32", name="image")
        x = GrayToRGB(name="gray_to_rgb", dtype="float32")(image)
        x = BackbonePreprocess(mode, name="preprocess", dtype="float32")(x)
        if ctor is None:
            features = _tiny_backbone(x)
        else:
            # input_tensor=: the backbone's layers are built on our tensor, flat in one graph
            app = getattr(tf.keras.applications, ctor)
            features = app(include_top=False, weights=None, input_tensor=x).output
        base = tf.keras.Model(image, features, name=f"{backbone}_base")
        h = tf.keras.layers.GlobalAveragePooling2D(name="head_gap")(features)
        h = tf.keras.layers.Dense(model_cfg.dense_units, activation="relu", name="head_dense")(h)
        h = tf.keras.layers.Dropout(model_cfg.dropout, name="head_dropout")(h)
        out = tf.keras.layers.Dense(num_classes, activation="sigmoid" if multilabel else "softmax",
                                    dtype="float32", name="predictions")(h)
        model = tf.keras.Model(image, out, name=f"cxr_{backbone}")
    weights = (model_cfg.weights or "none").strip()
    if weights.lower() == "imagenet":
        _load_weight_file(_imagenet_path(backbone), base, model, backbone)
    elif weights.lower() not in ("none", ""):
        _load_weight_file(weights, base, model, backbone)
    return model


def precision_of(model) -> str:
    """The compute precision a model was built with: its backbone's (first Conv2D's) dtype policy."""
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.Conv2D):
            return layer.dtype_policy.name
    return model.layers[-1].dtype_policy.name


def convert_precision(model, precision: str):
    """``model`` computing in ``precision``: the model itself when it already does, else the same
    architecture rebuilt with that policy and the weights copied (variables are float32 under
    both policies, so nothing is rounded). ``FLOAT32_LAYERS`` stay float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"runtime.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision_of(model) == precision:
        return model
    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] != "InputLayer" and layer["config"]["name"] not in FLOAT32_LAYERS:
            layer["config"]["dtype"] = tf.keras.mixed_precision.Policy(precision)
    with tf.keras.utils.custom_object_scope(CUSTOM_OBJECTS):
        new = tf.keras.Model.from_config(config, custom_objects=CUSTOM_OBJECTS)
    copy_weights(model, new)
    return new


def _build_from_spec(spec: dict) -> tf.keras.Model:
    """``build_model`` from the parameters :func:`distributed.safeload.build_spec` read from a file."""
    cfg = SimpleNamespace(backbone=spec["backbone"], weights="none", dense_units=spec["dense_units"],
                          dropout=spec["dropout"])
    return build_model(cfg, spec["image_size"], spec["num_classes"], multilabel=spec["multilabel"],
                       precision=spec["precision"])


def load_model(path, compile: bool = False, precision: str | None = None, trust: bool = False) -> tf.keras.Model:
    """A model saved by training (``model.keras``, ``checkpoints/{best,last}.keras``), custom layers
    known. Not compiled unless ``compile``. ``precision``: convert to that compute precision
    (:func:`convert_precision`); None keeps the one it was saved with.

    A model file is data: by default the network is rebuilt by :func:`build_model` from the
    parameters in the file's config and only its weights are read (:mod:`distributed.safeload`);
    HDF5, SavedModel, Lambda layers and foreign architectures are refused (``UntrustedModel``).
    ``trust=True`` (``predict --trust-model``, ``eval.trust_model``) uses Keras' own loader, which
    also reads ``.h5`` files and Keras SavedModel folders and runs what they hold."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no model at {p}")
    if p.is_dir() and (p / "saved_model.pb").exists() and not (p / "keras_metadata.pb").exists():
        raise ValueError(f"{p} is an inference-only SavedModel (serving): load it with "
                         f"tf.saved_model.load(path).serve(images), or pass the run's model.keras here")
    if not trust:
        model = safeload.load_untrusted(p, _build_from_spec, BACKBONES, PRECISIONS)
        if compile:
            raise ValueError("load_model(compile=True) needs trust=True (the file's training configuration)")
    else:
        with tf.keras.utils.custom_object_scope(CUSTOM_OBJECTS):
            model = tf.keras.models.load_model(str(p), custom_objects=CUSTOM_OBJECTS, compile=compile,
                                               **({"safe_mode": False} if safeload.file_kind(p) == "keras" else {}))
    return model if precision is None or compile else convert_precision(model, precision)


def copy_weights(src, dst) -> int:
    """Copy weights layer by layer, by name (safe whatever the layers' trainable flags, which
    reorder ``Model.get_weights()``). Returns the number of layers copied."""
    n = 0
    for layer in dst.layers:
        if layer.weights:
            layer.set_weights(src.get_layer(layer.name).get_weights())
            n += 1
    return n


def _index(model, name):
    for i, layer in enumerate(model.layers):
        if layer.name == name:
            return i
    raise ValueError(f"model {model.name} has no layer {name!r}: not built by distributed.model.build_model")


def backbone_layers(model) -> list:
    """The backbone's layers in order, counted from the input layer (as ``VGG16().layers``)."""
    start, stop = _index(model, "preprocess"), _index(model, "head_gap")
    return [model.layers[0]] + list(model.layers[start + 1:stop])


def trainable_summary(model) -> dict:
    """What a phase trains, after :func:`set_trainable`: the backbone layers frozen and trained (names,
    counted from the input layer as ``VGG16().layers``), the head, and the parameter counts."""
    layers = backbone_layers(model)

    def count(ws) -> int:
        return int(sum(w.shape.num_elements() for w in ws))

    return {"backbone_layers": len(layers),
            "frozen": [la.name for la in layers if not la.trainable],
            "trained": [la.name for la in layers if la.trainable],
            "head": [n for n in HEAD_LAYERS if model.get_layer(n).trainable],
            "trainable_params": count(model.trainable_weights),
            "non_trainable_params": count(model.non_trainable_weights)}


def last_conv_layer(model) -> str:
    """Name of the last convolutional feature map, the Grad-CAM layer: the registry's ``gradcam_layer``
    for a model built by :func:`build_model` ('block5_conv3' for VGG16, 'block5_conv4' for VGG19,
    'conv5_block3_out' for ResNet50, 'relu' for DenseNet121). A model whose backbone is not in the
    registry falls back to a search: the last 4-D output of its backbone that is no pooling, padding
    or dropout."""
    backbone = backbone_of(model.name)
    if backbone is not None:
        name = BACKBONES[backbone].gradcam_layer
        _index(model, name)  # a model of that name without the layer: not ours, say so
        return name
    for layer in reversed(backbone_layers(model)[1:]):
        shape = layer.output_shape
        if isinstance(layer, (tf.keras.layers.MaxPooling2D, tf.keras.layers.AveragePooling2D,
                              tf.keras.layers.ZeroPadding2D, tf.keras.layers.Dropout)):
            continue
        if isinstance(shape, tuple) and len(shape) == 4:
            return layer.name
    raise ValueError(f"model {model.name} has no 4-D feature map in its backbone")


def set_trainable(model, phase: str, freeze: str = "first_n", freeze_first: int = 10, freeze_blocks: int = 0) -> int:
    """Freeze for a phase; returns the number of trainable weight tensors.

    warmup: the whole backbone frozen, only the head trains. finetune: ``first_n`` freezes the
    first ``freeze_first`` backbone layers (the article's option B), ``all_conv`` the whole
    backbone (option A), ``blocks`` the input and the backbone's blocks 1..``freeze_blocks``
    (:func:`data_prep.backbones.frozen_through_block`: the same meaning on any backbone). Recompile
    after calling this. Frozen BatchNorm layers run in inference mode (Keras 2 semantics of
    ``trainable=False``).
    """
    layers = backbone_layers(model)
    if phase == "warmup" or freeze == "all_conv":
        frozen = len(layers)
    elif freeze == "first_n":
        frozen = min(freeze_first, len(layers))
    elif freeze == "blocks":
        backbone = backbone_of(model.name)
        if backbone is None:
            raise ValueError(f"train.finetune.freeze: blocks needs a model built by build_model; {model.name!r} "
                             f"is not one (use first_n)")
        frozen = frozen_through_block(backbone, [la.name for la in layers], freeze_blocks)
    else:
        raise ValueError(f"freeze: {freeze!r} is not first_n, all_conv or blocks")
    model.trainable = True
    for i, layer in enumerate(layers):
        layer.trainable = i >= frozen
    for name in HEAD_LAYERS:
        model.get_layer(name).trainable = True
    return len(model.trainable_weights)
