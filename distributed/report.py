"""``report.md`` of an evaluation: config, data counts from the manifest, the tables (plain and
with test-time augmentation side by side), subgroup AUCs, plots and Grad-CAM grids by relative
link. Readable on its own. No TensorFlow.

Every value that comes from data (CSV cells such as views, sexes and finding labels, skip reasons, file
and folder names, the run's name) goes through ``data_prep.textsafe`` (``md``: Markdown and HTML
escaped; ``md_code``: a code span that cannot be closed; ``fence``: code blocks that cannot be closed).
The checklist's answers are derived from the files the evaluation wrote and the patient sets it
counted (``distributed.provenance``), never constants.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Mapping, Sequence

from data_prep import flow as fl
from data_prep.fsutil import atomic_write_text
from data_prep.manifest import conversion_counts
from data_prep.textsafe import fence, md, md_code
from distributed import labelpolicy, rundir
from distributed.metrics import CHEXNET_AUC, _norm_name, format_class_table, format_side_by_side, short_resamples
from distributed.provenance import leakage_sentence
from distributed.results import (
    AucDifference,
    AucInterval,
    BinaryResult,
    DecisionCurve,
    EvalResult,
    Flow,
    FlowStep,
    Interval,
    MultilabelResult,
    OperatingPoint,
    PhaseLayers,
    PrepSummary,
    Provenance,
    SelectedCheckpoint,
    TaskDefinition,
)

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


def _ci(ci: AucInterval | None, d=3) -> str:
    return f"{_f(ci.low, d)} – {_f(ci.high, d)}" if ci is not None and ci.low is not None else "–"


def _leakage(prov: Provenance | None) -> str:
    return leakage_sentence(prov.to_json() if prov is not None else None)


def _flow(flow: Flow | Mapping | None) -> dict | None:
    """The flow as ``data_prep.flow`` reads it (a mapping): from metrics.json's record or a manifest's flow."""
    return flow if flow is None or isinstance(flow, Mapping) else flow.to_json()


def _table(header: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else ":---" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def data_section(manifest: Mapping | None, provenance: Provenance | None = None) -> str:
    if not manifest:
        return "_No manifest found: data counts unavailable._"
    classes = list(manifest.get("classes", []))
    rows = []
    for split in ("train", "val", "test"):
        s = (manifest.get("splits") or {}).get(split)
        if not s:
            continue
        lc = s.get("label_counts") or {}
        counts = ", ".join(f"{md(k)}: {v}" for k, v in lc.items()) if len(lc) <= 4 else \
            ", ".join(f"{md(k)}: {v}" for k, v in sorted(lc.items(), key=lambda kv: -kv[1])[:4]) + ", …"
        pos = lc.get(classes[1]) if manifest.get("task") == "binary" and len(classes) == 2 else None
        prev = _f(pos / s["count"]) if pos is not None and s.get("count") else "–"
        rows.append([split, s.get("count", "–"), s.get("patients", "–"), counts or "–", prev, len(s.get("shards", []))])
    txt = [f"Task **{md(manifest.get('task', '?'))}**, classes: {', '.join(md(c) for c in classes)}; "
           f"images {manifest.get('image_size', '?')} px, pixel mean {_f(manifest.get('mean'), 1)}, "
           f"std {_f(manifest.get('std'), 1)}.", "",
           _table(["split", "images", "patients", "per class", "prevalence", "shards"], rows, "lrrlrl"), ""]
    sk, cv = manifest.get("skipped") or [], manifest.get("converted") or []
    kinds = conversion_counts(cv)
    txt.append(f"Skipped during prep: {len(sk)} image(s); inputs other than 8-bit square grayscale PNGs, converted: "
               f"{len(cv)}" + (f" ({', '.join(f'{md(k)}: {v}' for k, v in kinds.items())}; each listed in "
                               "`manifest.json`, `converted`)" if kinds else "") + ".")
    if sk:
        reasons: dict = {}
        for s in sk:
            reasons[s.get("reason", "?")] = reasons.get(s.get("reason", "?"), 0) + 1
        txt.append("Skip reasons: " + "; ".join(f"{md(k)} ({v})"
                                                for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])) + ".")
    txt.append(f"Splits are by patient. {_leakage(provenance)} The training split may be resampled "
               "(balanced); validation and test hold each image at most once.")
    return "\n".join(txt)


FLOW_NOT_RECORDED = ("_The flow of images and patients was not recorded: this prep is older than it (rerun prep to "
                     "record it). Only prep's skips are known (above)._")


def _flow_prev(steps: Sequence[FlowStep], i: int) -> FlowStep | None:
    """The step an image of ``steps[i]`` came from: the previous one of the whole data set, or of the same split
    (none for a split's first step: the patient split excludes no image of a split)."""
    if steps[i].step == "split":
        return None
    same = [t for t in steps[:i] if t.split == steps[i].split]
    return same[-1] if same else None


def _flow_row(s: FlowStep, prev: FlowStep | None, classes: Sequence[str]) -> list:
    per = s.classes or {}
    cells = [f"{per[c].images} / {per[c].patients}" if c in per else "–" for c in classes]
    images = f"{s.images}" + (f" ({s.rows} rows)" if s.rows else "")
    gone = prev.images - s.images if prev is not None else None
    return [md(s.what or s.step), md(s.split or "all"), images,
            "–" if s.patients is None else s.patients, *cells, "–" if gone is None else gone]


def flow_section(flow: Mapping | None) -> str:
    """STARD's flow of images and patients (``data_prep.flow``: prep's counts and the evaluated test images) as a
    table with what each step excluded, and the exclusions summed; a sentence when the prep recorded none."""
    flow = _flow(flow)
    if not fl.valid(flow):
        return FLOW_NOT_RECORDED
    typed = Flow.from_json(flow)
    steps, classes = typed.steps, list(typed.classes)
    rows = [_flow_row(s, _flow_prev(steps, i), classes) for i, s in enumerate(steps)]
    head = ["step", "split", "images", "patients", *(f"{md(c)}: images / patients" for c in classes), "excluded here"]
    out = ["### Flow of images and patients", "", _table(head, rows, "ll" + "r" * (len(head) - 2)), "",
           "Images are distinct images (a balanced split's rows with resampled copies in brackets); a patient counts "
           "in every class of which they have an image, so the classes' patients can add up to more than the "
           "patients. The splits' first step counts what the patient split assigned; each later row of a split "
           "excludes from that split's row before it.", ""]
    return "\n".join(out + [flow_exclusions(flow)])


def flow_exclusions(flow: Mapping | None) -> str:
    """``E of N CSV rows excluded: a by ..., b by ...`` from the flow, and whether every written test image was
    evaluated; empty without a flow."""
    flow = _flow(flow)
    if not fl.valid(flow):
        return ""
    rows, kept = fl.total(flow, "csv"), fl.total(flow, "written")
    parts = [f"{n} {why}" for _, why, n in fl.exclusions(flow) if n]
    text = (f"{rows - kept} of {rows} CSV rows excluded before training and testing"
            + (f" ({'; '.join(parts)})" if parts else "") + f"; {kept} images in the shards")
    lost = fl.not_evaluated(flow)
    if lost is not None:
        text += "; every written test image evaluated" if lost == 0 else f"; {lost} written test image(s) not evaluated"
    return text + "."


def _iv(x, d=3) -> str:
    """``value [low, high]`` of a record with ``value``, ``low`` and ``high`` (``Proportion``, ``SplitAuc``, ...)."""
    if x is None or x.value is None:
        return "–"
    return _vlh(x.value, x.low, x.high, d)


def _vlh(value, low, high, d=3) -> str:
    if value is None:
        return "–"
    if low is None:
        return _f(value, d)
    return f"{_f(value, d)} [{_f(low, d)}, {_f(high, d)}]"


def _vci(value, ci: Interval | AucInterval | None, d=3) -> str:
    return _vlh(value, ci.low if ci is not None else None, ci.high if ci is not None else None, d)


BCA_NOTE = ("BCa (Efron 1987) shifts the percentiles of the resamples for the bias (the share of resamples below the "
            "estimate) and the skew (the acceleration, from a jackknife that leaves out one patient at a time, or "
            "one of 100 blocks of whole patients when there are more); the plain 2.5–97.5 percentile interval "
            "stays in `metrics.json` as `percentile`.")

PRIMARY_NOTE = ("The **plain** evaluation (one prediction per image) is the primary result; test-time "
                "augmentation is a secondary analysis, compared with it by a paired bootstrap.")


def resample_warning(metrics: EvalResult, share: float = 0.95) -> str | None:
    """One sentence naming the intervals that rest on fewer than ``share`` of the ``bootstrap`` resamples
    drawn (with their real counts), or None."""
    n_boot = int(metrics.bootstrap or 0)
    short = []
    for key in ("plain", "tta", "tta_minus_plain", "co_findings"):
        part = getattr(metrics, key)
        short += short_resamples(part.to_json() if part is not None else None, n_boot, share, key)
    if not short:
        return None
    names = ", ".join(f"{p} ({n})" for p, n in short[:8]) + (f" and {len(short) - 8} more" if len(short) > 8 else "")
    return (f"{len(short)} bootstrap interval(s) rest on fewer than {share:.0%} of the {n_boot} patient resamples "
            f"(resamples lacking a class dropped; valid resamples in brackets): {names}")


def zero_width_intervals(m: BinaryResult) -> list[str]:
    """Names of the bootstrap intervals of one evaluation that have width 0 (``zero_width``)."""
    op = m.operating_point or OperatingPoint()
    cands = [("ROC AUC", m.auc_ci), ("average precision", m.average_precision_ci),
             ("Brier score", m.brier_ci), ("ECE", m.ece_ci)]
    cands += [(f"{k} at the operating point", getattr(getattr(op, k.lower()), "bootstrap", None))
              for k in ("sensitivity", "specificity", "PPV", "NPV", "accuracy")]
    dep = op.at_prevalence
    cands += [(f"{k.upper()} at prevalence {dep.prevalence if dep else None}", getattr(dep, k, None))
              for k in ("ppv", "npv")]
    return [name for name, ci in cands if ci is not None and ci.zero_width]


def threshold_text(t: float) -> str:
    """A threshold as the report prints it: 9 significant digits, all 17 above 1 (the cut above every
    probability, ``metrics.NOTHING_POSITIVE``, would read as 1)."""
    return f"{t:.17g}" if t > 1.0 else f"{t:.9g}"


def two_by_two(op: OperatingPoint, classes: Sequence[str]) -> list[str]:
    """The 2x2 table (images) at the operating point, with its threshold: the table whose sensitivity and
    specificity the report gives (STARD 2015, item 23). Empty without an operating point."""
    if op.threshold is None or op.tp is None:
        return []
    tp, fp, fn, tn = (int(v) for v in (op.tp, op.fp, op.fn, op.tn))
    pos, neg = md(classes[1]), md(classes[0])
    rows = [[f"predicted {pos} (p >= {threshold_text(op.threshold)})", tp, fp, tp + fp],
            [f"predicted {neg} (p < {threshold_text(op.threshold)})", fn, tn, fn + tn],
            ["total", tp + fn, fp + tn, tp + fp + fn + tn]]
    return [f"### 2x2 table at the operating point (threshold {threshold_text(op.threshold)}, `{op.rule}`, "
            f"from {md(op.source)}; plain, images)", "",
            _table(["", f"reference {pos}", f"reference {neg}", "total"], rows, align="lrrr"), "",
            f"TP {tp}, FP {fp}, FN {fn}, TN {tn}: sensitivity {tp}/{tp + fn}, specificity {tn}/{tn + fp} "
            "(`metrics.json` `operating_point.tp/fp/fn/tn`). The tables at `eval.threshold` further down are "
            "secondary.", ""]


def delong_text(d: AucDifference, what: str = "AUCs") -> str:
    """The DeLong sentence beside a paired bootstrap difference (``delong`` of ``metrics.paired_auc_difference``
    or ``metrics.paired_mean_auc_difference``)."""
    t = d.delong
    if t is None or t.z is None:
        return ""
    return (f" DeLong's test of the paired {what}, clustered by patient (Obuchowski 1997): difference "
            f"{_f(t.auc_diff)}, SE {_f(t.se)}, z = {t.z:.2f}, two-sided p = {t.p:.3g}, 95% CI "
            f"[{_f(t.low)}, {_f(t.high)}] over {t.cases} patients; DeLong's original variance takes every "
            "image for an independent case, this form (like the bootstrap) counts patients.")


def op_origin(op: OperatingPoint) -> str:
    """Where an operating point's threshold came from, as the report's row says it."""
    if op.threshold is None:
        return "none"
    return ("chosen on validation" if op.source == "validation"
            else f"{md(op.source)}: not chosen on validation")


def _op(m: BinaryResult) -> OperatingPoint:
    return m.operating_point or OperatingPoint()


def binary_section(plain: BinaryResult, tta: BinaryResult | None, classes: Sequence[str], tta_rounds: int,
                   metrics: EvalResult | None = None) -> str:
    metrics = metrics or EvalResult()
    out = []
    heads = ["", "plain (primary)"] + ([f"TTA (plain + {tta_rounds} augmented; secondary)"] if tta else [])

    def row(name, fn):
        return [name, fn(plain)] + ([fn(tta)] if tta else [])

    def op(k):
        return lambda m: _iv(getattr(_op(m), k))

    rows = [
        row("ROC AUC [95% CI]", lambda m: _vci(m.auc, m.auc_ci)),
        row("average precision [95% CI]", lambda m: _vci(m.average_precision, m.average_precision_ci)),
        row(f"operating point (threshold {op_origin(_op(plain))})", lambda m: (
            f"{_f(_op(m).threshold)} ({_op(m).rule})")),
        row("sensitivity at the operating point", op("sensitivity")),
        row("specificity at the operating point", op("specificity")),
        row("PPV at the operating point (test prevalence)", op("ppv")),
        row("NPV at the operating point (test prevalence)", op("npv")),
        row("accuracy at the operating point", op("accuracy")),
    ]
    dep = _op(plain).at_prevalence
    if dep:
        rows += [row(f"PPV at prevalence {dep.prevalence:g}",
                     lambda m: _iv(getattr(_op(m).at_prevalence, "ppv", None))),
                 row(f"NPV at prevalence {dep.prevalence:g}",
                     lambda m: _iv(getattr(_op(m).at_prevalence, "npv", None)))]
    rows += [
        row("Brier score [95% CI]", lambda m: _vci(m.brier, m.brier_ci)),
        row("ECE, 10 bins [95% CI]", lambda m: _vci(m.ece, m.ece_ci)),
        row(f"accuracy at threshold {plain.threshold:g} (eval.threshold)", lambda m: _f(m.report["accuracy"])),
        row("oracle: Youden's threshold fitted on test (optimistic)", lambda m: (
            f"{_f(m.oracle.threshold)} (sens. {_f(m.oracle.sensitivity, 2)}, "
            f"spec. {_f(m.oracle.specificity, 2)})" if m.oracle is not None and m.oracle.threshold is not None
            else "–")),
    ]
    out += two_by_two(_op(plain), classes)
    out += ["### Summary", "", PRIMARY_NOTE, "", _table(heads, rows), ""]
    ci = plain.auc_ci or AucInterval()
    prev = plain.prevalence
    opm = _op(plain)
    exact = opm.threshold is not None and opm.sensitivity is not None and opm.sensitivity.method == "clopper-pearson"
    out.append(f"Test prevalence {_f(prev)} ({plain.positives} of {plain.n} images positive): PPV, NPV, "
               "precision, F1 and average precision depend on it. "
               + ("Sensitivity, specificity, PPV, NPV and accuracy at the operating point carry exact "
                  "(Clopper-Pearson) 95% intervals with patients as clusters: Kish's design effect "
                  "1 + (m − 1) × ICC with ICC = 1, i.e. the effective sample size is the number of patients in "
                  "each denominator; they hold the threshold fixed (the patient-bootstrap intervals are kept in "
                  "`metrics.json` under `bootstrap`). Every other interval" if exact else "Every interval")
               + " is a bias-corrected and accelerated (BCa) bootstrap interval over "
               f"{_or(ci.n_boot, 0)} resamples that draw **patients** with replacement "
               f"({plain.patients} patients, {plain.n} images): images of one patient are not independent. "
               f"{BCA_NOTE} "
               "A resample without both classes is dropped from the statistics that need both: the ROC AUC's "
               f"interval rests on {_or(ci.n_valid, 0)} of {_or(ci.n_boot, 0)} resamples, and `metrics.json` "
               "gives `n_valid` beside every interval.")
    flat = zero_width_intervals(plain)
    if flat:
        out.append(f"**Zero-width bootstrap interval** for {', '.join(flat)}: every resample gave the same value, "
                   "which does not mean there is no uncertainty (an exact interval says how much).")
    if opm.threshold is not None and opm.source == "validation":
        out.append(f"The operating point's threshold was chosen by `{opm.rule}` on the validation split "
                   "and applied unchanged to the test split; the oracle row is for comparison only.")
    elif opm.threshold is not None:
        out.append(f"The operating point's threshold is `{opm.rule}` ({md(opm.source)}), not chosen on "
                   "the validation split; the oracle row is for comparison only.")
    d = metrics.tta_minus_plain
    if d and d.auc_diff is not None:
        out.append(f"TTA minus plain, ROC AUC: {_f(d.auc_diff)} [{_f(d.low)}, {_f(d.high)}] "
                   f"(paired BCa bootstrap, the same {d.n_valid} patient resamples for both)." + delong_text(d))
    out.append("")
    out += [f"### Classification report at threshold {plain.threshold:g} (`eval.threshold`; secondary, not the "
            "operating point)", ""]
    names = list(classes) + ["macro avg", "weighted avg"]
    cols = ["class", "precision", "recall", "F1", "support"]
    if tta:
        cols += ["TTA precision", "TTA recall", "TTA F1"]
    rows = []
    for n in names:
        a = plain.row(n)
        r = [md(n), _f(a.precision, 2), _f(a.recall, 2), _f(a.f1_score, 2), a.support]
        if tta:
            b = tta.row(n)
            r += [_f(b.precision, 2), _f(b.recall, 2), _f(b.f1_score, 2)]
        rows.append(r)
    acc = ["accuracy", "", "", _f(plain.report["accuracy"], 2), plain.n]
    if tta:
        acc += ["", "", _f(tta.report["accuracy"], 2)]
    rows.append(acc)
    out += [_table(cols, rows), ""]
    left = format_class_table(_table_json(plain.report), title="without TTA")
    text = format_side_by_side(left, format_class_table(_table_json(tta.report),
                                                        title=f"with TTA (plain + {tta_rounds} augmented)")) \
        if tta else left
    out += ["In the article's (scikit-learn) form:", "", fence(text), text, fence(text), ""]

    cm = plain.confusion_matrix
    out += [f"### Confusion matrix at threshold {plain.threshold:g} (plain; secondary, not the operating point)", "",
            _table(["true \\ predicted"] + [md(c) for c in classes],
                   [[md(classes[i])] + [cm[i][j] for j in range(len(classes))] for i in range(len(classes))]), ""]

    sub = plain.subgroups or {}
    if sub:
        out += ["### AUC by subgroup", ""]
        rows = []
        for g, vals in sub.items():
            for k, v in vals.items():
                t = _subgroup(tta, g, k)
                rows.append([f"{g} = {md(k)}", v.n, v.positives, _vci(v.auc, v.auc_ci)
                             if v.auc is not None else "– (one class only)"] + ([_f(t)] if tta else []))
        out += [_table(["subgroup", "images", "positives", "AUC [95% CI]"] + (["TTA AUC"] if tta else []), rows), ""]
        out.append("AUC is reported only where both classes are present in the subgroup.")
        out.append("")
    return "\n".join(out)


def multilabel_section(plain: MultilabelResult, tta: MultilabelResult | None, tta_rounds: int) -> str:
    names = list(plain.findings)
    cols = ["Pathology", "AUROC", "95% CI (BCa, by patient)"] + ([f"TTA ({tta_rounds})"] if tta else []) + \
        ["positives", "CheXNet (ref.)"]
    rows = []
    for n in names:
        f = plain.findings[n]
        r = [md(n.replace("_", " ")), _f(f.auc), _ci(f.auc_ci)]
        if tta:
            r.append(_f(tta.findings[n].auc))
        r += [f.positives, _f(f.chexnet_auc, 4)]
        rows.append(r)
    ref = [CHEXNET_AUC[_norm_name(n)] for n in names if _norm_name(n) in CHEXNET_AUC]
    mean = ["**Mean AUROC**", f"**{_f(plain.mean_auc)}**", ""] + ([f"**{_f(tta.mean_auc)}**"] if tta else []) + \
        ["", _f(sum(ref) / len(ref), 4) if ref else "–"]
    rows.append(mean)
    out = ["### AUROC per finding (the form of CheXNet's table)", "", _table(cols, rows), "",
           f"Mean over the {plain.findings_with_auc} findings with both classes in the test split. "
           "The CheXNet column is Rajpurkar et al. (2017) on THEIR patient split and a DenseNet-121 at "
           "224 px: a reference point, not a like-for-like comparison.", ""]
    rep = plain.report
    rows = [[md(n.replace("_", " ")), _f(rep[n].precision, 2), _f(rep[n].recall, 2), _f(rep[n].f1_score, 2),
             rep[n].support] for n in names]
    for k in ("micro avg", "macro avg", "weighted avg", "samples avg"):
        if k in rep:
            rows.append([k, _f(rep[k].precision, 2), _f(rep[k].recall, 2), _f(rep[k].f1_score, 2),
                         rep[k].support])
    out += [f"### Per-finding table at threshold {plain.threshold:g}", "",
            _table(["finding", "precision", "recall", "F1", "support"], rows), "",
            f"Exact-match (all {len(names)} findings right) accuracy: {_f(rep['accuracy'])}.", ""]
    return "\n".join(out)


PREPROCESSING_NOTE = ("The network sees each image through the backbone's own ImageNet preprocessing (in the model: "
                      "gray to RGB, then `preprocess_input`, for VGG16 the ImageNet channel means subtracted), not "
                      "standardised by the training split's mean/std that prep records in `manifest.json`: the "
                      "pretrained weights expect the input statistics they were trained with, and a saved model that "
                      "takes raw pixels cannot be fed differently by mistake. The mean/std are kept for reference.")

NEGATIVE_RULES = {
    "no_finding": "images labelled only `No Finding` (the article's task: clean negatives, easier than one-vs-rest)",
    "all_others": "every other image, with or without other findings (one-vs-rest, the task of the published "
                  "per-finding AUCs such as CheXNet's)",
}


def _layer_span(names: list) -> str:
    return "none" if not names else md_code(names[0]) if len(names) == 1 else \
        f"{md_code(names[0])} .. {md_code(names[-1])}"


def trained_layers_text(metrics: EvalResult) -> str:
    """What each phase trained, from the trainer's record (``trained_layers.json``): backbone layers
    frozen and trained (first .. last), and trainable parameters."""
    rec = metrics.trained_layers
    if not isinstance(rec, dict) or not rec:
        return "trained layers not recorded (trained before the record existed)"
    out = []
    for phase in ("warmup", "finetune"):
        d = rec[phase] if phase in rec else None
        if not isinstance(d, PhaseLayers):
            continue
        frozen, trained = list(d.frozen or []), list(d.trained or [])
        out.append(f"{phase}: {len(frozen)} of {_or(d.backbone_layers, len(frozen) + len(trained))} backbone layers "
                   f"frozen ({_layer_span(frozen)}), {len(trained)} trained ({_layer_span(trained)}) and the head, "
                   f"{int(_or(d.trainable_params, 0)):,} trainable parameters")
    return "; ".join(out) or "trained layers not recorded"


def checkpoint_text(sc: SelectedCheckpoint | None) -> str:
    if not sc:
        return "–"
    vl = f", val_loss {sc.val_loss:.4f}" if sc.val_loss is not None else ""
    where = f"{sc.phase} phase, epoch {sc.epoch}" if sc.phase else "epoch unknown"
    return f"{md_code(sc.file)}: {where}{vl} ({md(sc.rule)})"


def _or(value, default):
    """``value``, or ``default`` when it is missing (None): what a reader of an older metrics.json sees."""
    return default if value is None else value


def _split_method(metrics: EvalResult) -> str:
    return _or(metrics.split_method, "seeded")


# The binary task's rule as each data.format reads it (data_prep.datasets); NIH's words are NEGATIVE_RULES.
FORMAT_POSITIVES = {
    "chexpert": "every image whose **{label}** observation is positive (1.0; an uncertain -1.0 as "
                "`data.uncertain` says), with or without other observations",
    "csv": "every image whose label **{label}** is 1, whatever its other labels",
}
FORMAT_NEGATIVES = {
    ("chexpert", "no_finding"): "images whose `No Finding` is 1, or with no other observation positive or uncertain",
    ("csv", "no_finding"): "images with every label 0",
}


def _rule_text(fmt: str, td: TaskDefinition) -> tuple[str, str]:
    """(positives, negatives) of the binary task in the words of its data format."""
    label, rule = md(td.positive_label), td.negative_rule
    if fmt in FORMAT_POSITIVES:
        neg = FORMAT_NEGATIVES.get((fmt, rule), f"every other image (the label **{label}** 0)")
        return FORMAT_POSITIVES[fmt].format(label=label), neg
    return (f"every image whose Finding Labels include **{label}**, with or without other findings",
            NEGATIVE_RULES[rule] if rule in NEGATIVE_RULES else md(rule))


def task_section(metrics: EvalResult, cfg) -> str:
    td = metrics.task_definition or TaskDefinition()
    fmt = (metrics.labels.format if metrics.labels else None) or "nih"
    out = ["## Task", ""]
    if metrics.task != "binary":
        out += ["Multi-label: one sigmoid output per finding of the 14; an image can carry several." if fmt == "nih"
                else f"Multi-label: one sigmoid output per finding ({len(metrics.classes or [])}, `data.format: "
                     f"{md(fmt)}`); an image can carry several.", ""]
        return "\n".join(out)
    rule = td.negative_rule
    positives, negatives = _rule_text(fmt, td)
    out.append(f"Positives: {positives}. Negatives (`data.negative_rule: {rule}`): {negatives}. Split: "
               f"{md(_split_method(metrics))} by patient.")
    co = metrics.co_findings
    if co:
        out += ["", f"{co.positives_with_co_findings} of {co.positives} test positives carry other findings "
                    f"besides {md(td.positive_label)}. ROC AUC against the same negatives (plain, 95% CI by "
                    "patient):", "",
                _table(["positives", "images", "positive images", "negative images", "ROC AUC [95% CI]"], [
                    [name, _or(c.images, "–"), c.positives, _or(c.negatives, "–"), _iv(c)]
                    for name, c in (("with co-findings", co.auc_with), ("without co-findings", co.auc_without))],
                       "lrrrr")]
    else:
        out += ["", "_Co-findings not counted: the shards record no findings._"]
    if fmt == "nih":  # the published figures are ChestX-ray14's
        out += ["", "Published patient-split AUCs for Infiltration (about 0.68–0.73, CheXNet 0.7345) are one-vs-rest "
                    "(`negative_rule: all_others`); with `no_finding` the negatives are clean and the AUC is not "
                    "comparable with them."]
    out.append("")
    return "\n".join(out)


def calibration_section(plain: BinaryResult, tta: BinaryResult | None, metrics: EvalResult | None) -> str:
    out = ["### Calibration", ""]
    rows = [["plain (raw model output)", _vci(plain.brier, plain.brier_ci), _vci(plain.ece, plain.ece_ci)]]
    if tta:
        rows.append(["TTA", _vci(tta.brier, tta.brier_ci), _vci(tta.ece, tta.ece_ci)])
    c = plain.calibrated
    if c:
        rows.append(["plain, calibrated (`calibrated_probability`)", _vci(c.brier, c.brier_ci), _vci(c.ece, c.ece_ci)])
    out += [_table(["probabilities", "Brier score [95% CI]", "ECE (10 equal-width bins) [95% CI]"], rows), ""]
    if c:
        what = []
        if c.method == "temperature":
            v = c.validation
            before, after = getattr(v, "before", None), getattr(v, "after", None)
            what.append(f"temperature {c.temperature:.3f} fitted on the validation split (Brier "
                        f"{_f(getattr(before, 'brier', None))} before, {_f(getattr(after, 'brier', None))} "
                        f"after; ECE {_f(getattr(before, 'ece', None))} before, "
                        f"{_f(getattr(after, 'ece', None))} after (validation, in-sample): fitted and measured "
                        "on the same images, optimistic; the test rows above are the out-of-sample check)")
        if c.prior_correction:
            tp = getattr(metrics.prevalence if metrics else None, "train", None)
            src = c.target_source or "the natural prevalence"
            what.append(f"prior correction from the training split's prevalence {_f(tp)} to "
                        f"{_f(c.target_prevalence)} ({md(src)}; never the test labels; logit shift "
                        f"{c.shift:+.3f})")
        form = "`sigmoid((logit(p) - center) / temperature + center + shift)` with center = logit of the " \
            f"training prevalence ({c.center:+.3f}), i.e. the temperature scales the log-odds around the " \
            "training prior" if c.center is not None else "`sigmoid(logit(p) / temperature + shift)`"
        if c.warning:
            out += [f"> **Warning:** {md(c.warning)}.", ""]
        out.append("Calibrated probabilities: " + "; ".join(what) + ". The transform is "
                   f"{form}, saved in `calibration.json`, and `cxr-predict` applies "
                   "it to this model. On a test split at another prevalence than the target, prior-corrected "
                   "probabilities are expected to look miscalibrated.")
    else:
        out.append("No calibration applied (`eval.calibrate: none`, `eval.prior_correction: false`): the probabilities "
                   "are the network's softmax, trained at the training split's class proportions.")
    out.append("")
    return "\n".join(out)


GRID_NAMES = {"true_positives": "true positives", "false_positives": "false positives",
              "false_negatives": "false negatives"}


def grids_written(out_dir, gradcam: Mapping[str, str] | None) -> list[str]:
    """The Grad-CAM grids this evaluation wrote that exist on disk (keys of GRID_NAMES, in that order)."""
    gradcam = gradcam or {}
    return [k for k in GRID_NAMES if k in gradcam and (out_dir is None or (Path(out_dir) / gradcam[k]).is_file())]


def calibration_fact(out_dir, metrics: EvalResult) -> str:
    """What calibration the evaluation wrote: ``calibration.json``'s transform, or none."""
    plain = metrics.plain
    f = Path(out_dir) / rundir.CALIBRATION if out_dir is not None else None
    cal = None
    if f is not None and f.is_file():
        try:
            import json

            cal = json.loads(f.read_text())
        except (OSError, ValueError):
            cal = None
    head = f"Brier {_f(plain.brier)}, ECE {_f(plain.ece)} of the network's probabilities; "
    if cal and plain.calibrated:
        what = [f"temperature {float(cal['temperature']):.3f}"
                + (" fitted on validation" if cal.get("method") == "temperature" else ""),  # calibration.json
                f"shift {float(cal['shift']):+.3f}" + (" (prior correction)" if cal.get("prior_correction") else "")]
        c = plain.calibrated
        return head + (f"calibrated by `calibration.json` ({', '.join(what)}): Brier {_f(c.brier)}, "
                       f"ECE {_f(c.ece)}")
    if plain.calibrated:
        return head + "calibrated in metrics.json, but no `calibration.json` was found beside this report"
    return head + "not calibrated (no `calibration.json`)"


def exclusion_fact(metrics: EvalResult, manifest: Mapping) -> str:
    """Every exclusion from the CSV rows to the shards (task rule, caps, prep's skips), from the flow; without one
    only prep's skips are known, and the answer says so."""
    flow = _flow(metrics.flow)
    if fl.valid(flow):
        return flow_exclusions(flow)[:-1] + " (the flow table under Data; prep's skips in `manifest.json`, `skipped`)"
    return (f"flow not recorded (a prep older than it): {len(manifest.get('skipped') or [])} image(s) skipped by prep "
            "(reasons in `manifest.json`, `skipped`); the images the task rule and the caps excluded are not counted")


def operating_fact(metrics: EvalResult) -> str:
    op = metrics.chosen_operating_point()
    if metrics.task != "binary":
        return f"none: per-finding decisions at eval.threshold {metrics.plain.threshold:g}"
    if op.threshold is None:
        return f"none: {md(op.note or 'no threshold')}"
    where = "chosen on the validation split and applied unchanged to test" if op.source == "validation" else \
        f"from {md(op.source)}, not fitted on the validation split"
    return (f"threshold {op.threshold:.4g} ({md_code(op.rule)}), {where}; `operating_point.json` holds it "
            "for `cxr-predict`")


def _has_ci(x) -> bool:
    return x is not None and x.low is not None


def _sort_ci(pairs, boot: list, exact: list, none: list) -> None:
    """Each (name, interval) into the bootstrap (as (name, method)), exact (Clopper-Pearson) or no-interval list."""
    for name, ci in pairs:
        if not _has_ci(ci):
            none.append(name)
        elif ci.method == "clopper-pearson":
            exact.append(name)
        else:
            boot.append((name, ci.method or "percentile"))


def _boot_kind(boot: list) -> str:
    """The bootstrap intervals' kind, from the ``method`` they record (none recorded: percentile)."""
    kinds = {m for _, m in boot}
    names = {"bca": "BCa", "percentile": "percentile", "bootstrap": "percentile"}
    if len(kinds) != 1:
        return "patient bootstrap (BCa or percentile: `method` in `metrics.json`)"
    kind = kinds.pop()
    return f"{names[kind] if kind in names else ''} patient bootstrap".lstrip()


def _interval_lists(metrics: EvalResult) -> tuple[list, list, list]:
    """(bootstrap, exact, none): the binary numbers of metrics.json by the interval they carry."""
    plain = metrics.plain
    op = _op(plain)
    dep = op.at_prevalence
    c = plain.calibrated
    co = metrics.co_findings
    boot, exact = [], []
    none = ["the classification report and accuracy at `eval.threshold`", "the oracle row"]
    pairs = [(f"ROC AUC {_vci(plain.auc, plain.auc_ci)}", plain.auc_ci),
             ("average precision", plain.average_precision_ci), ("Brier score", plain.brier_ci),
             ("ECE", plain.ece_ci)]
    pairs += [(f"{k} at the operating point", getattr(op, k.lower()))
              for k in ("sensitivity", "specificity", "PPV", "NPV", "accuracy") if op.threshold is not None]
    pairs += [(f"{k} at prevalence {dep.prevalence}", getattr(dep, k.lower())) for k in ("PPV", "NPV") if dep]
    groups = [v.auc_ci for g in (plain.subgroups or {}).values() for v in g.values()]
    if groups:
        pairs.append(("subgroup AUCs" + ("" if all(map(_has_ci, groups)) else " (where both classes are present)"),
                      Interval(low=0) if any(map(_has_ci, groups)) else None))
    pairs += [(f"calibrated {k}", getattr(c, f"{k.lower().split()[0]}_ci")) for k in ("Brier score", "ECE") if c]
    pairs += [(f"AUC of the positives {w} co-findings", getattr(co, f"auc_{w}")) for w in ("with", "without") if co]
    if metrics.tta_minus_plain:
        pairs.append(("TTA minus plain ROC AUC (paired)", metrics.tta_minus_plain))
    _sort_ci(pairs, boot, exact, none)
    if c is not None and c.validation is not None and c.validation.before:
        none.append("the validation Brier score and ECE before and after calibration (in-sample)")
    if c is not None and c.method == "temperature":
        none.append("the fitted temperature")
    if metrics.decision_curve:
        none.append("the decision curve's net benefits")
    return boot, exact, none


def intervals_fact(metrics: EvalResult) -> str:
    """Which numbers carry 95% intervals, of which kind, and which have none: each listed from metrics.json,
    never "every other number"."""
    plain, n_boot = metrics.plain, metrics.bootstrap
    if metrics.task != "binary":
        cis = [f.auc_ci for f in plain.findings.values() if _has_ci(f.auc_ci)]
        boot = [("per-finding ROC AUC", cis[0].method or "percentile")] if cis else []
        none = [] if boot else ["per-finding ROC AUC"]
        d = metrics.tta_minus_plain
        boot += [("TTA minus plain mean AUC (paired)", d.method or "percentile")] if _has_ci(d) else []
        none += ["the mean AUC", "the per-finding precision, recall and F1 at `eval.threshold`",
                 "the exact-match accuracy"]
        exact = []
    else:
        boot, exact, none = _interval_lists(metrics)
    parts = []
    if boot:
        parts.append(f"{_boot_kind(boot)} ({n_boot} resamples; `n_valid` beside each in `metrics.json`): "
                     + ", ".join(name for name, _ in boot))
    if exact:
        parts.append(", ".join(exact) + ": exact Clopper-Pearson, effective n = patients, threshold held fixed")
    if metrics.tta and (boot or exact):
        parts.append("the TTA column likewise")
    return "; ".join(parts + ["without intervals: " + ", ".join(none)])


def claim_checklist(metrics: EvalResult, manifest: Mapping | None, cfg, out_dir=None) -> str:
    """CLAIM (Checklist for Artificial Intelligence in Medical Imaging, Mongan et al. 2020) items the tool can
    answer, answered from what the evaluation wrote into ``out_dir`` and counted; the others listed for the author."""
    manifest = manifest or {}
    sp = manifest.get("splits") or {}
    prev = metrics.prevalence.items() if metrics.prevalence else ()
    versions = manifest.get("versions") or {}
    plain = metrics.plain
    sc = metrics.selected_checkpoint
    prov = metrics.provenance
    counts = "; ".join(f"{md(k)}: {v.get('count', '–')} images, {v.get('patients', '–')} patients"
                       for k, v in sp.items())
    grids = grids_written(out_dir, metrics.gradcam)
    missing = [GRID_NAMES[k] for k in GRID_NAMES if k not in grids]
    if grids:
        failure = "Grad-CAM grids of " + ", ".join(GRID_NAMES[k] for k in grids) + \
            (f"; none of {' or '.join(missing)} (no such test images at the threshold, or not drawn)"
             if missing else "")
    else:
        failure = "no Grad-CAM grids (eval.gradcam_per_group = 0, or none drawn)"
    split = f"{md(_split_method(metrics))}, by patient. {_leakage(prov)}"
    if prov is not None and prov.evaluation == "external":
        split += " External evaluation: the test data is another prep than the one the model trained on."
    rows = [
        ["Data source and version", f"metadata {md_code(cfg.data.csv)}, images below {md_code(cfg.data.images)}; prep "
                                    f"format {md(manifest.get('format', '–'))}, prep hash "
                                    f"{md(manifest.get('config_hash', '–'))} "
                                    "(the CSV's release is the author's to state)"],
        ["Inclusion / exclusion", f"task {md(metrics.task)}; {exclusion_fact(metrics, manifest)}; per split: "
                                  + (counts or "–")],
        ["Split and leakage control", split + " Only the training split is resampled."],
        ["Prevalence per split", ", ".join(f"{md(k)} {_f(v)}" for k, v in prev if v is not None) or "–"],
        ["Preprocessing", f"{metrics.image_size} px, per-image min-max to uint8, the backbone's ImageNet "
                          "preprocessing (not the train mean/std)"],
        ["Model and pretrained weights", f"{md(cfg.model.backbone)}, weights {md_code(cfg.model.weights)}, head Dense "
                                         f"{cfg.model.dense_units} + dropout {cfg.model.dropout}"],
        ["Training recipe", f"warm-up {cfg.train.warmup.epochs} epoch(s) ({cfg.train.warmup.optimizer}), fine-tune up "
                            f"to {cfg.train.finetune.epochs} ({cfg.train.finetune.optimizer} "
                            f"lr {cfg.train.finetune.lr:g}), "
                            f"early stopping {cfg.train.finetune.patience}; {trained_layers_text(metrics)}; "
                            f"evaluated {checkpoint_text(sc)}"],
        ["Metrics with intervals", intervals_fact(metrics)],
        ["Operating point", operating_fact(metrics)],
        ["Calibration", calibration_fact(out_dir, metrics) if metrics.task == "binary" else "–"],
        ["Subgroups", ("AUC with 95% CI by " + ", ".join(md(k) for k in _subgroups(plain)))
         if _subgroups(plain) else "–"],
        ["Failure cases", failure],
        ["Software", ", ".join(f"{md(k)} {md(v)}" for k, v in versions.items()) if versions else "–"],
    ]
    author = ["Clinical question and intended use", "Reference standard and its reliability (NIH labels are mined "
              "from reports by NLP)", "Ethics approval and data licence", "External validation", "Comparison with "
              "radiologists", "Limitations and generalisability", "Code and data availability statement"]
    return "\n".join(["## Reporting checklist (CLAIM)", "",
                      "Items of CLAIM (Checklist for Artificial Intelligence in Medical Imaging) this tool can answer:",
                      "", _table(["item", "answer"], rows, "ll"), "",
                      "Only the author can answer: " + "; ".join(author) + ".", ""])


def decision_note(dc: DecisionCurve) -> str:
    """What the decision curve shows and at which prevalence (``metrics.json`` ``decision_curve``)."""
    lo, hi = dc.threshold_range or (None, None)
    above = dc.model_above_both
    where = (f"at {above.thresholds} of the thresholds (lowest {above.lowest:g}, highest {above.highest:g})"
             if above is not None and above.thresholds else "at none of the thresholds")
    return (f"Net benefit = TP/n − FP/n × pt/(1 − pt) (Vickers & Elkin 2006) of the plain probabilities "
            f"(`probability` in `predictions.csv`, positive when p >= pt) at threshold probabilities pt from {lo:g} "
            f"to {hi:g}, against treating every image as positive and treating none; every value is in "
            f"{md_code(dc.file)}. It holds at **the test set's prevalence** ({_f(dc.prevalence)}, "
            f"{dc.n} images), which prep's per-class caps or balancing may have set (see the flow under "
            "Data), not at a clinical prevalence; and pt is read as the model's probability, meaningful as far as "
            f"it is calibrated. The model's net benefit exceeds both {where}. No intervals.")


def _calibrated(metrics: EvalResult):
    """The plain evaluation's calibrated record (binary, with a calibration), else None."""
    return getattr(metrics.plain, "calibrated", None)


def _subgroups(m) -> dict:
    return getattr(m, "subgroups", None) or {}


def _subgroup(m: BinaryResult | None, group: str, key: str):
    """The AUC of one subgroup of ``m`` (the TTA column), None when it has none."""
    vals = _subgroups(m)
    v = vals[group][key] if group in vals and key in vals[group] else None
    return v.auc if v is not None else None


def _table_json(report: Mapping) -> dict:
    """A classification report as ``metrics.format_class_table`` reads it."""
    return {k: (v.to_json() if hasattr(v, "to_json") else v) for k, v in report.items()}


def fitted_on_validation(metrics: EvalResult) -> str:
    """What this evaluation fitted on the validation predictions, from metrics.json."""
    op = metrics.operating_point or OperatingPoint()
    c = _calibrated(metrics)
    what = (["the operating point"] if op.threshold is not None and op.source == "validation" else []) + \
        (["the temperature"] if c is not None and c.method == "temperature" else [])
    return f"{' and '.join(what)} fitted on it" if what else "nothing was fitted on it"


def validation_section(metrics: EvalResult) -> str:
    """What the validation split chose (checkpoint, threshold, temperature) and whether the test split is
    internal (the same source and prep as training) or an external evaluation, from metrics.json's facts."""
    plain = metrics.plain
    sc = metrics.selected_checkpoint
    rule = sc.rule if sc is not None else None
    by_val = "val_loss" in str(rule or "")
    rows = [["checkpoint", checkpoint_text(sc) if sc else "–",
             "yes (lowest validation loss)" if by_val else f"no ({md(rule or 'unknown')})"]]
    op = metrics.chosen_operating_point()
    if metrics.task != "binary":
        rows.append(["threshold", f"`eval.threshold` {plain.threshold:g} for every finding", "no (fixed)"])
    elif op.threshold is None:
        rows.append(["threshold", f"none: {md(op.note or 'no operating point')}", "–"])
    else:
        rows.append(["threshold", f"{threshold_text(op.threshold)} ({md_code(op.rule)})",
                     "yes" if op.source == "validation" else f"no ({md(op.source)})"])
    c = _calibrated(metrics)
    if c is not None and c.method == "temperature":
        rows.append(["temperature", f"{c.temperature:.4g}", "yes (validation log loss)"])
    else:
        rows.append(["temperature", "none" + (" (prior correction only)" if c else " (`eval.calibrate: none`)"),
                     "–"])
    if c is not None and c.prior_correction:
        src = str(c.target_source or "manifest")
        rows.append(["prior-correction target", f"prevalence {_f(c.target_prevalence)} ({md(src)})",
                     "no: stated (`eval.prevalence`)" if src == "eval.prevalence" else
                     "in part: the train and validation labels, never the test labels"])
    out = ["### What validation chose", "", _table(["choice", "value", "chosen on the validation split"], rows,
                                                   "lll"), "",
           "The test split is used only to measure these choices, unchanged"
           + ("; the oracle row is the one number fitted on test (for comparison). Intervals at the operating "
              "point hold the threshold fixed: they do not include the uncertainty of choosing it on validation."
              if metrics.task == "binary" else "."), ""]
    prov = metrics.provenance
    kind = prov.evaluation if prov is not None else None
    if kind == "internal":
        out.append("**Internal test set:** the test patients come from the same data source and the same prep as "
                   "the training and validation patients (split by patient). These results estimate performance on "
                   "that source only; they are not an external validation (other hospitals, scanners, populations).")
    elif kind == "external":
        out.append("**External evaluation:** the evaluated data are another prep than the one the model trained on "
                   f"({provenance_text(prov)}). It is external to the training data as far as that prep's images "
                   "come from another source.")
    else:
        out.append("Whether the test split is internal or external was **not verified** (no record of the "
                   "training prep in the run folder); read it as internal (same source) unless known otherwise.")
    out.append("")
    return "\n".join(out)


def provenance_text(prov: Provenance | None) -> str:
    """The report header's row on the data evaluated: the run's own prep, or an external one and its overlap."""
    if not prov:
        return "–"
    ev, tr = prov.evaluated_on or PrepSummary(), prov.trained_on

    def name(i):
        return (f"{md_code(i.prep_out)} (prep.seed {md(i.prep_seed)} per its manifest, sha256 "
                f"{md(str(i.manifest_sha256)[:12])})")
    if prov.evaluation == "unverified":
        return f"{name(ev)}; **not verified** to be the prep the model trained on (nothing recorded in the run folder)"
    if prov.evaluation != "external":
        return f"the prep the model trained on: {name(ev)}"
    sh = prov.shared
    overlap = (f"patients shared with the model's training split: **{sh.train_test} of {sh.patients['test']} "
               f"test, {sh.train_val} of {sh.patients['val']} validation**"
               + (" (eval.allow_overlap: true)" if (sh.train_test or sh.train_val) else "")) if sh else \
        "**overlap with the training patients not checked** (eval.allow_overlap: true)"
    return (f"**external evaluation**: {name(ev)}, not the prep the model trained on"
            + (f" ({name(tr)})" if tr else "") + f"; {overlap}")


def write_report(run_dir, *, cfg, manifest: Mapping | None, metrics: EvalResult, plots: Mapping[str, str],
                 gradcam: Mapping[str, str], config_yaml: str, console: str = "") -> Path:
    """Write ``report.md`` into ``run_dir``; image paths in ``plots``/``gradcam`` are relative."""
    out_dir = Path(run_dir)
    source = Path(metrics.run_dir or out_dir)
    name = cfg.run.name or source.name
    plain, tta = metrics.plain, metrics.tta
    lines = [f"# Evaluation report: {md(name)}", "",
             f"Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by `cxr-eval` from the run directory "
             f"{md_code(source)}" + (f" into {md_code(out_dir)}" if out_dir != source else "") + ".", "",
             _table(["", ""], [
                 ["task", metrics.task + (f" — positive class **{md(metrics.classes[-1])}**"
                                          if metrics.task == "binary"
                                          else f" — {len(metrics.classes)} findings")],
                 ["model", f"{md_code(metrics.model)} (eval.checkpoint = {metrics.checkpoint})"],
                 ["evaluated data", provenance_text(metrics.provenance)],
                 ["selected checkpoint", checkpoint_text(metrics.selected_checkpoint)],
                 ["split method", f"{_split_method(metrics)}, by patient"],
                 ["backbone", f"{cfg.model.backbone} (weights: {cfg.model.weights}), {metrics.image_size} px"
                              + backbone_note(cfg.model)],
                 *([["precision", f"trained in {metrics.precision.training}, evaluated in "
                                  f"{metrics.precision.evaluation} (runtime.precision; "
                                  "probabilities are float32)"]]
                   if metrics.precision else []),
                 ["test set", f"{metrics.n} images of {plain.patients} patients"
                  + (f"; prevalence {_f(plain.prevalence)} (natural prevalence of the task "
                     f"{_f(getattr(metrics.prevalence, 'natural', None))})"
                     if metrics.task == "binary" else "")],
                 ["preprocessing", "the backbone's ImageNet preprocessing, not the train mean/std (see Data)"],
                 ["evaluation", f"{metrics.ranks} rank(s), {metrics.seconds:.1f} s; test-time augmentation: "
                                + (f"{metrics.tta_rounds} rounds" if tta else "off")],
             ], "ll"), "",
             task_section(metrics, cfg),
             "## Data", "", data_section(manifest, metrics.provenance), "", labelpolicy.report_line(metrics.labels), "",
             flow_section(metrics.flow), "", PREPROCESSING_NOTE, ""]
    lines += ["## Results", ""]
    for warning in (metrics.warnings or []) + ([short] if (short := resample_warning(metrics)) else []):
        lines += [f"> **Warning:** {md(warning)}.", ""]
    lines.append(validation_section(metrics))
    rounds = _or(metrics.tta_rounds, 0)
    if metrics.task == "binary":
        lines.append(binary_section(plain, tta, metrics.classes, rounds, metrics))
        lines.append(calibration_section(plain, tta, metrics))
    else:
        lines.append(multilabel_section(plain, tta, rounds))
        d = metrics.tta_minus_plain
        if d and d.auc_diff is not None:
            lines += [PRIMARY_NOTE + " TTA minus plain, mean AUROC over the "
                      f"{d.findings} findings with both classes "
                      f"in the test split: {_f(d.auc_diff)} [{_f(d.low)}, {_f(d.high)}] (paired BCa bootstrap "
                      f"on {d.n_valid} of {d.n_boot} patient resamples: "
                      "every resample averages the same findings, "
                      "and one lacking a class of any of them is dropped)." + delong_text(d, "mean AUCs"), ""]
    if tta:
        lines += [TTA_NOTE.format(n=metrics.tta_rounds + 1, rounds=metrics.tta_rounds), ""]

    if plots:
        lines += ["## Plots", ""]
        op = metrics.operating_point or OperatingPoint()
        titles = {"roc": "ROC curve (shaded: 95% pointwise band over patient resamples"
                         + (f"; dot: the operating point, {op_origin(op)}" if op.threshold is not None else "")
                         + ")",
                  "pr": "Precision-recall curve", "confusion": "Confusion matrix",
                  "calibration": "Reliability diagram (calibration; 10 equal-width bins, marker size ~ images)",
                  "roc_per_finding": "ROC curve per finding",
                  "history": "Training curves (the dotted line marks the switch from warm-up to fine-tuning)"}
        titles["decision_curve"] = "Decision curve (net benefit against treat-all and treat-none)"
        for k, rel in plots.items():
            lines += [f"**{titles[k] if k in titles else k}**", "", f"![{k}]({rel})", ""]
            if k == "decision_curve" and metrics.decision_curve:
                lines += [decision_note(metrics.decision_curve), ""]
    else:
        lines += ["## Plots", "", "_none_", ""]

    lines += ["## Grad-CAM", ""]
    if gradcam:
        lines += ["Heat maps of the positive class score on layer "
                  f"{md_code(_or(metrics.gradcam_layer, '?'))} over the "
                  "network's input image, for the most confident cases of each group.", ""]
        for k, rel in gradcam.items():
            lines += [f"**{k.replace('_', ' ')}**", "", f"![{k}]({rel})", ""]
    else:
        lines += ["_No Grad-CAM grids (eval.gradcam_per_group = 0 or no such cases)._", ""]

    if console:
        lines += ["## Console output", "", fence(console), console.rstrip(), fence(console), ""]
    lines += ["## Configuration", "", "The resolved configuration of this evaluation (also in `eval_config.yaml`):", "",
              fence(config_yaml) + "yaml", config_yaml.rstrip(), fence(config_yaml), "",
              "## Files", "",
              "- `predictions.csv`: one row per test image (probability, and with TTA `tta_probability`)",
              f"- `val_predictions.csv`: the same for the validation split ({fitted_on_validation(metrics)})",
              "- `metrics.json`: every number above", "- `plots/`, `gradcam/`: the images above",
              "- `eval_config.yaml`: the configuration of this evaluation"]
    if (out_dir / rundir.CALIBRATION).is_file():
        lines.append("- `calibration.json`: the probability transform fitted on validation, for `cxr-predict`")
    if (out_dir / rundir.DECISION_CURVE).is_file():
        lines.append("- `decision_curve.csv`: the decision curve's net benefits, from `predictions.csv`")
    if (out_dir / rundir.OPERATING_POINT).is_file():
        lines.append("- `operating_point.json`: the operating point's threshold, with which `cxr-predict` decides")
    lines.append("")
    lines.append(claim_checklist(metrics, manifest, cfg, out_dir))
    return atomic_write_text(out_dir / rundir.REPORT, "\n".join(lines))
