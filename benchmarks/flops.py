"""Model FLOPs per image, counted from a built Keras model (conv and dense multiply-accumulates).

Convention (stated in every report):

* 1 MAC (multiply-accumulate) = 2 FLOPs. Only convolutions and dense layers are counted (all
  of their MACs; biases, activations, pooling, batch norm, the in-model preprocessing and the
  augmentation are left out: together well under 1% for VGG16).
* forward FLOPs/image = 2 x sum of the conv/dense MACs of one image.
* training FLOPs/image = forward of the whole model + 2 x forward of the TRAINABLE part, where
  the trainable part is every layer from the first one with trainable weights to the output
  (the backward pass costs about twice the forward: one product for the weight gradient and one
  for the input gradient). Frozen layers before it run forward only. So a fully trainable model
  costs ~3x forward; the article's warm-up (frozen backbone) ~1x forward; its fine-tune with the
  first 10 VGG16 layers frozen in between.

VGG16 at 224x224 with its top: 15.47 GMAC (the published "15.5 GMAC / 30.9 GFLOPs").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class LayerCount:
    name: str
    kind: str
    macs: int
    trainable: bool


@dataclass
class FlopCount:
    layers: list[LayerCount] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def forward_flops(self) -> int:
        return 2 * self.macs

    def trainable_tail_macs(self) -> int:
        """MACs from the first layer with trainable weights to the end (see module doc)."""
        for i, layer in enumerate(self.layers):
            if layer.trainable:
                return sum(lc.macs for lc in self.layers[i:])
        return 0

    @property
    def training_flops(self) -> int:
        return self.forward_flops + 2 * 2 * self.trainable_tail_macs()

    def summary(self) -> dict:
        return {"forward_macs": self.macs, "forward_flops": self.forward_flops,
                "trainable_tail_macs": self.trainable_tail_macs(), "training_flops": self.training_flops,
                "convention": "1 MAC = 2 FLOPs; conv+dense only; train = fwd + 2 x fwd(trainable tail)"}


def _shape(s):
    if isinstance(s, list):  # a layer with one input can still report [shape]
        s = s[0]
    return tuple(s)


def _has_trainable_weights(layer) -> bool:
    return bool(layer.trainable and layer.trainable_weights)


def layer_macs(layer) -> tuple[str, int] | None:
    """(kind, MACs for one image) of a conv/dense layer, or None for layers that are not counted."""
    import tensorflow as tf  # only in a worker, after tuning has set the thread variables

    L = tf.keras.layers
    if isinstance(layer, L.DepthwiseConv2D):  # before Conv2D: it subclasses it
        out = _shape(layer.output_shape)
        kh, kw = layer.kernel_size
        cin = _shape(layer.input_shape)[-1]
        return "depthwise", int(np.prod(out[1:-1])) * cin * layer.depth_multiplier * kh * kw
    if isinstance(layer, L.SeparableConv2D):
        out = _shape(layer.output_shape)
        kh, kw = layer.kernel_size
        cin = _shape(layer.input_shape)[-1]
        spatial = int(np.prod(out[1:-1]))
        return "separable", spatial * cin * layer.depth_multiplier * (kh * kw + out[-1])
    if isinstance(layer, L.Conv2DTranspose):
        inp = _shape(layer.input_shape)
        kh, kw = layer.kernel_size
        return "conv_transpose", int(np.prod(inp[1:-1])) * inp[-1] * kh * kw * layer.filters
    if isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D)):
        out = _shape(layer.output_shape)
        inp = _shape(layer.input_shape)
        k = int(np.prod(layer.kernel_size))
        groups = getattr(layer, "groups", 1) or 1
        return "conv", int(np.prod(out[1:])) * k * (inp[-1] // groups)
    if isinstance(layer, L.Dense):
        inp = _shape(layer.input_shape)
        rows = int(np.prod(inp[1:-1])) if len(inp) > 2 else 1
        return "dense", rows * inp[-1] * layer.units
    return None


def count_flops(model) -> FlopCount:
    """Per-layer conv/dense MACs of ``model`` (nested models are walked), in layer order."""
    import tensorflow as tf  # only in a worker, after tuning has set the thread variables

    out = FlopCount()

    def walk(m, parent_trainable=True):
        for layer in m.layers:
            if isinstance(layer, tf.keras.Model):
                walk(layer, parent_trainable and layer.trainable)
                continue
            got = layer_macs(layer)
            if got is None:
                continue
            kind, macs = got
            out.layers.append(LayerCount(layer.name, kind, int(macs),
                                         parent_trainable and _has_trainable_weights(layer)))

    walk(model)
    return out
