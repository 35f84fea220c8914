"""Decision curve of a binary evaluation (Vickers & Elkin 2006): net benefit over threshold probabilities.

At a threshold probability ``pt`` an image is called positive when its probability is ``>= pt`` (as
everywhere in the evaluation), and

    net benefit = TP/n - FP/n * pt / (1 - pt)

against treating every image as positive (``prevalence - (1 - prevalence) * pt / (1 - pt)``) and
treating none (0). ``n`` and the prevalence are the test split's: prep may have capped or balanced
it, so the curve holds at the test set's prevalence, not at a clinical one. The thresholds are read
as the model's probabilities, meaningful only as far as they are calibrated. ``decision_curve.csv``
holds every value (``repr`` floats: they read back exactly); no TensorFlow.
"""
from __future__ import annotations

import csv
import io
from typing import Mapping

import numpy as np

from distributed import rundir

THRESHOLDS = tuple(round(k / 100, 2) for k in range(1, 100))  # 0.01 .. 0.99
COLUMNS = ("threshold", "n", "tp", "fp", "net_benefit", "net_benefit_treat_all", "net_benefit_treat_none")


def curve(y, p, thresholds=THRESHOLDS) -> dict:
    """Columns of the decision curve (lists, one entry per threshold) of labels ``y`` and probabilities ``p``."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    n, prev = len(y), float(y.mean()) if len(y) else 0.0
    out = {k: [] for k in COLUMNS}
    for pt in thresholds:
        pos = p >= pt
        tp, fp = int((pos & (y == 1)).sum()), int((pos & (y == 0)).sum())
        odds = pt / (1.0 - pt)
        for k, v in zip(COLUMNS, (pt, n, tp, fp, tp / n - fp / n * odds, prev - (1.0 - prev) * odds, 0.0)):
            out[k].append(v)
    return out


def curve_csv(c: Mapping) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for i in range(len(c["threshold"])):
        w.writerow([repr(c[k][i]) if isinstance(c[k][i], float) else c[k][i] for k in COLUMNS])
    return buf.getvalue()


def summary(c: Mapping, prevalence: float, file: str = rundir.DECISION_CURVE) -> dict:
    """For ``metrics.json``: where the values are, the prevalence they hold at, and the thresholds at which the
    model's net benefit exceeds both treating all and treating none (count, lowest, highest)."""
    above = [t for t, m, a in zip(c["threshold"], c["net_benefit"], c["net_benefit_treat_all"]) if m > max(a, 0.0)]
    return {"file": file, "probability": "probability", "threshold_range": [min(c["threshold"]), max(c["threshold"])],
            "n": c["n"][0], "prevalence": prevalence,
            "model_above_both": {"thresholds": len(above), "lowest": min(above) if above else None,
                                 "highest": max(above) if above else None}}
