"""PNG plots of an evaluation (matplotlib, Agg backend; no TensorFlow).

ROC curve with the patient-bootstrap band, precision-recall curve, reliability diagram, confusion matrix, decision
curve, the
per-finding ROC curves of a multi-label run, and the training curves from ``history.csv``
(loss and accuracy over both phases, the warm-up -> fine-tune switch marked).
All writes are atomic.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from data_prep.fsutil import atomic_write_bytes  # noqa: E402
from distributed import rundir  # noqa: E402
from distributed.results import BinaryResult, MultilabelResult, ReliabilityBin  # noqa: E402


def _save(fig, path) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_roc(path, curves: Sequence[tuple[str, BinaryResult]], title: str = "ROC curve") -> Path:
    """``curves``: (label, result) pairs of binary evaluations (with their ``curves``); the first one's
    bootstrap band is shaded."""
    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=1, label="chance")
    for i, (label, m) in enumerate(curves):
        c = m.curves
        if c is None:
            continue
        band = c.roc_band
        if band and i == 0:
            ax.fill_between(band.fpr, band.tpr_low, band.tpr_high, color=f"C{i}", alpha=0.2,
                            label=f"95% band ({m.auc_ci.n_valid} patient resamples)")
        ci = m.auc_ci
        txt = f"{label}: AUC {m.auc:.3f}"
        if ci is not None and ci.low is not None:
            txt += f" [{ci.low:.3f}, {ci.high:.3f}]"
        ax.plot(c.roc.fpr, c.roc.tpr, c=f"C{i}", lw=1.8, label=txt)
        op = m.operating_point
        if op is not None and op.threshold is not None:  # the threshold chosen on validation, where it lands on test
            ax.plot(1 - op.specificity.value, op.sensitivity.value, "o", c=f"C{i}", ms=5)
    ax.set(xlabel="False positive rate (1 - specificity)", ylabel="True positive rate (sensitivity)",
           xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_pr(path, curves: Sequence[tuple[str, BinaryResult]], prevalence: float | None = None,
            title: str = "Precision-recall curve") -> Path:
    fig, ax = plt.subplots(figsize=(5.2, 5))
    if prevalence is not None:
        ax.axhline(prevalence, ls="--", c="0.6", lw=1, label=f"prevalence {prevalence:.2f}")
    for i, (label, m) in enumerate(curves):
        c = m.curves.pr if m.curves is not None else None
        if not c:
            continue
        ap = m.average_precision
        ax.plot(c.recall, c.precision, c=f"C{i}", lw=1.8,
                label=f"{label}: AP {ap:.3f}" if ap is not None else label)
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower left", fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_decision_curve(path, c: Mapping, prevalence: float, title: str = "Decision curve") -> Path:
    """Net benefit of the model, of treating all and of treating none over threshold probabilities
    (``distributed.decision.curve``), at the test split's prevalence."""
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    t = np.asarray(c["threshold"])
    ax.plot(t, c["net_benefit"], c="C0", lw=1.8, label="model (p >= threshold)")
    ax.plot(t, c["net_benefit_treat_all"], c="C1", lw=1.2, ls="--", label="treat all")
    ax.plot(t, c["net_benefit_treat_none"], c="0.4", lw=1.2, ls=":", label="treat none")
    ax.set(xlabel="Threshold probability", ylabel="Net benefit", xlim=(0, 1),
           ylim=(min(-0.05, float(np.min(c["net_benefit"]))), max(0.05, prevalence * 1.1)),
           title=f"{title} (test prevalence {prevalence:.2f})")
    ax.legend(loc="upper right", fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_calibration(path, curves: Sequence[tuple[str, Sequence[ReliabilityBin]]],
                     title: str = "Reliability diagram") -> Path:
    """``curves``: (label, reliability bins) pairs: mean probability against the fraction
    positive per equal-width bin (marker area ~ images), the diagonal is perfect calibration."""
    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=1, label="perfectly calibrated")
    for i, (label, bins) in enumerate(curves):
        pts = [(b.mean_probability, b.fraction_positive, b.n) for b in bins if b.n]
        if not pts:
            continue
        x, y, n = (np.array(v, dtype=float) for v in zip(*pts))
        ax.plot(x, y, "-", c=f"C{i}", lw=1.4, label=label)
        ax.scatter(x, y, s=12 + 120 * n / n.max(), c=f"C{i}", alpha=0.7)
    ax.set(xlabel="Mean predicted probability (10 equal-width bins)", ylabel="Fraction positive",
           xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_confusion(path, cm, class_names: Sequence[str], title: str = "Confusion matrix") -> Path:
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.imshow(cm, cmap="Blues")
    total = cm.sum(axis=1, keepdims=True).clip(min=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            dark = cm[i, j] > cm.max() / 2
            ax.text(j, i, f"{cm[i, j]}\n{cm[i, j] / total[i, 0]:.0%}", ha="center", va="center",
                    color="white" if dark else "black", fontsize=10)
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names, rotation=90, va="center")
    ax.set(xlabel="Predicted", ylabel="True", title=title)
    return _save(fig, path)


def plot_multilabel_roc(path, ml: MultilabelResult, title: str = "ROC per finding") -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 6))
    ax.plot([0, 1], [0, 1], ls="--", c="0.6", lw=1)
    cmap = matplotlib.colormaps["tab20"]
    for i, (name, f) in enumerate(ml.findings.items()):
        c = f.curves.roc if f.curves is not None else None
        if c:
            ax.plot(c.fpr, c.tpr, lw=1.2, c=cmap(i % 20), label=f"{name} {f.auc:.3f}")
    ax.set(xlabel="False positive rate", ylabel="True positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title=f"{title} (mean AUC {ml.mean_auc:.3f})" if ml.mean_auc is not None else title)
    ax.legend(loc="lower right", fontsize=6)
    ax.grid(alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------- training curves

def _num(v):
    try:
        x = float(v)
        return x if np.isfinite(x) else np.nan
    except (TypeError, ValueError):
        return np.nan


def history_series(rows: Sequence[Mapping], warmup_epochs: int | None = None):
    """Running epoch number (1..), phase per row, and the index after which fine-tuning starts.

    The phase comes from a ``phase`` column when present; else an epoch counter that goes back
    marks the switch; else ``warmup_epochs`` does."""
    phases = [str(r.get("phase", "")).strip() for r in rows]
    switch = None
    if any(phases):
        for i in range(1, len(rows)):
            if phases[i] != phases[i - 1]:
                switch = i
                break
    else:
        ep = [_num(r.get("epoch")) for r in rows]
        for i in range(1, len(rows)):
            if ep[i] <= ep[i - 1]:
                switch = i
                break
        if switch is None and warmup_epochs and 0 < warmup_epochs < len(rows):
            switch = warmup_epochs
        phases = ["warmup" if switch is not None and i < switch else ("finetune" if switch is not None else "")
                  for i in range(len(rows))]
    x = np.arange(1, len(rows) + 1)
    return x, phases, switch


def _metric_keys(rows, base):
    keys = rows[0].keys() if rows else []
    alias = {"accuracy": ("accuracy", "acc", "binary_accuracy", "categorical_accuracy", "auc")}.get(base, (base,))
    for a in alias:
        if a in keys:
            return a, f"val_{a}" if f"val_{a}" in keys else None
    return None, None


def plot_history(path, history_csv, warmup_epochs: int | None = None, title: str = "Training curves") -> Path | None:
    """Loss and accuracy (train and validation) over both phases; None when there is no history."""
    history_csv = Path(history_csv)
    if not history_csv.is_file():
        return None
    rows = rundir.read_history(history_csv)
    if not rows:
        return None
    x, phases, switch = history_series(rows, warmup_epochs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, base, label in ((axes[0], "loss", "Loss"), (axes[1], "accuracy", "Accuracy")):
        k, vk = _metric_keys(rows, base)
        if k is None:
            ax.text(0.5, 0.5, f"no {base} in {rundir.HISTORY}", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.plot(x, [_num(r[k]) for r in rows], "o-", ms=3, label=f"train {k}")
        if vk:
            ax.plot(x, [_num(r[vk]) for r in rows], "s-", ms=3, label=f"validation {k}")
        if switch is not None:
            ax.axvline(switch + 0.5, c="k", ls=":", lw=1)
            ax.text(switch + 0.5, 0.98, " warm-up | fine-tune ", transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=7, bbox=dict(fc="white", ec="0.7", lw=0.5))
        ax.set(xlabel="epoch (both phases)", ylabel=label, title=label)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
