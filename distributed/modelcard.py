"""``MODEL_CARD.md`` of an exported bundle, generated from the run (:mod:`distributed.export`).

Every number is copied from the run's ``metrics.json`` (through ``model.json``) and printed with
:func:`num` (4 decimals), so a test finds each one. Text from the data or the config (class names,
paths) goes through ``data_prep.textsafe``. A Grad-CAM grid is linked only when the bundle holds it.
No TensorFlow.
"""
from __future__ import annotations

import shlex
from collections.abc import Mapping

from data_prep.textsafe import fence, md, md_code
from distributed import results

__all__ = ["model_card", "num", "interval"]

GRID_TITLES = {"true_positives": "most confident true positives", "false_positives": "most confident false positives",
               "false_negatives": "most confident false negatives"}


def num(v) -> str:
    return "–" if v is None else f"{float(v):.4f}"


def interval(d: Mapping | None) -> str:
    """``value [low, high]`` of a ``{"value", "low", "high"}`` dict of metrics.json."""
    if not isinstance(d, Mapping):
        return "–"
    if d.get("low") is None or d.get("high") is None:
        return num(d.get("value"))
    return f"{num(d.get('value'))} [{num(d.get('low'))}, {num(d.get('high'))}]"


def _data_section(facts, doc) -> list[str]:
    m, cfg = facts["metrics"], facts["config"]
    td, prev = doc["training_data"], dict(m.prevalence.items()) if m.prevalence else {}
    task = m.task_definition or results.TaskDefinition()
    neg_rule = task.negative_rule or cfg.data.negative_rule
    neg = ("images whose only label is `No Finding`" if neg_rule == "no_finding"
           else f"every image without {md(task.positive_label)}")
    src = td["source"]
    lines = ["## Data", ""]
    if src["synthetic"]:
        lines += ["**Generated data, not medical images.** This model was trained and evaluated on a synthetic "
                  "stand-in for NIH ChestX-ray14 made by `data_prep.synthetic` (a `SYNTHETIC.txt` lies beside "
                  "its CSV): its numbers say nothing about chest X-rays.", ""]
    lines += [f"- Source: CSV {md_code(src['csv'])}, images {md_code(src['images'])}"
              + ("" if src["synthetic"] else " (NIH ChestX-ray14 when these are NIH's files; the project does not "
                                             "verify the source)") + ".",
              f"- Prep: hash {md_code(td.get('prep_hash'))}, manifest sha256 {md_code(td.get('manifest_sha256'))}"
              + (f", shard format {td['manifest_format']}" if td.get("manifest_format") is not None else "")
              + (f", split {md(td['split_method'])} by patient" if td.get("split_method") else "") + "."]
    splits = td.get("splits") or {}
    for s in ("train", "val", "test"):
        v = splits.get(s) or {}
        pats = (td.get("split_patients") or {}).get(s)
        if pats is None and s == "test":
            pats = getattr(m.plain, "patients", None)
        counts = ", ".join(f"{md(k)} {n}" for k, n in (v.get("label_counts") or {}).items())
        lines.append(f"- {s}: {v.get('count', '–')} images" + (f", {pats} patients" if pats is not None else "")
                     + (f" ({counts})" if counts else "") + f", prevalence {num(prev.get(s))}"
                     + (f" (resampled to {cfg.prep.train_per_class} per class)"
                        if s == "train" and cfg.prep.train_per_class else ""))
    lines += ["",
              f"- Label rule: positive = the finding {md(task.positive_label)} among the image's labels; "
              f"negative = {neg}.",
              "- Label noise: NIH ChestX-ray14's labels were mined from the radiology reports by NLP, not read "
              "from the images; their published accuracy is above 90% for most findings but lower for some, and "
              "Infiltration is among the least reliable. Test metrics are measured against these labels."
              + (" (The generated labels of this data set are exact by construction: trained on NIH data, the "
                 "same model would meet that noise.)" if src["synthetic"] else ""), ""]
    return lines


def _metrics_section(doc) -> list[str]:
    t, dec = doc["metrics"], doc["decision"]
    op = t.get("operating_point") or {}
    auc = t.get("auc") or {}
    method = (op.get("sensitivity") or {}).get("method")
    rates = {"clopper-pearson": "exact binomial (Clopper-Pearson)"}.get(method, md(method) if method else
                                                                      "patient bootstrap")
    lines = ["## Metrics (test split)", "",
             f"{t.get('n')} images, {t.get('positives')} positive (prevalence {num(t.get('prevalence'))}), "
             f"{t.get('patients')} patients. 95% intervals: patient bootstrap ({auc.get('n_boot')} resamples) for "
             f"the AUC; {rates} for the rates at the operating point.", "",
             "| metric | value [95% interval] |", "| --- | --- |",
             f"| ROC AUC | {interval(auc)} |",
             f"| average precision | {num(t.get('average_precision'))} |"]
    for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy"):
        if k in op:
            lines.append(f"| {k} at the operating point | {interval(op[k])} |")
    lines += ["", f"Operating point: threshold {dec['threshold']:.9g} on the network's probability "
              f"(`{md(dec['applied_to'])} >= threshold`), rule {md_code(dec.get('rule'))}, chosen on the "
              f"{md(dec.get('chosen_on') or '–')} split and applied unchanged to test.", ""]
    return lines


def _calibration_section(doc, facts) -> list[str]:
    cal, t = doc["calibration"], doc["metrics"]
    lines = ["## Calibration", "", f"The network's probabilities on test: Brier {num(t.get('brier'))}, "
                                   f"ECE {num(t.get('ece'))}."]
    if cal.get("applied"):
        c = t.get("calibrated") or {}
        lines += ["", f"`probability` is calibrated ({md(cal.get('method') or 'prior correction')}, fitted on "
                      f"validation): temperature {num(cal['temperature'])}, shift {num(cal['shift'])}, center "
                      f"{num(cal['center'])}: {md(cal['formula'])}. Calibrated on test: Brier {num(c.get('brier'))}, "
                      f"ECE {num(c.get('ece'))}. The decision uses the network's probability, as the operating "
                      "point was chosen on it."]
    else:
        lines += ["", "No calibration: `probability` is the network's."]
    plots = facts["metrics"].plots or {}
    if "calibration" in plots:
        lines += ["", "The reliability diagram is in the run's `plots/calibration.png`."]
    return lines + [""]


def _subgroups_section(facts) -> list[str]:
    sub = facts["metrics"].plain.subgroups or {}
    if not sub:
        return []
    lines = ["## Subgroups (test split)", "", "| group | images | positives | ROC AUC [95% interval] |",
             "| --- | --- | --- | --- |"]
    for field, groups in sub.items():
        for name, v in groups.items():
            ci = v.auc_ci or results.Interval()
            auc = (interval({"value": v.auc, "low": ci.low, "high": ci.high})
                   if v.auc is not None else md(v.note or "undefined"))
            lines.append(f"| {md(field)} {md(name)} | {v.n} | {v.positives} | {auc} |")
    return lines + ["", "Small groups give wide intervals; an undefined AUC means one class only.", ""]


def _failures_section(grids: Mapping[str, str]) -> list[str]:
    lines = ["## Failure cases", ""]
    if not grids:
        return lines + ["The run wrote no Grad-CAM grids (eval.gradcam_per_group 0, or no such cases).", ""]
    lines.append("Grad-CAM grids of the evaluation (test split, at the operating point), in this bundle:")
    lines.append("")
    for name, rel in grids.items():
        lines.append(f"- [{md(GRID_TITLES.get(name, name))}]({rel})")
    return lines + ["", "Grad-CAM shows where the last convolutional layer's evidence lies, not why the label "
                        "is right; a confident error with its heat outside the lungs (text, markers, borders) "
                        "points at a shortcut.", ""]


def model_card(facts: Mapping, doc: Mapping, grids: Mapping[str, str]) -> str:
    """The card's Markdown (module doc). ``grids``: Grad-CAM grids the bundle holds, name -> relative path."""
    cfg = facts["config"]
    classes = doc["classes"]
    synthetic = doc["training_data"]["source"]["synthetic"]
    tr = cfg.train
    lines = [f"# Model card: {md(classes[1])} vs {md(classes[0])} ({md(cfg.model.backbone)}, "
             f"{doc['input']['image_size']} px)", "",
             f"cxr-transfer {md_code(doc['project']['version'])}; run {md_code(doc['source_run']['dir'])}, model file "
             f"{md_code(doc['source_run']['model_file'])} (sha256 {md_code(doc['source_run']['sha256'])}).", "",
             "## Intended use", "",
             f"Research: a binary score for {md(classes[1])} on one frontal chest radiograph (PA or AP), for "
             "studying transfer learning and triage-style ranking on data like the training data. Its output "
             "is a probability and a label at the threshold validated on the validation split.", "",
             "Out of scope: diagnosis or any clinical decision without a radiologist; lateral views, children, "
             "other modalities, CT; other findings than the one trained; populations and scanners unlike the "
             "training data without an external evaluation; the label as a report of what is absent (a negative "
             "is not a normal study).", ""]
    lines += _data_section(facts, doc)
    lines += ["## Training recipe", "",
              f"- Backbone {md(cfg.model.backbone)}, ImageNet weights {md_code(cfg.model.weights)}; head: global "
              f"average pooling, Dense {cfg.model.dense_units} relu, dropout {cfg.model.dropout}, softmax over the "
              "two classes.",
              f"- Input: {doc['input']['image_size']} x {doc['input']['image_size']} gray, Pillow bilinear resize "
              "(reducing_gap 1.3), per-image min-max to 0..255; the SavedModel does this itself.",
              f"- Warm-up {tr.warmup.epochs} epoch(s) ({md(tr.warmup.optimizer)}), then fine-tuning up to "
              f"{tr.finetune.epochs} epochs ({md(tr.finetune.optimizer)}, lr {tr.finetune.lr:g}, early stopping "
              f"patience {tr.finetune.patience}), batch {tr.batch_size} per rank.",
              f"- Checkpoint: {md((doc.get('selected_checkpoint') or {}).get('rule') or '–')}.", ""]
    lines += _metrics_section(doc)
    lines += _calibration_section(doc, facts)
    lines += _subgroups_section(facts)
    lines += _failures_section(grids)
    lim = ["## Limitations", ""]
    if synthetic:
        lim.append("- Trained and tested on generated pictures (see Data): not a medical model.")
    lim += ["- One data source; the test split is internal (same source and prep as training, other patients): "
            "no external validation."]
    if not synthetic:
        lim.append("- Labels are NLP-mined and noisy (see Data); the test metrics inherit that noise.")
    val_prev = getattr(facts["metrics"].prevalence, "val", None)
    lim += [f"- The threshold was chosen at the validation prevalence {num(val_prev)}; PPV and NPV change with the "
            "prevalence where the model is used.",
            "- Images are squashed to a square (aspect ratio not kept); a JPEG is read at libjpeg's reduced DCT "
            "scale as prep reads it.", ""]
    lines += lim
    cfg_yaml = facts.get("config_yaml") or ""
    run_dir = shlex.quote(" ".join(str(cfg.run.dir).splitlines()))
    cmds = ("python -m launch pipeline --config config.yaml --np 2   # prep, train, evaluate\n"
            f"python -m distributed.export --run {run_dir}")
    fc, fy = fence(cmds), fence(cfg_yaml)
    lines += ["## How to reproduce", "",
              "With the config below saved as `config.yaml` (also in this bundle):", "", f"{fc}sh", cmds, fc, "",
              f"{fy}yaml", cfg_yaml.rstrip("\n"), fy, ""]
    return "\n".join(lines)
