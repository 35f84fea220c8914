"""Two runs' test AUCs compared on the same test patients, in plain Python (``launch`` loads no numpy).

:func:`paired_difference` reads two ``predictions.csv`` files of the same test split (the same images
in the same order: arms that share a prep) and returns AUC(b) - AUC(a) with a **paired patient
bootstrap**: ``n_boot`` times the test patients are drawn with replacement (``random.Random(seed)``,
one ``randrange(P)`` per patient in sorted id order, all images of a drawn patient coming along, a
patient drawn twice counting twice), both AUCs are computed on that same resample and their difference
kept; a resample without both classes (for a finding, multilabel) is dropped and not counted in
``n_valid``. The interval is the percentile interval of the kept differences (linear interpolation
between order statistics, numpy's default quantile rule). The semantics are those of
``distributed.metrics.paired_auc_difference`` (a tie counts one half; multilabel: the mean AUC over the
findings with both classes in the full sample), with a percentile instead of a BCa interval.
"""
from __future__ import annotations

import csv
import random
from pathlib import Path


class NotPaired(ValueError):
    """The two files are not predictions for the same test images."""


def read_predictions(path) -> dict:
    """``{"images", "patients", "columns": {finding: (labels, probabilities)}}`` of a predictions.csv
    (binary: one finding ``""`` from ``label``/``probability``; multilabel: ``label_X``/``probability_X``)."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise NotPaired(f"{path}: no rows")
    head = list(rows[0])
    try:
        if "probability" in head:
            cols = {"": ([int(r["label"]) for r in rows], [float(r["probability"]) for r in rows])}
        else:
            names = [h[len("probability_"):] for h in head if h.startswith("probability_")]
            cols = {n: ([int(r[f"label_{n}"]) for r in rows], [float(r[f"probability_{n}"]) for r in rows])
                    for n in names}
        return {"images": [r["image"] for r in rows], "patients": [r["patient"] for r in rows], "columns": cols}
    except (KeyError, ValueError) as e:
        raise NotPaired(f"{path}: not a predictions.csv of this project ({type(e).__name__}: {e})") from None


class _Ranked:
    """One score vector sorted once: the AUC of any resample weighting in one pass."""

    def __init__(self, y: list[int], p: list[float]):
        order = sorted(range(len(p)), key=p.__getitem__)
        self.groups: list[list[int]] = []  # tie groups of image indices, ascending score
        last = None
        for i in order:
            if last is None or p[i] != last:
                self.groups.append([])
                last = p[i]
            self.groups[-1].append(i)
        self.y = y

    def auc(self, w: list[float]) -> float | None:
        """Weighted Mann-Whitney AUC: each positive-negative pair weighted by the product of their weights,
        a tie counting one half; None without both classes."""
        neg_below = pos_total = neg_total = num = 0.0
        for g in self.groups:
            gp = sum(w[i] for i in g if self.y[i] == 1)
            gn = sum(w[i] for i in g if self.y[i] != 1)
            num += gp * (neg_below + 0.5 * gn)
            neg_below += gn
            pos_total += gp
            neg_total += gn
        if pos_total <= 0 or neg_total <= 0:
            return None
        return num / (pos_total * neg_total)


def _mean_auc(ranked: list[_Ranked], w: list[float]) -> float | None:
    vals = [r.auc(w) for r in ranked]
    return None if any(v is None for v in vals) else sum(vals) / len(vals)


def quantile(sorted_values: list[float], q: float) -> float:
    """numpy's default (linear) quantile of already sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def patient_weights(patients: list[str], rng: random.Random) -> list[float]:
    """One paired resample: per image, how often its patient was drawn (patients in sorted id order)."""
    ids = sorted(set(patients))
    drawn = {}
    for _ in ids:
        k = ids[rng.randrange(len(ids))]
        drawn[k] = drawn.get(k, 0) + 1
    return [float(drawn.get(p, 0)) for p in patients]


def paired_difference(pred_a, pred_b, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """AUC(b) - AUC(a) on the same test patients (module docstring): ``{"auc_diff", "low", "high",
    "n_boot", "n_valid", "seed", "level", "by": "patient", "interval": "percentile", "findings"}``."""
    a, b = read_predictions(pred_a), read_predictions(pred_b)
    if a["images"] != b["images"] or a["patients"] != b["patients"]:
        raise NotPaired(f"{pred_a} and {pred_b} are not predictions for the same test images (another prep?)")
    findings = [k for k in a["columns"] if k in b["columns"] and a["columns"][k][0] == b["columns"][k][0]
                and len(set(a["columns"][k][0])) == 2]
    out = {"auc_diff": None, "low": None, "high": None, "n_boot": int(n_boot), "n_valid": 0, "seed": seed,
           "level": level, "by": "patient", "interval": "percentile", "findings": len(findings)}
    if not findings:
        return out
    ra = [_Ranked(*a["columns"][k]) for k in findings]
    rb = [_Ranked(*b["columns"][k]) for k in findings]
    ones = [1.0] * len(a["images"])
    out["auc_diff"] = _mean_auc(rb, ones) - _mean_auc(ra, ones)
    rng, diffs = random.Random(seed), []
    for _ in range(n_boot):
        w = patient_weights(a["patients"], rng)
        da, db = _mean_auc(ra, w), _mean_auc(rb, w)
        if da is not None and db is not None:
            diffs.append(db - da)
    diffs.sort()
    out["n_valid"] = len(diffs)
    if diffs:
        out["low"], out["high"] = quantile(diffs, (1 - level) / 2), quantile(diffs, 1 - (1 - level) / 2)
    return out


def auc_of(path) -> float | None:
    """The plain AUC (multilabel: mean over the findings with both classes) of a predictions file."""
    cols = read_predictions(path)["columns"]
    ranked = [_Ranked(y, p) for y, p in cols.values() if len(set(y)) == 2]
    return _mean_auc(ranked, [1.0] * len(next(iter(cols.values()))[0])) if ranked else None
