"""Grad-CAM (Selvaraju et al. 2017) for the classifier of ``distributed.model``: TensorFlow, no Horovod.

The heat map of class ``c`` is ReLU(sum_k a_k A^k), where A is the last convolution's output
(``block5_conv3`` for VGG16) and a_k the spatial mean of d y_c / d A^k. ``y_c`` is the class
score BEFORE the final softmax/sigmoid when the model ends in such a Dense layer (the paper's
choice; the probability saturates for confident images and its gradient vanishes); softmax
logits are centred (z_c - mean z), which for two classes is half the log-odds.

* :func:`gradcam` -- heat maps in [0, 1] at the model's input size for a batch of images.
* :func:`overlay` -- a heat map blended over a gray image, at the gray image's size.
* :func:`save_grid` -- one PNG with several overlays and their captions.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display: before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from data_prep.fsutil import atomic_write_bytes  # noqa: E402
from distributed.model import convert_precision, last_conv_layer  # noqa: E402


def find_last_conv(model: tf.keras.Model) -> str:
    """The name of the layer Grad-CAM should look at: for a model of a registered backbone the registry's
    ``gradcam_layer`` (``distributed.model.last_conv_layer``, no guessing); a model whose backbone is unknown
    falls back to a search: the last Conv2D, else the last 4-D output."""
    try:
        name = last_conv_layer(model)  # the contract's answer (block5_conv3 for VGG16)
        if name:
            return name if isinstance(name, str) else name.name
    except (AttributeError, ValueError):
        pass
    for layer in reversed(model.layers):
        if isinstance(layer, tf.keras.layers.Conv2D):
            return layer.name
    for layer in reversed(model.layers):
        shape = getattr(layer, "output_shape", None)
        if isinstance(shape, tuple) and len(shape) == 4 and not isinstance(layer, tf.keras.layers.InputLayer):
            return layer.name
    raise ValueError("model has no convolutional layer for Grad-CAM")


class GradCAM:
    """Reusable Grad-CAM for one model and layer (builds the two-output model once)."""

    def __init__(self, model: tf.keras.Model, layer_name: str | None = None):
        # Gradients in float32: a bfloat16 model's 8-bit mantissa would quantise the heat map.
        self.model = model = convert_precision(model, "float32")
        self.layer_name = layer_name or find_last_conv(model)
        conv = model.get_layer(self.layer_name).output
        head = model.layers[-1]
        act = getattr(head, "activation", None)
        self._logits_from_head = isinstance(head, tf.keras.layers.Dense) and act in (
            tf.keras.activations.softmax, tf.keras.activations.sigmoid)
        # The final Dense's input lets us form pre-activation class scores ourselves.
        second = head.input if self._logits_from_head else model.output
        self._head = head
        self._grad_model = tf.keras.Model(model.inputs, [conv, second])
        shape = model.input_shape
        self.input_size = (shape[1], shape[2])

    def _scores(self, second):
        if self._logits_from_head:
            z = tf.matmul(second, self._head.kernel)
            if self._head.use_bias:
                z = z + self._head.bias
            if self._head.activation is tf.keras.activations.softmax:
                # softmax ignores a shift of all logits: centre them, so that the score of class c
                # is its evidence against the others (for two classes, half the log-odds)
                z = z - tf.reduce_mean(z, axis=-1, keepdims=True)
            return z
        return second

    @tf.function(reduce_retracing=True)
    def _batch(self, images, class_index):
        with tf.GradientTape() as tape:
            conv, second = self._grad_model(images, training=False)
            scores = self._scores(second)
            idx = tf.stack([tf.range(tf.shape(scores)[0]), class_index], axis=1)
            y = tf.gather_nd(scores, idx)
        grads = tape.gradient(y, conv)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * conv, axis=-1))  # (N, h, w)
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        cam = tf.math.divide_no_nan(cam, peak)
        size = tf.shape(images)[1:3]
        cam = tf.image.resize(cam[..., None], size, method="bilinear")[..., 0]
        return tf.clip_by_value(cam, 0.0, 1.0)

    def __call__(self, images, class_index=1, batch_size: int = 16) -> np.ndarray:
        """Heat maps (N, H, W) in [0, 1] for ``images`` (N, H, W[, 1]) in the model's input
        range ([0, 255]). ``class_index`` is one index for all or one per image."""
        x = np.asarray(images, dtype=np.float32)
        if x.ndim == 3:
            x = x[..., None]
        n = len(x)
        ci = np.broadcast_to(np.asarray(class_index, dtype=np.int32), (n,))
        out = []
        for i in range(0, n, batch_size):
            out.append(self._batch(tf.constant(x[i:i + batch_size]), tf.constant(ci[i:i + batch_size])).numpy())
        return np.concatenate(out) if out else np.zeros((0,) + tuple(x.shape[1:3]), np.float32)


def gradcam(model, images, class_index=1, layer_name: str | None = None, batch_size: int = 16) -> np.ndarray:
    """One-shot Grad-CAM: heat maps (N, H, W) in [0, 1] at the input size."""
    return GradCAM(model, layer_name)(images, class_index, batch_size)


def resize_heat(heat: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape[::-1] == tuple(size_wh):
        return heat
    return np.asarray(Image.fromarray(heat, mode="F").resize(tuple(size_wh), Image.BILINEAR)).clip(0.0, 1.0)


def overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """RGB uint8 (H, W, 3) at ``gray``'s size: the heat map (resized) in ``cmap`` over the image.
    Cold regions keep the X-ray visible; hot ones are tinted up to ``alpha``."""
    gray = np.asarray(gray)
    if gray.ndim == 3:
        gray = gray[..., 0]
    g = gray.astype(np.float32)
    if gray.dtype != np.uint8:
        lo, hi = float(g.min()), float(g.max())
        g = (g - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(g)
    h = resize_heat(heat, (gray.shape[1], gray.shape[0]))
    color = matplotlib.colormaps[cmap](h)[..., :3] * 255.0
    a = alpha * (0.3 + 0.7 * h)[..., None]
    out = g[..., None] * (1.0 - a) + color * a
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def save_grid(path, tiles: Sequence[np.ndarray], captions: Sequence[str], title: str = "",
              cols: int = 4, tile_inches: float = 2.4) -> Path:
    """Write overlays as one PNG grid with a caption under each (atomic write)."""
    n = len(tiles)
    cols = max(1, min(cols, n)) if n else 1
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * tile_inches, rows * tile_inches + (0.5 if title else 0.1)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, tile, cap in zip(axes.ravel(), tiles, captions):
        ax.imshow(tile, cmap="gray" if np.asarray(tile).ndim == 2 else None)
        ax.set_title(cap, fontsize=7)
    if n == 0:
        axes[0, 0].text(0.5, 0.5, "no images in this group", ha="center", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
