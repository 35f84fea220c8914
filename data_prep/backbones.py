"""The backbones the config may name (``model.backbone``): one registry, pure data.

No TensorFlow and no numpy here: ``data_prep.config`` takes its allowed ``model.backbone`` values from
:data:`BACKBONES`, ``launch`` (the sweep's presets) reads the blocks, and :mod:`distributed.model` builds
the network from it (constructor, preprocessing mode, weights, the Grad-CAM layer).

A backbone's **blocks** are its stages in order, each found by the prefixes of its layers' names:
VGG16, VGG19 and the tiny net ``block1`` .. ``block5``; ResNet50 and DenseNet121 ``conv1`` (the stem)
and ``conv2`` .. ``conv5`` (their residual stages / dense blocks with the transition after them).
``train.finetune.freeze: blocks`` with ``freeze_blocks: N`` freezes the backbone from its input layer
through the last layer of block N (:func:`frozen_through_block`), whatever the backbone.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Backbone", "BACKBONES", "NAMES", "block_names", "frozen_through_block", "backbone_of"]

_APPS = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class Backbone:
    """One backbone the config may name."""
    name: str
    constructor: str | None     # tf.keras.applications class; None: the tiny test network
    preprocess: str             # the backbone's preprocess_input mode (distributed.model._PREPROCESS)
    weights_file: str | None    # ImageNet no-top weights in the Keras cache; None: none exist
    weights_url: str | None     # where Keras downloads them
    gradcam_layer: str          # last 4-D feature map: the layer Grad-CAM looks at
    freeze_counts: str          # what train.finetune.freeze_first counts (backbone layers), their number first
    batch_norm: bool            # has BatchNormalization (statistics averaged over ranks each epoch)
    blocks: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (block name, layer-name prefixes), in order


def _apps(folder: str, file: str) -> tuple[str, str]:
    return file, _APPS + folder + file


_VGG_BLOCKS = tuple((f"block{i}", (f"block{i}_",)) for i in range(1, 6))
_RESNET_BLOCKS = (("conv1", ("conv1_", "pool1_")),) + tuple((f"conv{i}", (f"conv{i}_",)) for i in range(2, 6))
_DENSENET_BLOCKS = (("conv1", ("conv1/", "pool1")),) + tuple(
    (f"conv{i}", (f"conv{i}_", f"pool{i}_")) for i in range(2, 5)) + (("conv5", ("conv5_", "bn", "relu")),)

BACKBONES = {b.name: b for b in (
    Backbone("vgg16", "VGG16", "caffe", *_apps("vgg16/", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
             "block5_conv3", "19 layers of VGG16(): input, 13 conv, 5 pooling (10: blocks 1-3)", False,
             _VGG_BLOCKS),
    Backbone("vgg19", "VGG19", "caffe", *_apps("vgg19/", "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"),
             "block5_conv4", "22 layers of VGG19(): input, 16 conv, 5 pooling", False, _VGG_BLOCKS),
    Backbone("resnet50", "ResNet50", "caffe",
             *_apps("resnet/", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
             "conv5_block3_out", "175 layers of ResNet50(), from its input layer", True, _RESNET_BLOCKS),
    Backbone("densenet121", "DenseNet121", "torch",
             *_apps("densenet/", "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
             "relu", "427 layers of DenseNet121(), from its input layer", True, _DENSENET_BLOCKS),
    Backbone("tiny", None, "tf", None, None, "block5_relu3",
             "45 layers of the tiny net: input, 13 x (conv, batch norm, relu), 5 pooling", True, _VGG_BLOCKS),
)}
NAMES = tuple(BACKBONES)  # the allowed values of model.backbone, in this order


def block_names(backbone: str) -> list[str]:
    """The names of ``backbone``'s blocks in order (``block1`` .. ``block5``, ``conv1`` .. ``conv5``)."""
    return [name for name, _ in BACKBONES[backbone].blocks]


def _in_block(layer: str, prefixes: tuple[str, ...]) -> bool:
    return any(layer.startswith(p) for p in prefixes)


def frozen_through_block(backbone: str, layer_names: list[str], n: int) -> int:
    """How many of the backbone's layers (``layer_names``, in order from its input layer) to freeze so that
    the input and blocks 1..``n`` are frozen: up to and including the last layer of block ``n``. 0 for
    ``n`` = 0; all of them for ``n`` = the number of blocks (so nothing after the last block stays trainable)."""
    blocks = BACKBONES[backbone].blocks
    if not 0 <= n <= len(blocks):
        raise ValueError(f"train.finetune.freeze_blocks: {n} is out of range for model.backbone={backbone}; "
                         f"allowed 0..{len(blocks)} ({', '.join(block_names(backbone))})")
    if n == 0:
        return 0
    if n == len(blocks):
        return len(layer_names)
    prefixes = blocks[n - 1][1]
    last = [i for i, name in enumerate(layer_names) if _in_block(name, prefixes)]
    if not last:
        raise ValueError(f"model.backbone={backbone}: no layer of block {blocks[n - 1][0]} "
                         f"(names starting with {', '.join(prefixes)})")
    return last[-1] + 1


def backbone_of(model_name: str) -> str | None:
    """The registry name of a model built by ``distributed.model.build_model`` (named ``cxr_<backbone>``),
    or None for a model from elsewhere."""
    name = model_name.removeprefix("cxr_")
    return name if model_name.startswith("cxr_") and name in BACKBONES else None
