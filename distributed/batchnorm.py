"""BatchNorm moving statistics averaged over ranks at each epoch's end.

They are updated by each rank from its own batches, not by gradients, so Horovod's gradient
averaging leaves them different on every rank; one allreduce makes the model the same everywhere
before validation and checkpoints.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from distributed import hvd


def batchnorm_statistics(model) -> list:
    """Moving mean/variance of the model's BatchNormalization layers: updated by each rank from
    its own batches, not by gradients, so they drift apart across ranks unless averaged."""
    out = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            out += [layer.moving_mean, layer.moving_variance]
    return out


class AverageBatchNormStatistics(tf.keras.callbacks.Callback):
    """At each epoch end, before validation and checkpoints: BatchNorm moving statistics averaged
    over ranks (one allreduce), so every rank holds the same model (VGG has no BatchNorm)."""

    def on_epoch_end(self, epoch, logs=None):
        vs = batchnorm_statistics(self.model)
        if not vs or hvd.size() == 1:
            return
        flat = np.concatenate([v.numpy().ravel() for v in vs])
        flat = hvd.allreduce(flat, op="average", name="bn_statistics")  # Horovod: one model on all ranks
        i = 0
        for v in vs:
            n = int(np.prod(v.shape))
            v.assign(flat[i:i + n].reshape(v.shape))
            i += n
