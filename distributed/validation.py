"""Validation each epoch: the whole val split, sharded over ranks, its predictions gathered.

Every rank predicts its share, the shares are gathered (``distributed.hvd``), and every rank
computes the same val_loss, val_accuracy and val_auc, so that every rank takes the same decisions
(best checkpoint, early stopping).
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from distributed import hvd, roc


def auc_score(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC (:func:`distributed.roc.auc`, ties count one half); NaN without both classes."""
    return roc.auc(np.asarray(y).astype(bool).ravel(), np.asarray(p, dtype=np.float64).ravel())


def classification_metrics(y: np.ndarray, p: np.ndarray, multilabel: bool) -> dict:
    """loss, accuracy, auc as Keras computes the first two (clipped at 1e-7). Binary softmax:
    AUC of the second class ("positive"); multilabel: mean AUC over classes with both labels."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    if len(y) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "auc": float("nan")}
    if multilabel:
        w = y >= 0  # -1: a masked label (data.uncertain: ignore, blank), in neither the loss nor the metrics
        loss = float(np.sum(-(y * np.log(p) + (1 - y) * np.log(1 - p)) * w) / max(1, w.sum()))
        acc = float(np.sum(((p > 0.5) == (y > 0.5)) * w) / max(1, w.sum()))
        aucs = [auc_score(y[w[:, k], k], p[w[:, k], k]) for k in range(y.shape[1])]
        aucs = [a for a in aucs if not math.isnan(a)]
        auc = float(np.mean(aucs)) if aucs else float("nan")
    else:
        p = p / p.sum(axis=1, keepdims=True)
        loss = float(np.mean(-np.sum(y * np.log(p), axis=1)))
        acc = float(np.mean(np.argmax(p, 1) == np.argmax(y, 1)))
        auc = auc_score(y[:, -1], p[:, -1]) if y.shape[1] >= 2 else float("nan")
    return {"loss": loss, "accuracy": acc, "auc": auc}


def predict_shard(model, dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities, targets, indices) of this rank's evaluation dataset (with_index=True)."""
    step = getattr(model, "_cxr_predict_step", None)
    if step is None:  # one trace per model (input batch dimension left free)
        step = tf.function(lambda x: model(x, training=False),
                           input_signature=[tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32)])
        model._cxr_predict_step = step
    ps, ys, ids = [], [], []
    for x, y, i in dataset:
        ps.append(step(x).numpy())
        ys.append(y.numpy())
        ids.append(i.numpy())
    k = model.output_shape[-1]
    cat = lambda a, shape: np.concatenate(a) if a else np.zeros(shape, np.float32)  # noqa: E731
    return cat(ps, (0, k)).astype(np.float32), cat(ys, (0, k)).astype(np.float32), cat(ids, (0,)).astype(np.int64)


def gathered_predictions(model, dataset):
    """Predictions of every rank's share, gathered on every rank and put in split order."""
    p, y, i = predict_shard(model, dataset)
    p, y, i = hvd.allgather(p), hvd.allgather(y), hvd.allgather(i)  # Horovod: whole split everywhere
    order = np.argsort(i, kind="stable")
    return p[order], y[order], i[order]


class Validation(tf.keras.callbacks.Callback):
    """val_loss, val_accuracy, val_auc on the whole validation split, sharded over ranks: each rank
    predicts its share, the predictions are gathered, every rank computes the same numbers."""

    def __init__(self, dataset_fn, multilabel: bool):
        super().__init__()
        self.dataset_fn = dataset_fn
        self.multilabel = multilabel

    def on_epoch_end(self, epoch, logs=None):
        p, y, _ = gathered_predictions(self.model, self.dataset_fn())
        m = classification_metrics(y, p, self.multilabel)
        if logs is not None:
            logs.update({"val_loss": m["loss"], "val_accuracy": m["accuracy"], "val_auc": m["auc"]})
