"""Is it learning? A warning when a single-label model's training loss is still at chance level.

The trainer checks once, after the warm-up and :data:`LEARNING_CHECK_EPOCHS` fine-tune epochs
(:class:`LearningCheck`); evaluation and the report say it again from ``history.csv``
(:func:`history_chance_warning`).
"""
from __future__ import annotations

import math

import tensorflow as tf

from data_prep.log import get_logger
from distributed import hvd

CHANCE_MARGIN = 0.05  # a training loss not below (1 - margin) x ln K is "at chance"


def chance_warning(loss: float, num_classes: int, finetune_epochs: int) -> str | None:
    """The not-learning warning when a single-label model's training loss after the warm-up and
    ``finetune_epochs`` fine-tune epochs is not below (1 - CHANCE_MARGIN) x chance (ln K), else None."""
    if num_classes < 2 or loss is None or not math.isfinite(loss):
        return None
    chance = math.log(num_classes)
    if loss < (1 - CHANCE_MARGIN) * chance:
        return None
    return (f"the model is not learning: training loss {loss:.3f} after the warm-up and {finetune_epochs} fine-tune "
            f"epoch(s) is still at chance level (ln {num_classes} = {chance:.3f}; a model that learns is below "
            f"{(1 - CHANCE_MARGIN) * chance:.3f} by now). Likely causes: "
            "random weights without normalisation (model.weights: none on a backbone without batch normalisation, "
            "such as VGG16: use its ImageNet weights, or the tiny backbone), a learning rate too small or too large "
            "(train.warmup.lr, train.finetune.lr), or data without signal (labels, prep output)")


LEARNING_CHECK_EPOCHS = 2  # fine-tune epochs after which the check looks at the training loss


def history_chance_warning(history: list[dict], num_classes: int) -> str | None:
    """:func:`chance_warning` for a run's ``history.csv`` rows (evaluation and report use it)."""
    ft = [r for r in history if r.get("phase") == "finetune"]
    if len(ft) < LEARNING_CHECK_EPOCHS:
        return None
    try:
        loss = float(ft[LEARNING_CHECK_EPOCHS - 1].get("loss"))
    except (TypeError, ValueError):
        return None
    return chance_warning(loss, num_classes, LEARNING_CHECK_EPOCHS)


class LearningCheck(tf.keras.callbacks.Callback):
    """Once, after the warm-up and LEARNING_CHECK_EPOCHS fine-tune epochs: a WARNING on rank 0 when
    the (rank-averaged) training loss is still at chance (:func:`chance_warning`)."""

    def __init__(self, phase: str, num_classes: int, multilabel: bool):
        super().__init__()
        self.active = phase == "finetune" and not multilabel
        self.num_classes = num_classes

    def on_epoch_end(self, epoch, logs=None):
        if not self.active or epoch + 1 != LEARNING_CHECK_EPOCHS:
            return
        msg = chance_warning((logs or {}).get("loss"), self.num_classes, LEARNING_CHECK_EPOCHS)
        if msg and hvd.is_root():  # the loss is averaged over ranks: rank 0 says it once
            get_logger().warning(msg)
