"""The project's one ROC AUC: scores grouped into tie groups, with sample weights.

Training's validation (:func:`distributed.validation.auc_score`: NaN without both classes) and
evaluation (:func:`distributed.metrics.auc`: None without both classes, and every bootstrap
resample) compute their AUC here. Ties count one half, as in scikit-learn's ``roc_auc_score``,
which it equals (with ``sample_weight``). numpy only: training imports it without scikit-learn.
"""
from __future__ import annotations

import numpy as np


class TieGroups:
    """Scores grouped into descending tie groups, so that a weighted ROC/AUC per bootstrap
    resample is a few bincounts and cumulative sums (no sort per resample)."""

    def __init__(self, y, p):
        self.y = np.asarray(y).astype(np.float64)
        p = np.asarray(p, dtype=np.float64)
        _, self.inv = np.unique(-p, return_inverse=True)  # group 0 = highest score
        self.n_groups = int(self.inv.max()) + 1 if p.size else 0

    def group_sums(self, w):
        wp = np.bincount(self.inv, weights=w * self.y, minlength=self.n_groups)
        wn = np.bincount(self.inv, weights=w * (1.0 - self.y), minlength=self.n_groups)
        return wp, wn

    def auc(self, w) -> float:
        wp, wn = self.group_sums(w)
        tp, tn = wp.sum(), wn.sum()
        if tp <= 0 or tn <= 0:
            return float("nan")
        below = tn - np.cumsum(wn)  # negative weight strictly below each group's score
        return float((wp * (below + 0.5 * wn)).sum() / (tp * tn))

    def average_precision(self, w) -> float:
        """scikit-learn's average precision (step-wise, no interpolation) with sample weights ``w``."""
        wp, wn = self.group_sums(w)
        tp = wp.sum()
        if tp <= 0:
            return float("nan")
        ctp, cfp = np.cumsum(wp), np.cumsum(wn)
        prec = np.divide(ctp, ctp + cfp, out=np.zeros_like(ctp), where=(ctp + cfp) > 0)
        return float((wp * prec).sum() / tp)

    def batch_sums(self, W):
        """:meth:`group_sums` of every row of the weight matrix ``W`` (resamples x images) at once."""
        b = W.shape[0]
        idx = (np.arange(b)[:, None] * self.n_groups + self.inv[None, :]).ravel()
        size = b * self.n_groups
        wp = np.bincount(idx, weights=(W * self.y).ravel(), minlength=size).reshape(b, self.n_groups)
        wn = np.bincount(idx, weights=(W * (1.0 - self.y)).ravel(), minlength=size).reshape(b, self.n_groups)
        return wp, wn

    def aucs(self, W) -> np.ndarray:
        """:meth:`auc` of every row of ``W``: NaN where a row lacks a class."""
        wp, wn = self.batch_sums(W)
        tp, tn = wp.sum(axis=1), wn.sum(axis=1)
        below = tn[:, None] - np.cumsum(wn, axis=1)
        ok = (tp > 0) & (tn > 0)
        out = np.full(len(W), np.nan)
        out[ok] = (wp[ok] * (below[ok] + 0.5 * wn[ok])).sum(axis=1) / (tp[ok] * tn[ok])
        return out

    def roc(self, w):
        wp, wn = self.group_sums(w)
        tp, tn = wp.sum(), wn.sum()
        if tp <= 0 or tn <= 0:
            return None
        fpr = np.concatenate([[0.0], np.cumsum(wn) / tn])
        tpr = np.concatenate([[0.0], np.cumsum(wp) / tp])
        return fpr, tpr


def auc(y, p, w=None) -> float:
    """ROC AUC of scores ``p`` for binary labels ``y`` with sample weights ``w`` (default: all 1; ties
    count one half); NaN without both classes."""
    y = np.asarray(y)
    w = np.ones(len(y)) if w is None else np.asarray(w, dtype=np.float64)
    return TieGroups(y, p).auc(w)
