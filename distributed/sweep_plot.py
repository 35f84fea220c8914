"""``python -m distributed.sweep_plot <run.dir>/sweep.json``: ``sweep.png`` beside it (matplotlib, Agg).

Test ROC AUC of every arm of a grid or preset sweep (:mod:`launch.grid`), with its patient-bootstrap 95%
interval, against the trainable parameters of its fine-tune phase (log scale when they span more than
20-fold) and, on a second panel,
against the number of backbone layers it trained; the point chosen on validation is drawn in its own
colour. Run as its own process by ``launch sweep`` (launch loads no matplotlib).
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from data_prep.fsutil import atomic_write_bytes  # noqa: E402


def _xs(arm: dict) -> tuple[float | None, float | None]:
    ft = (arm.get("layers") or {}).get("finetune") or {}
    return ft.get("trainable_params"), ft.get("trained_layers")


def sweep_png(s: dict, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    best = s.get("best")
    for ax, k, label in ((axes[0], 0, "trainable parameters (fine-tune)"),
                         (axes[1], 1, "backbone layers trained (fine-tune)")):
        for a in s["arms"]:
            x, y = _xs(a)[k], a.get("auc")
            if x is None or y is None:
                continue
            lo, hi = (a.get("auc_ci") or {}).get("low"), (a.get("auc_ci") or {}).get("high")
            err = [[y - lo], [hi - y]] if lo is not None and hi is not None else None
            colour = "tab:red" if a["point"] == best else "tab:blue"
            ax.errorbar([x], [y], yerr=err, fmt="o", color=colour, capsize=3)
            name = a["point"] + (f" seed {a['seed']}" if len(s.get("seeds") or []) > 1 else "")
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        xs = [_xs(a)[k] for a in s["arms"] if _xs(a)[k]]
        if k == 0 and xs and max(xs) > 20 * min(xs):  # parameters span orders of magnitude: log scale
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test ROC AUC (95% CI)")
    fig.suptitle(f"Sweep of {Path(s.get('config') or '').name}: red = best on validation ({best})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m distributed.sweep_plot SWEEP_JSON", file=sys.stderr)
        return 2
    path = Path(argv[0])
    try:
        s = json.loads(path.read_text())
        arms = s["arms"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"{path}: not a grid sweep's sweep.json ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    if not isinstance(arms, list):
        print(f"{path}: 'arms' is not a list", file=sys.stderr)
        return 2
    print(sweep_png(s, path.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
