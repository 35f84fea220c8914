"""Evaluation metrics: pure numpy and scikit-learn, no TensorFlow.

Everything here works on plain arrays so that a test can recompute any number of
``metrics.json`` from ``predictions.csv`` with scikit-learn alone.

* :func:`binary_metrics` -- the article's table (precision, recall, F1, support per class,
  macro/weighted averages, accuracy) at a threshold, ROC AUC with a 95% BCa bootstrap interval
  resampled **by patient**, Youden's threshold, the confusion matrix, and AUC per subgroup
  (view, sex) where both classes are present.
* :func:`multilabel_metrics` -- per-finding AUC with patient-bootstrap intervals and the mean
  AUC, in the form of CheXNet's table, plus the per-finding table at a threshold.
* :func:`format_class_table`, :func:`format_side_by_side`, :func:`format_auc_table` -- text
  tables for the console and the report.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    classification_report,
    confusion_matrix,
    precision_recall_curve,
    roc_curve,
)

from distributed import roc
from distributed.roc import TieGroups as _TieGroups

# AUROC of CheXNet (Rajpurkar et al. 2017, table 1) on its own patient split of ChestX-ray14:
# a reference point only, never a like-for-like comparison.
CHEXNET_AUC = {
    "atelectasis": 0.8094, "cardiomegaly": 0.9248, "effusion": 0.8638, "infiltration": 0.7345,
    "mass": 0.8676, "nodule": 0.7802, "pneumonia": 0.7680, "pneumothorax": 0.8887,
    "consolidation": 0.7901, "edema": 0.8878, "emphysema": 0.9371, "fibrosis": 0.8047,
    "pleural thickening": 0.8062, "hernia": 0.9164,
}

FPR_GRID = np.linspace(0.0, 1.0, 101)


def _norm_name(name: str) -> str:
    return str(name).replace("_", " ").strip().lower()


def _clean(x):
    """Floats for JSON: NaN/inf become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def as_written(x) -> np.ndarray:
    """Probabilities as the CSVs hold them: float32 printed with ``%.9g`` (the float32 round trip) and read
    back as float64. Every number of metrics.json is computed from these values, so that a reader of
    ``predictions.csv``/``val_predictions.csv`` recomputes each one exactly, thresholds included (a
    threshold is halfway between two of these values, :func:`cut_below`)."""
    a = np.asarray(x, dtype=np.float32)
    return np.array([float(f"{v:.9g}") for v in a.ravel().tolist()], dtype=np.float64).reshape(a.shape)


def both_classes(y) -> bool:
    y = np.asarray(y)
    return y.size > 0 and (y == 1).any() and (y == 0).any()


def auc(y, p) -> float | None:
    """ROC AUC (:func:`distributed.roc.auc`), or None when only one class is present."""
    y = np.asarray(y).astype(int)
    if not both_classes(y):
        return None
    return roc.auc(y, np.asarray(p, dtype=np.float64))


# --------------------------------------------------------------------------- bootstrap by patient

def weighted_auc(y, p, w=None) -> float:
    """ROC AUC with sample weights (ties count one half); equals roc_auc_score(sample_weight=w); NaN
    without both classes (:func:`distributed.roc.auc`)."""
    return roc.auc(y, p, w)


def patient_resample_batches(groups, n_boot: int, seed: int = 0, chunk: int = 128):
    """Yield weight matrices (up to ``chunk`` resamples x images, fewer rows for large test sets): how often
    each image is drawn when PATIENTS are drawn with replacement (all images of a drawn patient come along;
    a patient drawn twice counts twice). The draws are those of :func:`patient_resample_weights`, in the
    same order, whatever the chunk."""
    _, g_inv = np.unique(np.asarray(groups), return_inverse=True)
    n_pat = int(g_inv.max()) + 1 if g_inv.size else 0
    chunk = max(1, min(chunk, 2_000_000 // max(1, g_inv.size)))
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draws = rng.integers(0, n_pat, (b, n_pat))
        counts = np.bincount((np.arange(b)[:, None] * n_pat + draws).ravel(), minlength=b * n_pat)
        yield counts.reshape(b, n_pat)[:, g_inv].astype(np.float64)


def patient_resample_weights(groups, n_boot: int, seed: int = 0):
    """Yield, per resample, how often each image is drawn when PATIENTS are drawn with
    replacement (all images of a drawn patient come along; a patient drawn twice counts twice)."""
    for W in patient_resample_batches(groups, n_boot, seed):
        yield from W


def jackknife_blocks(groups, max_blocks: int = 100) -> np.ndarray:
    """Block of each image for the grouped jackknife of :func:`bca_interval`: every patient its own block
    up to ``max_blocks`` patients; beyond, patient k (in sorted id order) goes to block k mod ``max_blocks``,
    so that a block holds whole patients and the acceleration costs ``max_blocks`` evaluations whatever
    the number of patients (the delete-a-group jackknife, Efron & Tibshirani 1993, sec. 11.5)."""
    _, g_inv = np.unique(np.asarray(groups), return_inverse=True)
    return g_inv % max_blocks if g_inv.size else g_inv


def jackknife_weights(blocks) -> np.ndarray:
    """One row per jackknife block: weight 0 for that block's images, 1 for the others."""
    blocks = np.asarray(blocks)
    k = int(blocks.max()) + 1 if blocks.size else 0
    return (blocks[None, :] != np.arange(k)[:, None]).astype(np.float64)


def jackknife_values(fn, blocks) -> np.ndarray:
    """``fn(w)`` with each jackknife block left out in turn (weight 0), the finite values only."""
    blocks = np.asarray(blocks)
    k = int(blocks.max()) + 1 if blocks.size else 0
    v = np.array([fn((blocks != b).astype(np.float64)) for b in range(k)], dtype=np.float64)
    return v[np.isfinite(v)]


def bca_interval(draws, point: float, jack, level: float = 0.95) -> tuple[float | None, float | None]:
    """Bias-corrected and accelerated bootstrap interval (Efron 1987, JASA 82:171-185; Efron & Tibshirani
    1993, ch. 14) of the statistic whose full-sample value is ``point``, from its finite bootstrap ``draws``
    and its leave-one-block-out ``jack`` values.

    z0 = Phi^-1(share of draws below ``point``, ties counted one half), the bias correction; a = sum d^3 /
    (6 (sum d^2)^1.5) with d = mean(jack) - jack, the acceleration; the interval is the draws' quantiles
    at Phi(z0 + (z0 + z) / (1 - a (z0 + z))) for z = Phi^-1((1 -/+ level) / 2). With all draws equal (e.g.
    sensitivity 64/64) it is that value, width 0."""
    from scipy.stats import norm

    d = np.asarray(draws, dtype=np.float64)  # None -> NaN
    d = d[np.isfinite(d)]
    if not d.size or point is None or not math.isfinite(point):
        return None, None
    b = d.size
    share = ((d < point).sum() + 0.5 * (d == point).sum()) / b
    z0 = float(norm.ppf(min(max(share, 0.5 / b), 1.0 - 0.5 / b)))
    j = np.asarray(jack, dtype=np.float64)
    dev = j.mean() - j if j.size > 1 else np.zeros(1)
    ss = float((dev ** 2).sum())
    a = float((dev ** 3).sum() / (6.0 * ss ** 1.5)) if ss > 0 else 0.0
    out = []
    for z in (norm.ppf((1.0 - level) / 2.0), norm.ppf((1.0 + level) / 2.0)):
        q = float(norm.cdf(z0 + (z0 + z) / (1.0 - a * (z0 + z))))
        out.append(float(np.quantile(d, q)))
    return out[0], out[1]


def interval(draws, point: float, jack, level: float = 0.95) -> dict:
    """The bootstrap interval of metrics.json: ``low``/``high`` BCa (:func:`bca_interval`, ``method``
    "bca"), the percentile interval kept beside it (``percentile``), ``n_valid`` and ``zero_width``."""
    lo, hi = bca_interval(draws, point, jack, level)
    plo, phi, n = percentile_interval(draws, level)
    return {"low": lo, "high": hi, "n_valid": n, "zero_width": zero_width(lo, hi), "method": "bca",
            "percentile": {"low": plo, "high": phi}}


def bootstrap_auc(y, p, groups, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                  roc_band: bool = False) -> dict:
    """BCa interval of the ROC AUC over ``n_boot`` resamples of patients (:func:`interval`; the
    acceleration from a jackknife over patients, :func:`jackknife_blocks`).

    Resamples with a single class are skipped and counted (``n_valid``). With ``roc_band`` also returns
    the pointwise percentile ``level`` band of the TPR on :data:`FPR_GRID`.
    """
    y = np.asarray(y).astype(int)
    out = {"n_boot": int(n_boot), "n_valid": 0, "level": level, "low": None, "high": None,
           "std": None, "by": "patient"}
    if n_boot <= 0 or not both_classes(y):
        return out
    tg = _TieGroups(y, p)
    aucs, tprs = [], []
    for W in patient_resample_batches(groups, n_boot, seed):
        a = tg.aucs(W)
        aucs.append(a[np.isfinite(a)])
        if roc_band:
            tprs += [np.interp(FPR_GRID, *tg.roc(w)) for w, ok in zip(W, np.isfinite(a)) if ok]
    aucs = np.concatenate(aucs)
    if not aucs.size:
        return out
    jack = tg.aucs(jackknife_weights(jackknife_blocks(groups)))
    out.update(interval(aucs, tg.auc(np.ones(len(y))), jack[np.isfinite(jack)], level))
    out["std"] = float(aucs.std(ddof=1)) if aucs.size > 1 else 0.0
    if roc_band:
        q = (1.0 - level) / 2.0 * 100.0
        t = np.asarray(tprs)
        out["roc_band"] = {"fpr": FPR_GRID.tolist(), "tpr_low": np.percentile(t, q, axis=0).tolist(),
                           "tpr_high": np.percentile(t, 100.0 - q, axis=0).tolist()}
    return out


def percentile_interval(values, level: float = 0.95) -> tuple[float | None, float | None, int]:
    """(low, high, n) percentile interval of the finite ``values`` (None, None, 0 without any)."""
    v = np.asarray(values, dtype=np.float64)  # None -> NaN
    v = v[np.isfinite(v)]
    if not v.size:
        return None, None, 0
    q = (1.0 - level) / 2.0 * 100.0
    return float(np.percentile(v, q)), float(np.percentile(v, 100.0 - q)), int(v.size)


def bootstrap_stats(stats: Mapping, groups, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """BCa intervals (:func:`interval`) of several statistics over the SAME patient resamples.

    ``stats`` maps a name to ``fn(w) -> float`` of per-image resample weights ``w`` (how often each
    image is drawn, :func:`patient_resample_weights`); ``fn`` of all ones is the point estimate, and
    ``fn`` with a block of patients weighted 0 a jackknife value. NaN results (a resample without one
    class) are left out of that statistic. Returns ``{name: {"low", "high", "n_valid", "zero_width",
    "method", "percentile"}}``."""
    groups = np.asarray(groups)
    draws = {k: [] for k in stats}
    if n_boot > 0 and len(groups):
        for w in patient_resample_weights(groups, n_boot, seed):
            for k, fn in stats.items():
                draws[k].append(fn(w))
    out = {}
    blocks = jackknife_blocks(groups)
    for k, v in draws.items():
        if not v:
            out[k] = interval(v, None, [], level)
            continue
        out[k] = interval(v, stats[k](np.ones(len(groups))), jackknife_values(stats[k], blocks), level)
    return out


def zero_width(low, high) -> bool:
    """A bootstrap interval of width 0 (e.g. sensitivity 64/64 -> [1, 1]): every resample gave the same
    value, which says nothing about the uncertainty; flagged in metrics.json and the report."""
    return low is not None and high is not None and low == high


def short_resamples(tree, n_boot: int, share: float = 0.95, path: str = "") -> list[tuple[str, int]]:
    """``(path, n_valid)`` of every bootstrap interval in ``tree`` (a metrics dict: any mapping with
    ``n_valid``) that rests on fewer than ``share`` of the ``n_boot`` resamples drawn (resamples lacking a
    class are dropped), in document order; curves are skipped."""
    out: list[tuple[str, int]] = []
    if not isinstance(tree, Mapping) or n_boot <= 0:
        return out
    nv = tree.get("n_valid")
    if isinstance(nv, (int, np.integer)) and not isinstance(nv, bool) and nv < share * n_boot:
        out.append((path or "(top)", int(nv)))
    for k, v in tree.items():
        if k not in ("curves", "roc_band", "reliability") and isinstance(v, Mapping):
            out += short_resamples(v, n_boot, share, f"{path}.{k}" if path else str(k))
    return out


def with_ci(value, ci: Mapping | None) -> dict:
    """``{value, low, high}`` (the form of every interval-carrying number of metrics.json)."""
    ci = ci or {}
    return {"value": _clean(value), "low": ci.get("low"), "high": ci.get("high")}


def clopper_pearson(k: float, n: float, level: float = 0.95) -> tuple[float | None, float | None]:
    """Exact (Clopper & Pearson 1934, Biometrika 26:404-413) interval of a proportion k/n from beta
    quantiles: low = Beta(a/2; k, n - k + 1), high = Beta(1 - a/2; k + 1, n - k), 0 and 1 at the ends.
    ``k`` and ``n`` may be effective (non-integer) counts (:func:`proportion_interval`)."""
    from scipy.stats import beta

    if n <= 0:
        return None, None
    a = (1.0 - level) / 2.0
    lo = 0.0 if k <= 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k >= n else float(beta.ppf(1.0 - a, k + 1, n - k))
    return lo, hi


def proportion_interval(k: int, n: int, patients: int, level: float = 0.95) -> dict:
    """Clopper-Pearson interval of k/n images with patients as clusters.

    Design effect (Kish 1965, *Survey Sampling*, sec. 8.2): deff = 1 + (m - 1) * ICC with m = n / patients
    images per patient. The ICC of a correct/incorrect decision within one patient is not estimated here;
    we take ICC = 1, the conservative end, so deff = m and the effective sample size is the number of
    patients: n_eff = n / deff = patients, k_eff = k / deff (the same proportion). The exact interval is
    then computed on (k_eff, n_eff), as Korn & Graubard (1998, Survey Methodology 24:193-201) do for
    clustered samples. With one image per patient deff = 1 and this is plain Clopper-Pearson
    (64/64 -> [0.9440, 1]). Returns ``{low, high, method, k, n, patients, design_effect, n_effective}``."""
    deff = max(1.0, n / patients) if patients > 0 else 1.0
    lo, hi = clopper_pearson(k / deff, n / deff, level)
    return {"low": lo, "high": hi, "method": "clopper-pearson", "level": level, "k": int(k), "n": int(n),
            "patients": int(patients), "design_effect": float(deff), "n_effective": float(n / deff)}


def paired_auc_difference(y, p_a, p_b, groups, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """AUC(b) - AUC(a) with a paired patient bootstrap (both AUCs on the same resampled patients; BCa,
    :func:`interval`) and DeLong's test clustered by patient (``delong``, :func:`delong_test`)."""
    y = np.asarray(y).astype(int)
    out = {"auc_diff": None, "low": None, "high": None, "by": "patient", "n_boot": int(n_boot), "n_valid": 0}
    if not both_classes(y):
        return out
    ta, tb = _TieGroups(y, p_a), _TieGroups(y, p_b)
    ci = bootstrap_stats({"d": lambda w: tb.auc(w) - ta.auc(w)}, groups, n_boot, seed, level)["d"]
    out.update(auc_diff=auc(y, p_b) - auc(y, p_a), **ci)
    out["delong"] = delong_test(y, p_a, p_b, groups, level)
    return out


def paired_mean_auc_difference(Y, P_a, P_b, groups, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Multi-label: mean AUC(b) - mean AUC(a) over a FIXED set of findings, those with both classes in the
    full sample, paired patient bootstrap; a resample where any of them lacks a class is dropped (it counts
    against ``n_valid``), so that every resample averages the same findings as the point estimate. DeLong's
    test of the same difference, patients as clusters, in ``delong`` (:func:`delong_mean_difference`)."""
    Y = np.asarray(Y).astype(int)
    ks = [k for k in range(Y.shape[1]) if both_classes(Y[:, k])]
    out = {"auc_diff": None, "low": None, "high": None, "by": "patient", "n_boot": int(n_boot), "n_valid": 0,
           "of": "mean AUC", "findings": len(ks)}
    if not ks:
        return out
    tgs = [(_TieGroups(Y[:, k], np.asarray(P_a)[:, k]), _TieGroups(Y[:, k], np.asarray(P_b)[:, k])) for k in ks]

    def diff(w):
        return float(np.mean([b.auc(w) - a.auc(w) for a, b in tgs]))  # NaN when any finding lacks a class
    ci = bootstrap_stats({"d": diff}, groups, n_boot, seed, level)["d"]
    point = float(np.mean([auc(Y[:, k], np.asarray(P_b)[:, k]) - auc(Y[:, k], np.asarray(P_a)[:, k]) for k in ks]))
    out.update(auc_diff=point, **ci)
    out["delong"] = delong_mean_difference(Y, P_a, P_b, groups, level)
    return out


# --------------------------------------------------------------------------- DeLong

def delong_components(y, p) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components (DeLong, DeLong & Clarke-Pearson 1988, Biometrics 44:837-845):
    V10 of each positive = the share of negatives it scores above, V01 of each negative = the share of
    positives scoring above it, a tie counting one half. The AUC is the mean of either."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=np.float64)
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    v10 = (np.searchsorted(neg, p[y == 1], "left") + np.searchsorted(neg, p[y == 1], "right")) / (2.0 * neg.size)
    v01 = (2 * pos.size - np.searchsorted(pos, p[y == 0], "left") - np.searchsorted(pos, p[y == 0], "right")) \
        / (2.0 * pos.size)
    return v10, v01


def patient_influence(y, p, groups) -> tuple[float, np.ndarray]:
    """(AUC, per-patient influence psi) for the clustered DeLong variance (Obuchowski 1997, Biometrics
    53:567-578): psi_i = (V10_i - m_i A) / M + (V01_i - n_i A) / N, with V10_i and V01_i the sums of the
    structural components over patient i's m_i positive and n_i negative images (patients in sorted id
    order). var(A) = I / (I - 1) sum psi_i^2, which is Obuchowski's S10 / M + S01 / N + 2 S11 / (M N); any
    linear combination of AUCs on the same patients (two scores, several findings) takes the same sum over
    its combination of psi."""
    y = np.asarray(y).astype(int)
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    k = int(g.max()) + 1 if g.size else 0
    v10, v01 = delong_components(y, p)
    a = float(v10.mean())
    psi = np.bincount(g[y == 1], weights=v10 - a, minlength=k) / v10.size + \
        np.bincount(g[y == 0], weights=v01 - a, minlength=k) / v01.size
    return a, psi


def _delong_cov(y, ps, groups=None) -> tuple[np.ndarray, np.ndarray, int]:
    """(AUCs, their covariance matrix, cases) of the score columns ``ps`` on the same cases. Without
    ``groups``: DeLong et al. (1988), every image an independent case, S10 / m + S01 / n. With patient
    ``groups``: the patient is the independent unit, I / (I - 1) Psi Psi' (:func:`patient_influence`)."""
    y = np.asarray(y).astype(int)
    if groups is None:
        comps = [delong_components(y, p) for p in ps]
        c10, c01 = np.atleast_2d(np.cov([c[0] for c in comps])), np.atleast_2d(np.cov([c[1] for c in comps]))
        return np.array([c[0].mean() for c in comps]), c10 / (y == 1).sum() + c01 / (y == 0).sum(), int(len(y))
    infl = [patient_influence(y, p, groups) for p in ps]
    aucs, psi = np.array([a for a, _ in infl]), np.array([q for _, q in infl])
    k = psi.shape[1]
    if k < 2:
        return aucs, np.full((len(ps), len(ps)), np.nan), k
    return aucs, k / (k - 1.0) * psi @ psi.T, k


def delong_auc(y, p, groups=None, level: float = 0.95) -> dict:
    """AUC with DeLong's variance and the Wald interval AUC -/+ z se (clustered by patient with
    ``groups``, :func:`_delong_cov`): ``{auc, var, se, low, high, method}``."""
    from scipy.stats import norm

    a, cov, k = _delong_cov(y, [p], groups)
    se = math.sqrt(max(cov[0, 0], 0.0)) if math.isfinite(cov[0, 0]) else None  # None with one patient
    z = float(norm.ppf((1.0 + level) / 2.0))
    low, high = (None, None) if se is None else (float(a[0] - z * se), float(a[0] + z * se))
    return {"auc": float(a[0]), "var": _clean(cov[0, 0]), "se": se, "low": low, "high": high, "level": level,
            "method": _delong_name(groups), "cases": k}


def _delong_name(groups) -> str:
    return "DeLong 1988, images independent" if groups is None else \
        "DeLong, clustered by patient (Obuchowski 1997)"


def delong_test(y, p_a, p_b, groups=None, level: float = 0.95) -> dict:
    """Paired test of two correlated AUCs on the same cases (DeLong et al. 1988): difference AUC(b) - AUC(a),
    its standard error from the covariance of the structural components, z, two-sided p and the Wald
    interval. Without ``groups`` every image is an independent case (pROC's roc.test); with patient
    ``groups`` the patients are (Obuchowski 1997), the right unit when a patient has several images."""
    y = np.asarray(y).astype(int)
    out = {"auc_diff": None, "se": None, "z": None, "p": None, "low": None, "high": None, "level": level,
           "method": _delong_name(groups)}
    if not both_classes(y):
        return out
    a, cov, k = _delong_cov(y, [p_a, p_b], groups)
    return _wald(out, float(a[1] - a[0]), cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1], k)


def delong_mean_difference(Y, P_a, P_b, groups, level: float = 0.95) -> dict:
    """Multi-label: mean over the findings with both classes of AUC(b) - AUC(a), tested like
    :func:`delong_test` with patients as clusters; the influence of the mean difference is the mean of the
    findings' influence differences (:func:`patient_influence`), so the findings' correlation within a
    patient is in the variance."""
    Y, P_a, P_b = np.asarray(Y).astype(int), np.asarray(P_a), np.asarray(P_b)
    ks = [k for k in range(Y.shape[1]) if both_classes(Y[:, k])]
    out = {"auc_diff": None, "se": None, "z": None, "p": None, "low": None, "high": None, "level": level,
           "method": _delong_name(groups), "findings": len(ks)}
    if not ks:
        return out
    parts = [(patient_influence(Y[:, k], P_a[:, k], groups), patient_influence(Y[:, k], P_b[:, k], groups))
             for k in ks]
    d = float(np.mean([b[0] - a[0] for a, b in parts]))
    psi = np.mean([b[1] - a[1] for a, b in parts], axis=0)
    n = psi.size
    return _wald(out, d, n / (n - 1.0) * float(psi @ psi) if n > 1 else float("nan"), n)


def _wald(out: dict, d: float, var: float, cases: int) -> dict:
    """``out`` with the difference ``d``, its SE from ``var``, z, two-sided p and the Wald interval at
    ``out["level"]``; no z or p when the variance is undefined (one patient)."""
    from scipy.stats import norm

    out.update(auc_diff=d, cases=cases)
    if not math.isfinite(var):
        return out
    se = math.sqrt(max(var, 0.0))
    z = d / se if se > 0 else 0.0
    h = float(norm.ppf((1.0 + out["level"]) / 2.0)) * se
    out.update(se=se, z=z, p=float(2.0 * norm.sf(abs(z))), low=d - h, high=d + h)
    return out


# --------------------------------------------------------------------------- operating point

OPERATING_RULES = ("youden", "sensitivity", "specificity", "fixed")


def parse_operating_point(rule: str) -> tuple[str, float | None]:
    """``youden`` | ``sensitivity:S`` | ``specificity:S`` | ``fixed:T`` -> (kind, value); ValueError
    (one sentence) otherwise."""
    kind, _, val = str(rule).strip().partition(":")
    if kind not in OPERATING_RULES or (kind == "youden") != (val == ""):
        raise ValueError(f"{rule!r} is not youden, sensitivity:S, specificity:S or fixed:T")
    if kind == "youden":
        return kind, None
    try:
        v = float(val)
    except ValueError:
        raise ValueError(f"{rule!r}: {val!r} is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{rule!r}: {v} is outside [0, 1]")
    return kind, v


def choose_threshold(rule: str, y, p) -> float | None:
    """The threshold ``rule`` picks on (y, p) (the validation split); an image is positive when
    p >= threshold. youden: maximal sensitivity + specificity - 1; sensitivity:S the highest
    cut with sensitivity >= S; specificity:S the lowest with specificity >= S; fixed:T is T. The cut
    lies between two observed scores (:func:`cut_below`), never on one. None when the rule needs both
    classes and one is missing."""
    kind, v = parse_operating_point(rule)
    if kind == "fixed":
        return float(v)
    y = np.asarray(y).astype(int)
    if not both_classes(y):
        return None
    if kind == "youden":
        return youden(y, p)["threshold"]
    p = np.asarray(p, dtype=np.float64)
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)  # thr[0] = +inf: nothing positive
    if kind == "sensitivity":
        return cut_below(p, thr[int(np.flatnonzero(tpr >= v - 1e-12)[0])])
    return cut_below(p, thr[int(np.flatnonzero(1.0 - fpr >= v - 1e-12)[-1])])


NOTHING_POSITIVE = float(np.nextafter(1.0, 2.0))  # the threshold above every probability, 1.0 included


def cut_below(p, score: float) -> float:
    """The threshold that makes exactly the scores >= ``score`` positive (``p >= threshold``) without sitting
    on an observed score: halfway between ``score`` and the next lower distinct score of ``p`` (halfway to 0
    below the lowest). ``score`` +inf (nothing positive) gives :data:`NOTHING_POSITIVE` (or the float
    after the highest score above 1), so a saturated p = 1.0 stays negative."""
    p = np.asarray(p, dtype=np.float64)
    if not math.isfinite(score):
        return float(np.nextafter(max(1.0, float(p.max())), np.inf)) if p.size else NOTHING_POSITIVE
    lower = p[p < score]
    if lower.size:
        return float((score + lower.max()) / 2.0)
    return float(score / 2.0) if score > 0 else float(score)


def _rates(y, pred, w):
    """Weighted sensitivity, specificity, PPV, NPV, accuracy (NaN where undefined)."""
    yf, pf = y.astype(np.float64), pred.astype(np.float64)
    tp, fn = (w * yf * pf).sum(), (w * yf * (1 - pf)).sum()
    fp, tn = (w * (1 - yf) * pf).sum(), (w * (1 - yf) * (1 - pf)).sum()

    def div(a, b):
        return a / b if b > 0 else float("nan")
    return {"sensitivity": div(tp, tp + fn), "specificity": div(tn, tn + fp), "ppv": div(tp, tp + fp),
            "npv": div(tn, tn + fn), "accuracy": div(tp + tn, tp + tn + fp + fn)}


def confusion_counts(y, pred) -> dict:
    """The 2x2 table in images: ``{tp, fp, fn, tn}`` (``pred`` 1 = predicted positive)."""
    y, pred = np.asarray(y).astype(int), np.asarray(pred).astype(int)
    return {"tp": int(((y == 1) & (pred == 1)).sum()), "fp": int(((y == 0) & (pred == 1)).sum()),
            "fn": int(((y == 1) & (pred == 0)).sum()), "tn": int(((y == 0) & (pred == 0)).sum())}


def predictive_values(sens, spec, prevalence: float) -> dict:
    """PPV and NPV at a prevalence P from sensitivity and specificity (Bayes)."""
    P = prevalence
    if sens is None or spec is None or not (math.isfinite(sens) and math.isfinite(spec)):
        return {"ppv": float("nan"), "npv": float("nan")}
    a, b = sens * P, (1 - spec) * (1 - P)
    c, d = spec * (1 - P), (1 - sens) * P
    return {"ppv": a / (a + b) if a + b > 0 else float("nan"), "npv": c / (c + d) if c + d > 0 else float("nan")}


def operating_point_metrics(y, p, threshold: float, groups, *, n_boot: int = 1000, seed: int = 0,
                            prevalence: float = 0.0) -> dict:
    """The 2x2 table (``tp``, ``fp``, ``fn``, ``tn``, images) and sensitivity, specificity, PPV, NPV and
    accuracy at a FIXED threshold (chosen elsewhere, p >= threshold is positive), each
    ``{value, low, high}`` with the Clopper-Pearson interval widened for patients as clusters
    (:func:`proportion_interval`), the percentile interval of one set of patient resamples kept beside it
    (``bootstrap``: ``low``, ``high``, ``n_valid``, ``zero_width``); with ``prevalence`` P > 0 also PPV/NPV
    recomputed for P (``at_prevalence``)."""
    y = np.asarray(y).astype(int)
    pred = (np.asarray(p, dtype=np.float64) >= threshold).astype(int)
    ones = np.ones(len(y))
    point = _rates(y, pred, ones)
    names = list(point)
    fns = {k: (lambda w, k=k: _rates(y, pred, w)[k]) for k in names}
    if prevalence:
        def pv(w, k):
            r = _rates(y, pred, w)
            return predictive_values(r["sensitivity"], r["specificity"], prevalence)[k]
        fns.update({f"{k}@P": (lambda w, k=k: pv(w, k)) for k in ("ppv", "npv")})
    cis = bootstrap_stats(fns, groups, n_boot, seed)
    counts = confusion_counts(y, pred)
    g = np.asarray(groups)
    pos, neg, pp = y == 1, y == 0, pred == 1
    parts = {"sensitivity": (pos & pp, pos), "specificity": (neg & ~pp, neg), "ppv": (pos & pp, pp),
             "npv": (neg & ~pp, ~pp), "accuracy": (y == pred, np.ones(len(y), bool))}
    out = dict(counts)
    for k in names:
        hit, den = parts[k]
        exact = proportion_interval(int(hit.sum()), int(den.sum()), len(np.unique(g[den])))
        out[k] = {**with_ci(point[k], exact if den.any() else None),
                  **{x: exact[x] for x in ("method", "k", "n", "patients", "design_effect", "n_effective")},
                  "bootstrap": {x: cis[k][x] for x in ("low", "high", "n_valid", "zero_width", "method", "percentile")}}
    if prevalence:
        at = predictive_values(point["sensitivity"], point["specificity"], prevalence)
        out["at_prevalence"] = {"prevalence": float(prevalence),
                                **{k: {**with_ci(at[k], cis[f"{k}@P"]),
                                       **{x: cis[f"{k}@P"][x] for x in ("n_valid", "zero_width", "method",
                                                                         "percentile")}}
                                   for k in ("ppv", "npv")}}
    return out


# --------------------------------------------------------------------------- calibration

ECE_BINS = 10


def brier(y, p, w=None) -> float:
    """Mean squared difference between the probability of the positive class and the label."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    w = np.ones(len(y)) if w is None else np.asarray(w, dtype=np.float64)
    return float((w * (p - y) ** 2).sum() / w.sum()) if w.sum() > 0 else float("nan")


def ece_bin(p, bins: int = ECE_BINS) -> np.ndarray:
    """Equal-width bin of each probability: [0, 1/bins), ..., [1 - 1/bins, 1]."""
    return np.minimum((np.asarray(p, dtype=np.float64) * bins).astype(int), bins - 1)


def ece(y, p, w=None, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over equal-width bins of (bin weight) x |mean label - mean p|."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    w = np.ones(len(y)) if w is None else np.asarray(w, dtype=np.float64)
    if w.sum() <= 0:
        return float("nan")
    gap = np.bincount(ece_bin(p, bins), weights=w * (y - p), minlength=bins)
    return float(np.abs(gap).sum() / w.sum())


def reliability(y, p, bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width bin: range, images, mean probability, fraction positive (the reliability diagram)."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    b = ece_bin(p, bins)
    out = []
    for i in range(bins):
        m = b == i
        out.append({"low": i / bins, "high": (i + 1) / bins, "n": int(m.sum()),
                    "mean_probability": float(p[m].mean()) if m.any() else None,
                    "fraction_positive": float(y[m].mean()) if m.any() else None})
    return out


def calibration_metrics(y, p, groups, n_boot: int = 0, seed: int = 0) -> dict:
    """Brier score and ECE (10 bins), each with a patient-bootstrap interval, and the diagram's bins."""
    y = np.asarray(y).astype(int)
    cis = bootstrap_stats({"brier": lambda w: brier(y, p, w), "ece": lambda w: ece(y, p, w)}, groups, n_boot, seed)
    return {"brier": brier(y, p), "brier_ci": cis["brier"], "ece": ece(y, p), "ece_ci": cis["ece"],
            "ece_bins": ECE_BINS, "reliability": reliability(y, p)}


_EPS = 1e-7


def logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def prior_shift(train_prevalence: float, target_prevalence: float) -> float:
    """Logit offset that moves probabilities of a model trained at ``train_prevalence`` to
    ``target_prevalence`` (Saerens et al. 2002: odds x target odds / training odds)."""
    return float(logit(target_prevalence) - logit(train_prevalence))


def adjust(p, temperature: float = 1.0, shift: float = 0.0, center: float = 0.0):
    """sigmoid((logit(p) - center) / temperature + center + shift).

    Temperature scaling around the training prior (``center`` = logit of the training split's
    prevalence), then the prior shift: with ``shift`` = logit(pi_target) - logit(pi_train) this is
    sigmoid((logit p - logit pi_train) / T + logit pi_target). Dividing logit(p) itself by T (``center``
    0, the older form) also rescales the training prior's log-odds and is right only when pi_train = 0.5."""
    c = float(center)
    z = (logit(p) - c) / float(temperature) + c + float(shift)
    return 1.0 / (1.0 + np.exp(-z))


LOG_T_BOUND = 4.0  # fit_temperature searches log T in [-4, 4]: T in [0.018, 54.6]


def fit_temperature(y, p, shift: float = 0.0, center: float = 0.0) -> float:
    """The temperature T minimising the log loss of ``adjust(p, T, shift, center)`` on (y, p)
    (validation), log T searched in [-LOG_T_BOUND, LOG_T_BOUND] (:func:`temperature_at_bound`)."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, dtype=np.float64)
    z = logit(p) - float(center)
    c = float(center) + float(shift)

    def nll(log_t):
        q = np.clip(1.0 / (1.0 + np.exp(-(z / np.exp(log_t) + c))), 1e-12, 1 - 1e-12)
        return float(-(y * np.log(q) + (1 - y) * np.log1p(-q)).mean())

    r = minimize_scalar(nll, bounds=(-LOG_T_BOUND, LOG_T_BOUND), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(r.x))


def temperature_at_bound(temperature: float, tol: float = 1e-3) -> bool:
    """Did :func:`fit_temperature` stop at the edge of its search (e.g. T = 0.018 on a separable
    validation set)? Then T is not a fitted optimum and the evaluation warns."""
    return abs(abs(math.log(float(temperature))) - LOG_T_BOUND) < tol


# --------------------------------------------------------------------------- thresholds, tables

def youden(y, p) -> dict:
    """Threshold maximising sensitivity + specificity - 1 (Youden's J) on the ROC curve; of tied maxima the
    highest cut, placed between that score and the next lower one (:func:`cut_below`)."""
    y = np.asarray(y).astype(int)
    if not both_classes(y):
        return {"threshold": None, "j": None, "sensitivity": None, "specificity": None}
    p = np.asarray(p, dtype=np.float64)
    fpr, tpr, thr = roc_curve(y, p)
    j = tpr - fpr
    i = int(np.argmax(j))
    return {"threshold": cut_below(p, thr[i]), "j": float(j[i]), "sensitivity": float(tpr[i]),
            "specificity": float(1.0 - fpr[i])}


def class_table(y, pred, class_names: Sequence[str]) -> dict:
    """scikit-learn's classification_report as a dict: per class and the averages."""
    labels = list(range(len(class_names)))
    rep = classification_report(np.asarray(y).astype(int), np.asarray(pred).astype(int), labels=labels,
                                target_names=list(class_names), output_dict=True, zero_division=0)
    out = {}
    for k, v in rep.items():
        if isinstance(v, Mapping):
            out[k] = {"precision": float(v["precision"]), "recall": float(v["recall"]),
                      "f1-score": float(v["f1-score"]), "support": int(v["support"])}
        else:
            out[k] = float(v)
    if "accuracy" not in out:  # sklearn drops it when 'micro avg' replaces it
        out["accuracy"] = float(accuracy_score(np.asarray(y).astype(int), np.asarray(pred).astype(int)))
    return out


def subgroup_auc(y, p, keys, groups=None, n_boot: int = 0, seed: int = 0) -> dict:
    """AUC for every value of ``keys`` (e.g. view, sex), with a patient-bootstrap interval within the
    subgroup (``auc_ci``) when ``n_boot``; None where one class is missing."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=np.float64)
    keys = np.asarray(keys).astype(str)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    out = {}
    for k in sorted(set(keys.tolist())):
        m = keys == k
        out[k] = {"n": int(m.sum()), "positives": int(y[m].sum()), "auc": auc(y[m], p[m])}
        if out[k]["auc"] is None:
            out[k]["note"] = "one class only: AUC undefined"
        ci = bootstrap_auc(y[m], p[m], groups[m], n_boot=n_boot, seed=seed)
        out[k]["auc_ci"] = {"low": ci["low"], "high": ci["high"], "n_valid": ci["n_valid"]}
    return out


def binary_metrics(y, p, *, class_names: Sequence[str] = ("negative", "positive"), threshold: float = 0.5,
                   groups=None, subgroups: Mapping[str, Iterable] | None = None, n_boot: int = 1000,
                   seed: int = 0, curves: bool = True, operating: Mapping | None = None,
                   prevalence: float = 0.0) -> dict:
    """Every number of the binary evaluation for one probability column.

    ``p`` is the probability of class 1 (``class_names[1]``); an image is predicted positive
    when ``p >= threshold`` (the class table). ``groups`` are patient ids for the bootstrap (each
    image its own patient when None). ``operating``: ``{source, rule, threshold}`` of a threshold
    chosen elsewhere (on validation), whose sensitivity, specificity, PPV, NPV and accuracy are
    reported with intervals (PPV/NPV also at ``prevalence`` when > 0). Youden's threshold fitted on
    THIS set is reported only as ``oracle`` (optimistic).
    """
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=np.float64)
    if groups is None:
        groups = np.arange(len(y))
    pred = (p >= threshold).astype(int)
    yd = youden(y, p)
    boot = bootstrap_auc(y, p, groups, n_boot=n_boot, seed=seed, roc_band=curves)
    band = boot.pop("roc_band", None)
    ap_ci = {"low": None, "high": None, "n_valid": 0}
    if both_classes(y):
        tg = _TieGroups(y, p)
        ap_ci = bootstrap_stats({"ap": tg.average_precision}, groups, n_boot, seed)["ap"]
    m = {
        "n": int(len(y)),
        "positives": int(y.sum()),
        "prevalence": float(y.mean()) if len(y) else None,
        "patients": int(len(np.unique(np.asarray(groups)))),
        "threshold": float(threshold),
        "report": class_table(y, pred, class_names),
        "confusion_matrix": confusion_matrix(y, pred, labels=[0, 1]).tolist(),
        "auc": auc(y, p),
        "auc_ci": boot,
        "average_precision": _clean(average_precision_score(y, p)) if both_classes(y) else None,
        "average_precision_ci": ap_ci,
        **calibration_metrics(y, p, groups, n_boot, seed),
        "oracle": {**yd, "rule": "youden", "fitted_on": "test",
                   "note": "threshold fitted on the test set itself: optimistic, not a result"},
    }
    if yd["threshold"] is not None:
        pred_y = (p >= yd["threshold"]).astype(int)
        m["oracle"]["accuracy"] = float(accuracy_score(y, pred_y))
    if operating is not None and operating.get("threshold") is not None:
        m["operating_point"] = {**operating, **operating_point_metrics(y, p, operating["threshold"], groups,
                                                                       n_boot=n_boot, seed=seed,
                                                                       prevalence=prevalence)}
    elif operating is not None:
        m["operating_point"] = {**operating, "note": "no threshold: the validation split lacks a class"}
    m["subgroups"] = {name: subgroup_auc(y, p, keys, groups, n_boot, seed) for name, keys in (subgroups or {}).items()}
    if curves and both_classes(y):
        fpr, tpr, _ = roc_curve(y, p)
        prec, rec, _ = precision_recall_curve(y, p)
        m["curves"] = {"roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
                       "pr": {"precision": prec.tolist(), "recall": rec.tolist()},
                       "roc_band": band}
    return m


def split_auc(y, p, mask_pos, groups, n_boot: int = 0, seed: int = 0) -> dict:
    """AUC of the positives selected by ``mask_pos`` against ALL negatives, ``{value, low, high, images,
    positives, negatives}`` in images (e.g. positives with and without co-findings)."""
    y = np.asarray(y).astype(int)
    keep = (y == 0) | (np.asarray(mask_pos, bool) & (y == 1))
    ci = bootstrap_auc(y[keep], np.asarray(p)[keep], np.asarray(groups)[keep], n_boot=n_boot, seed=seed)
    return {**with_ci(auc(y[keep], np.asarray(p)[keep]), ci), "n_valid": ci["n_valid"], "method": ci.get("method"),
            "images": int(keep.sum()), "positives": int((y[keep] == 1).sum()), "negatives": int((y[keep] == 0).sum())}


def multilabel_metrics(Y, P, *, class_names: Sequence[str], threshold: float = 0.5, groups=None,
                       n_boot: int = 1000, seed: int = 0, subgroups: Mapping[str, Iterable] | None = None,
                       curves: bool = True, mask=None) -> dict:
    """Per-finding AUC (patient-bootstrap interval), mean AUC, and the per-finding table at a
    threshold. ``Y`` is (N, K) 0/1, ``P`` (N, K) sigmoid probabilities. ``mask`` (N, K): 0 where a label is
    masked (``data.uncertain: ignore``, blank): a finding's AUC and interval, and the table at the threshold
    (:func:`masked_class_report`), use its labelled images only."""
    Y = np.asarray(Y).astype(int)
    P = np.asarray(P, dtype=np.float64)
    if groups is None:
        groups = np.arange(len(Y))
    groups = np.asarray(groups)
    findings = {}
    for k, name in enumerate(class_names):
        sel = np.asarray(mask)[:, k] > 0 if mask is not None else np.ones(len(Y), bool)
        y, p, gk = Y[sel, k], P[sel, k], groups[sel]
        boot = bootstrap_auc(y, p, gk, n_boot=n_boot, seed=seed + k, roc_band=False)
        f = {"positives": int(y.sum()), "auc": auc(y, p), "auc_ci": boot,
             "chexnet_auc": CHEXNET_AUC.get(_norm_name(name))}
        if mask is not None:
            f["masked"] = int((~sel).sum())
        f["subgroups"] = {g: subgroup_auc(y, p, np.asarray(keys)[sel], gk, n_boot, seed + k)
                          for g, keys in (subgroups or {}).items()}
        if curves and both_classes(y):
            fpr, tpr, _ = roc_curve(y, p)
            f["curves"] = {"roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}
        findings[name] = f
    aucs = [f["auc"] for f in findings.values() if f["auc"] is not None]
    pred = (P >= threshold).astype(int)
    if mask is not None and not np.all(np.asarray(mask) > 0):
        report = masked_class_report(Y, pred, np.asarray(mask) > 0, class_names)
    else:
        rep = classification_report(Y, pred, labels=list(range(len(class_names))), target_names=list(class_names),
                                    output_dict=True, zero_division=0)
        report = {k: {"precision": float(v["precision"]), "recall": float(v["recall"]),
                      "f1-score": float(v["f1-score"]), "support": int(v["support"])} for k, v in rep.items()}
        report["accuracy"] = float(accuracy_score(Y, pred))  # exact match of all findings (subset accuracy)
    return {"n": int(len(Y)), "patients": int(len(np.unique(np.asarray(groups)))), "threshold": float(threshold),
            "findings": findings, "mean_auc": float(np.mean(aucs)) if aucs else None,
            "findings_with_auc": len(aucs), "report": report}


def _prf(tp, fp, fn) -> tuple[float, float, float]:
    """Precision, recall, F1 from counts; 0 where undefined (classification_report's zero_division=0)."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return float(p), float(r), float(2 * p * r / (p + r)) if p + r else 0.0


def masked_class_report(Y, pred, labelled, class_names: Sequence[str]) -> dict:
    """:func:`multilabel_metrics`' table when some labels are masked: classification_report's rows and
    averages over the labelled entries only (a masked label is neither a positive nor a negative), and the
    subset accuracy as the share of images whose labelled findings are all predicted right."""
    Y, pred, labelled = np.asarray(Y), np.asarray(pred), np.asarray(labelled, bool)
    tp, fp, fn = ((Y == 1) & (pred == 1) & labelled), ((Y == 0) & (pred == 1) & labelled), \
        ((Y == 1) & (pred == 0) & labelled)
    out, support = {}, (Y == 1) & labelled
    for k, name in enumerate(class_names):
        p, r, f = _prf(tp[:, k].sum(), fp[:, k].sum(), fn[:, k].sum())
        out[name] = {"precision": p, "recall": r, "f1-score": f, "support": int(support[:, k].sum())}
    rows = [out[n] for n in class_names]
    n_pos = int(support.sum())
    p, r, f = _prf(tp.sum(), fp.sum(), fn.sum())
    out["micro avg"] = {"precision": p, "recall": r, "f1-score": f, "support": n_pos}
    out["macro avg"] = {m: float(np.mean([x[m] for x in rows])) for m in ("precision", "recall", "f1-score")}
    out["macro avg"]["support"] = n_pos
    w = np.array([x["support"] for x in rows], dtype=float)
    out["weighted avg"] = {m: float(np.dot(w, [x[m] for x in rows]) / w.sum()) if w.sum() else 0.0
                           for m in ("precision", "recall", "f1-score")}
    out["weighted avg"]["support"] = n_pos
    per = [_prf(tp[i].sum(), fp[i].sum(), fn[i].sum()) for i in range(len(Y))]
    out["samples avg"] = {m: float(np.mean([x[j] for x in per])) if per else 0.0
                          for j, m in enumerate(("precision", "recall", "f1-score"))}
    out["samples avg"]["support"] = n_pos
    out["accuracy"] = float(np.mean(np.all((pred == Y) | ~labelled, axis=1))) if len(Y) else 0.0
    return out


# --------------------------------------------------------------------------- text tables

def _fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def format_class_table(report: Mapping, digits: int = 2, title: str | None = None) -> str:
    """A classification_report-style table from :func:`class_table`'s dict."""
    rows = [k for k, v in report.items() if isinstance(v, Mapping) and not k.endswith(" avg")]
    avgs = [k for k, v in report.items() if isinstance(v, Mapping) and k.endswith(" avg")]
    width = max([len(r) for r in rows + avgs] + [len("weighted avg")])
    head = f"{'':>{width}} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}"
    lines = ([title] if title else []) + [head, ""]
    for r in rows:
        v = report[r]
        lines.append(f"{r:>{width}} {v['precision']:>9.{digits}f} {v['recall']:>9.{digits}f} "
                     f"{v['f1-score']:>9.{digits}f} {v['support']:>9d}")
    lines.append("")
    if "accuracy" in report:
        support = sum(report[r]["support"] for r in rows) if not avgs else report[avgs[0]]["support"]
        lines.append(f"{'accuracy':>{width}} {'':>9} {'':>9} {report['accuracy']:>9.{digits}f} {support:>9d}")
    for r in avgs:
        v = report[r]
        lines.append(f"{r:>{width}} {v['precision']:>9.{digits}f} {v['recall']:>9.{digits}f} "
                     f"{v['f1-score']:>9.{digits}f} {v['support']:>9d}")
    return "\n".join(lines)


def format_auc_line(m: Mapping, digits: int = 3) -> str:
    ci = m.get("auc_ci") or {}
    s = f"ROC AUC {_fmt(m.get('auc'), digits)}"
    if ci.get("low") is not None:
        s += (f" (95% CI {_fmt(ci['low'], digits)}-{_fmt(ci['high'], digits)}, BCa over "
              f"{ci['n_valid']} bootstrap resamples by patient)")
    op = m.get("operating_point") or {}
    if op.get("threshold") is not None:
        s += (f"; operating point {op['threshold']:.3f} ({op['rule']}, chosen on {op['source']}): sensitivity "
              f"{_fmt(op['sensitivity']['value'])}, specificity {_fmt(op['specificity']['value'])}")
    if m.get("brier") is not None:
        s += f"; Brier {m['brier']:.3f}, ECE {m['ece']:.3f}"
    return s


def format_side_by_side(left: str, right: str, gap: int = 6) -> str:
    """Two text blocks next to each other (the plain and the TTA table)."""
    a, b = left.splitlines(), right.splitlines()
    w = max((len(x) for x in a), default=0)
    n = max(len(a), len(b))
    a += [""] * (n - len(a))
    b += [""] * (n - len(b))
    return "\n".join(f"{x:<{w}}{' ' * gap}{y}".rstrip() for x, y in zip(a, b))


def format_auc_table(ml: Mapping, tta: Mapping | None = None, digits: int = 3) -> str:
    """CheXNet-style per-finding AUROC table (text)."""
    names = list(ml["findings"])
    w = max(len("Pathology"), max((len(n) for n in names), default=0))
    head = f"{'Pathology':<{w}}  {'AUROC':>6}  {'95% CI':>13}"
    if tta:
        head += f"  {'TTA':>6}"
    head += f"  {'pos.':>5}  {'CheXNet':>7}"
    lines = [head, "-" * len(head)]
    for n in names:
        f = ml["findings"][n]
        ci = f["auc_ci"]
        cis = f"{_fmt(ci['low'], digits)}-{_fmt(ci['high'], digits)}" if ci.get("low") is not None else "-"
        line = f"{n:<{w}}  {_fmt(f['auc'], digits):>6}  {cis:>13}"
        if tta:
            line += f"  {_fmt(tta['findings'][n]['auc'], digits):>6}"
        line += f"  {f['positives']:>5d}  {_fmt(f['chexnet_auc'], 4):>7}"
        lines.append(line)
    lines.append("-" * len(head))
    tail = f"{'Mean AUROC':<{w}}  {_fmt(ml['mean_auc'], digits):>6}  {'':>13}"
    if tta:
        tail += f"  {_fmt(tta['mean_auc'], digits):>6}"
    ref = [v for k, v in CHEXNET_AUC.items() if k in {_norm_name(n) for n in names}]
    tail += f"  {'':>5}  {_fmt(float(np.mean(ref)) if ref else None, 4):>7}"
    lines.append(tail)
    return "\n".join(lines)
