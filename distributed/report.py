"""``report.md`` of an evaluation: config, data counts from the manifest, the tables (plain and
with test-time augmentation side by side), subgroup AUCs, plots and Grad-CAM grids by relative
link. Readable on its own. No TensorFlow.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Mapping, Sequence

from data_prep.fsutil import atomic_write_text
from data_prep.manifest import conversion_counts
from distributed.metrics import CHEXNET_AUC, _norm_name, format_class_table, format_side_by_side

TTA_NOTE = ("The TTA probability of an image is the mean of {n} predictions: the plain image's and those of "
            "{rounds} copies augmented as in training (the same in-graph transform ranges, `train.augment`, "
            "seeded per image and round, so the result does not depend on the number of ranks).")


def backbone_note(model_cfg) -> str:
    """Why this network, for the report's table: the demo's small backbone, or random ImageNet-sized weights."""
    if model_cfg.backbone == "tiny":
        return ("; `tiny`: a small VGG-shaped network with batch normalisation that learns from random weights in "
                "a few epochs, for tests and the demo (VGG16 needs its ImageNet weights for that, and machines "
                "without internet access cannot download them)")
    if model_cfg.weights == "none":
        return "; random initial weights: without batch normalisation this network learns slowly, if at all"
    return ""


def _f(x, d=3):
    return "–" if x is None else f"{x:.{d}f}"


def _ci(m: Mapping, d=3) -> str:
    ci = m.get("auc_ci") or {}
    return f"{_f(ci.get('low'), d)} – {_f(ci.get('high'), d)}" if ci.get("low") is not None else "–"


def _table(header: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else ":---" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def data_section(manifest: Mapping | None) -> str:
    if not manifest:
        return "_No manifest found: data counts unavailable._"
    classes = list(manifest.get("classes", []))
    rows = []
    for split in ("train", "val", "test"):
        s = (manifest.get("splits") or {}).get(split)
        if not s:
            continue
        lc = s.get("label_counts") or {}
        counts = ", ".join(f"{k}: {v}" for k, v in lc.items()) if len(lc) <= 4 else \
            ", ".join(f"{k}: {v}" for k, v in sorted(lc.items(), key=lambda kv: -kv[1])[:4]) + ", …"
        rows.append([split, s.get("count", "–"), s.get("patients", "–"), counts or "–", len(s.get("shards", []))])
    txt = [f"Task **{manifest.get('task', '?')}**, classes: {', '.join(classes)}; "
           f"images {manifest.get('image_size', '?')} px, pixel mean {_f(manifest.get('mean'), 1)}, "
           f"std {_f(manifest.get('std'), 1)}.", "",
           _table(["split", "images", "patients", "per class", "shards"], rows, "lrrll"), ""]
    sk, cv = manifest.get("skipped") or [], manifest.get("converted") or []
    kinds = conversion_counts(cv)
    txt.append(f"Skipped during prep: {len(sk)} image(s); inputs other than 8-bit square grayscale PNGs, converted: "
               f"{len(cv)}" + (f" ({', '.join(f'{k}: {v}' for k, v in kinds.items())}; each listed in "
                               "`manifest.json`, `converted`)" if kinds else "") + ".")
    if sk:
        reasons: dict = {}
        for s in sk:
            reasons[s.get("reason", "?")] = reasons.get(s.get("reason", "?"), 0) + 1
        txt.append("Skip reasons: " + "; ".join(f"{k} ({v})" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])) + ".")
    txt.append("Splits are by patient: no patient has images in two splits; the training split may be "
               "resampled (balanced), validation and test hold each image at most once.")
    return "\n".join(txt)


def binary_section(plain: Mapping, tta: Mapping | None, classes: Sequence[str], tta_rounds: int) -> str:
    out = []
    heads = ["", "plain"] + ([f"TTA (plain + {tta_rounds} augmented)"] if tta else [])

    def row(name, fn):
        return [name, fn(plain)] + ([fn(tta)] if tta else [])

    rows = [
        row("ROC AUC", lambda m: _f(m["auc"])),
        row("95% CI (bootstrap by patient)", _ci),
        row("average precision", lambda m: _f(m.get("average_precision"))),
        row(f"accuracy at threshold {plain['threshold']:g}", lambda m: _f(m["report"]["accuracy"])),
        row("macro F1", lambda m: _f(m["report"]["macro avg"]["f1-score"])),
        row("Youden's threshold", lambda m: _f((m.get("youden") or {}).get("threshold"))),
        row("sensitivity / specificity at Youden", lambda m: (
            f"{_f(m['youden']['sensitivity'], 2)} / {_f(m['youden']['specificity'], 2)}"
            if (m.get("youden") or {}).get("threshold") is not None else "–")),
        row("accuracy at Youden's threshold", lambda m: _f((m.get("youden") or {}).get("accuracy"))),
    ]
    out += ["### Summary", "", _table(heads, rows), ""]
    ci = plain.get("auc_ci") or {}
    out.append(f"The interval is the 2.5–97.5 percentile of the AUC over {ci.get('n_valid', 0)} of "
               f"{ci.get('n_boot', 0)} bootstrap resamples that draw **patients** with replacement "
               f"({plain['patients']} patients, {plain['n']} images): images of one patient are not independent.")
    out.append("")

    out += [f"### Classification report (threshold {plain['threshold']:g})", ""]
    names = list(classes) + ["macro avg", "weighted avg"]
    cols = ["class", "precision", "recall", "F1", "support"]
    if tta:
        cols += ["TTA precision", "TTA recall", "TTA F1"]
    rows = []
    for n in names:
        a = plain["report"][n]
        r = [n, _f(a["precision"], 2), _f(a["recall"], 2), _f(a["f1-score"], 2), a["support"]]
        if tta:
            b = tta["report"][n]
            r += [_f(b["precision"], 2), _f(b["recall"], 2), _f(b["f1-score"], 2)]
        rows.append(r)
    acc = ["accuracy", "", "", _f(plain["report"]["accuracy"], 2), plain["n"]]
    if tta:
        acc += ["", "", _f(tta["report"]["accuracy"], 2)]
    rows.append(acc)
    out += [_table(cols, rows), ""]
    left = format_class_table(plain["report"], title="without TTA")
    text = format_side_by_side(left, format_class_table(tta["report"],
                                                        title=f"with TTA (plain + {tta_rounds} augmented)")) \
        if tta else left
    out += ["In the article's (scikit-learn) form:", "", "```", text, "```", ""]

    cm = plain["confusion_matrix"]
    out += ["### Confusion matrix (plain)", "",
            _table(["true \\ predicted"] + list(classes),
                   [[classes[i]] + [cm[i][j] for j in range(len(classes))] for i in range(len(classes))]), ""]

    sub = plain.get("subgroups") or {}
    if sub:
        out += ["### AUC by subgroup", ""]
        rows = []
        for g, vals in sub.items():
            for k, v in vals.items():
                t = ((tta or {}).get("subgroups") or {}).get(g, {}).get(k, {})
                rows.append([f"{g} = {k}", v["n"], v["positives"], _f(v["auc"]) if v["auc"] is not None else
                             "– (one class only)"] + ([_f(t.get("auc"))] if tta else []))
        out += [_table(["subgroup", "images", "positives", "AUC"] + (["TTA AUC"] if tta else []), rows), ""]
        out.append("AUC is reported only where both classes are present in the subgroup.")
        out.append("")
    return "\n".join(out)


def multilabel_section(plain: Mapping, tta: Mapping | None, tta_rounds: int) -> str:
    names = list(plain["findings"])
    cols = ["Pathology", "AUROC", "95% CI (by patient)"] + ([f"TTA ({tta_rounds})"] if tta else []) + \
        ["positives", "CheXNet (ref.)"]
    rows = []
    for n in names:
        f = plain["findings"][n]
        r = [n.replace("_", " "), _f(f["auc"]), _ci(f)]
        if tta:
            r.append(_f(tta["findings"][n]["auc"]))
        r += [f["positives"], _f(f.get("chexnet_auc"), 4)]
        rows.append(r)
    ref = [CHEXNET_AUC[_norm_name(n)] for n in names if _norm_name(n) in CHEXNET_AUC]
    mean = ["**Mean AUROC**", f"**{_f(plain['mean_auc'])}**", ""] + ([f"**{_f(tta['mean_auc'])}**"] if tta else []) + \
        ["", _f(sum(ref) / len(ref), 4) if ref else "–"]
    rows.append(mean)
    out = ["### AUROC per finding (the form of CheXNet's table)", "", _table(cols, rows), "",
           f"Mean over the {plain['findings_with_auc']} findings with both classes in the test split. "
           "The CheXNet column is Rajpurkar et al. (2017) on THEIR patient split and a DenseNet-121 at "
           "224 px: a reference point, not a like-for-like comparison.", ""]
    rep = plain["report"]
    rows = [[n.replace("_", " "), _f(rep[n]["precision"], 2), _f(rep[n]["recall"], 2), _f(rep[n]["f1-score"], 2),
             rep[n]["support"]] for n in names]
    for k in ("micro avg", "macro avg", "weighted avg", "samples avg"):
        if k in rep:
            rows.append([k, _f(rep[k]["precision"], 2), _f(rep[k]["recall"], 2), _f(rep[k]["f1-score"], 2),
                         rep[k]["support"]])
    out += [f"### Per-finding table at threshold {plain['threshold']:g}", "",
            _table(["finding", "precision", "recall", "F1", "support"], rows), "",
            f"Exact-match (all {len(names)} findings right) accuracy: {_f(rep['accuracy'])}.", ""]
    return "\n".join(out)


def write_report(run_dir, *, cfg, manifest: Mapping | None, metrics: Mapping, plots: Mapping[str, str],
                 gradcam: Mapping[str, str], config_yaml: str, console: str = "") -> Path:
    """Write ``report.md`` into ``run_dir``; image paths in ``plots``/``gradcam`` are relative."""
    run_dir = Path(run_dir)
    name = cfg.run.name or run_dir.name
    plain, tta = metrics["plain"], metrics.get("tta")
    lines = [f"# Evaluation report: {name}", "",
             f"Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by `cxr-eval` from the run directory "
             f"`{run_dir}`.", "",
             _table(["", ""], [
                 ["task", metrics["task"] + (f" — positive class **{metrics['classes'][-1]}**"
                                             if metrics["task"] == "binary" else f" — {len(metrics['classes'])} findings")],
                 ["model", f"`{metrics['model']}` (eval.checkpoint = {metrics['checkpoint']})"],
                 ["backbone", f"{cfg.model.backbone} (weights: {cfg.model.weights}), {metrics['image_size']} px"
                              + backbone_note(cfg.model)],
                 *([["precision", f"trained in {metrics['precision']['training']}, evaluated in "
                                  f"{metrics['precision']['evaluation']} (runtime.precision; probabilities are float32)"]]
                   if metrics.get("precision") else []),
                 ["test set", f"{metrics['n']} images of {plain['patients']} patients"],
                 ["evaluation", f"{metrics['ranks']} rank(s), {metrics['seconds']:.1f} s; test-time augmentation: "
                                + (f"{metrics['tta_rounds']} rounds" if tta else "off")],
             ], "ll"), "",
             "## Data", "", data_section(manifest), ""]
    lines += ["## Results", ""]
    for warning in metrics.get("warnings") or []:
        lines += [f"> **Warning:** {warning}.", ""]
    if metrics["task"] == "binary":
        lines.append(binary_section(plain, tta, metrics["classes"], metrics.get("tta_rounds", 0)))
    else:
        lines.append(multilabel_section(plain, tta, metrics.get("tta_rounds", 0)))
    if tta:
        lines += [TTA_NOTE.format(n=metrics["tta_rounds"] + 1, rounds=metrics["tta_rounds"]), ""]

    if plots:
        lines += ["## Plots", ""]
        titles = {"roc": "ROC curve (shaded: 95% pointwise band over patient resamples; dot: Youden's point)",
                  "pr": "Precision-recall curve", "confusion": "Confusion matrix",
                  "roc_per_finding": "ROC curve per finding",
                  "history": "Training curves (the dotted line marks the switch from warm-up to fine-tuning)"}
        for k, rel in plots.items():
            lines += [f"**{titles.get(k, k)}**", "", f"![{k}]({rel})", ""]
    else:
        lines += ["## Plots", "", "_none_", ""]

    lines += ["## Grad-CAM", ""]
    if gradcam:
        lines += [f"Heat maps of the positive class score on layer `{metrics.get('gradcam_layer', '?')}` over the "
                  "network's input image, for the most confident cases of each group.", ""]
        for k, rel in gradcam.items():
            lines += [f"**{k.replace('_', ' ')}**", "", f"![{k}]({rel})", ""]
    else:
        lines += ["_No Grad-CAM grids (eval.gradcam_per_group = 0 or no such cases)._", ""]

    if console:
        lines += ["## Console output", "", "```", console.rstrip(), "```", ""]
    lines += ["## Configuration", "", "The resolved configuration of this evaluation (also in `eval_config.yaml`):", "",
              "```yaml", config_yaml.rstrip(), "```", "",
              "## Files", "",
              "- `predictions.csv`: one row per test image (probability, and with TTA `tta_probability`)",
              "- `metrics.json`: every number above", "- `plots/`, `gradcam/`: the images above",
              "- `eval_config.yaml`: the configuration of this evaluation", ""]
    return atomic_write_text(run_dir / "report.md", "\n".join(lines))
