"""The learning-rate schedule of both training phases: Horovod's warm-up and inverse-time decay.

It is serialized with the optimizer under the registered name ``cxr>WarmupInverseTimeDecay``, which
does not depend on this module's name: keep the package and the class name, so that an optimizer
configuration saved before (when the class lived in ``distributed.callbacks``) still loads.
"""
from __future__ import annotations

import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="cxr")
class WarmupInverseTimeDecay(tf.keras.optimizers.schedules.LearningRateSchedule):
    """lr(step) = base * (1 + (size - 1) * min(1, step / warmup_steps)) / (1 + decay * step).

    Horovod's learning-rate warm-up (Goyal et al.) from the one-rank rate to ``size`` times it
    over ``warmup_steps``, and Keras 1's ``decay`` (inverse time) on top, both functions of
    ``optimizer.iterations``, so a restored optimizer continues the curve exactly. With
    ``scale=False`` the rate is ``base`` for any number of ranks (no warm-up)."""

    def __init__(self, base_lr, size=1, warmup_steps=0, decay=0.0, scale=True, name=None):
        super().__init__()
        self.base_lr, self.size, self.warmup_steps = float(base_lr), int(size), int(warmup_steps)
        self.decay, self.scale, self.name = float(decay), bool(scale), name

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        factor = tf.constant(float(self.size) if self.scale else 1.0)
        if self.scale and self.warmup_steps > 0 and self.size > 1:
            factor = 1.0 + (self.size - 1.0) * tf.minimum(1.0, step / float(self.warmup_steps))
        return self.base_lr * factor / (1.0 + self.decay * step)

    def get_config(self):
        return {"base_lr": self.base_lr, "size": self.size, "warmup_steps": self.warmup_steps,
                "decay": self.decay, "scale": self.scale, "name": self.name}
