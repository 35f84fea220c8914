"""Every sentence of the CLAIM checklist from a fact (issue 30, item 3): change a file the evaluation wrote, or
the patient sets it counted, and the sentence changes. No TensorFlow."""
import json

import numpy as np

from data_prep.config import load_config
from distributed import metrics as M
from distributed.report import claim_checklist


def _metrics(gradcam=None, provenance=None, calibrated=False):
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20)
    p = np.clip(y * 0.4 + rng.random(40) * 0.6, 0, 1)
    plain = M.binary_metrics(y, p, class_names=("No Finding", "Infiltration"), groups=np.arange(40), n_boot=0,
                             operating={"source": "validation", "rule": "youden", "threshold": 0.5})
    if calibrated:
        plain["calibrated"] = {"brier": 0.1, "ece": 0.05, "temperature": 1.5, "shift": 0.0}
    return {"task": "binary", "classes": ["No Finding", "Infiltration"], "plain": plain, "image_size": 32,
            "bootstrap": 0, "operating_point": plain["operating_point"], "gradcam": gradcam or {},
            "provenance": provenance}


def _row(text, item):
    return next(ln for ln in text.splitlines() if ln.startswith(f"| {item} |"))


def test_failure_cases_follow_the_grids_on_disk(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    grids = {"true_positives": "gradcam/true_positives.png", "false_positives": "gradcam/false_positives.png"}
    (tmp_path / "gradcam").mkdir()
    (tmp_path / "gradcam" / "true_positives.png").write_bytes(b"png")
    row = _row(claim_checklist(_metrics(grids), {}, cfg, tmp_path), "Failure cases")
    assert "Grad-CAM grids of true positives;" in row and "none of false positives or false negatives" in row
    (tmp_path / "gradcam" / "false_positives.png").write_bytes(b"png")
    row = _row(claim_checklist(_metrics(grids), {}, cfg, tmp_path), "Failure cases")
    assert "Grad-CAM grids of true positives, false positives;" in row and "none of false negatives" in row
    row = _row(claim_checklist(_metrics({}), {}, cfg, tmp_path), "Failure cases")
    assert row.startswith("| Failure cases | no Grad-CAM grids")


def test_calibration_follows_calibration_json(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    row = _row(claim_checklist(_metrics(calibrated=True), {}, cfg, tmp_path), "Calibration")
    assert "no `calibration.json` was found" in row
    (tmp_path / "calibration.json").write_text(json.dumps({"temperature": 1.5, "shift": -0.25, "method": "temperature",
                                                           "prior_correction": True}))
    row = _row(claim_checklist(_metrics(calibrated=True), {}, cfg, tmp_path), "Calibration")
    assert "temperature 1.500 fitted on validation" in row and "shift -0.250 (prior correction)" in row
    row = _row(claim_checklist(_metrics(calibrated=False), {}, cfg, tmp_path), "Calibration")
    assert "not calibrated" in row


def test_leakage_follows_the_patient_sets(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    clean = {"evaluation": "internal", "shared": {"patients": {"train": 30, "val": 5, "test": 8}, "train_val": 0,
                                                  "train_test": 0, "val_test": 0}}
    row = _row(claim_checklist(_metrics(provenance=clean), {}, cfg, tmp_path), "Split and leakage control")
    assert "No patient is in two splits (checked on the patient ids: 30 training patients" in row
    leaky = {"evaluation": "external", "shared": {**clean["shared"], "train_test": 4, "train_val": 2}}
    row = _row(claim_checklist(_metrics(provenance=leaky), {}, cfg, tmp_path), "Split and leakage control")
    assert "4 test patient(s) and 2 validation patient(s) were in the model's training split" in row
    assert "External evaluation" in row and "No patient is in two splits" not in row
    row = _row(claim_checklist(_metrics(provenance={"evaluation": "unverified", "shared": None}), {}, cfg, tmp_path),
               "Split and leakage control")
    assert "**not checked**" in row


def test_operating_point_says_where_it_came_from(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    m = _metrics()
    assert "chosen on the validation split" in _row(claim_checklist(m, {}, cfg, tmp_path), "Operating point")
    m["operating_point"] = {**m["operating_point"], "source": "eval.threshold (no validation split)"}
    row = _row(claim_checklist(m, {}, cfg, tmp_path), "Operating point")
    assert "not fitted on the validation split" in row and "chosen on the validation split" not in row


def test_report_says_what_validation_chose_and_whether_test_is_internal():
    """Issue 34.6: checkpoint, threshold and temperature, each said to be chosen on validation (or not), and the
    test split internal (same source) unless the provenance says external."""
    from distributed.report import validation_section

    m = _metrics(provenance={"evaluation": "internal", "shared": None}, calibrated=True)
    m["plain"]["calibrated"]["method"] = "temperature"
    m["selected_checkpoint"] = {"file": "checkpoints/best-finetune.keras",
                                "rule": "best val_loss of the fine-tune phase",
                                "phase": "finetune", "epoch": 3, "val_loss": 0.41}
    text = validation_section(m)
    rows = {ln.split(" | ")[0][2:]: ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "epoch 3" in rows["checkpoint"] and "yes (lowest validation loss)" in rows["checkpoint"]
    assert "0.5 (`youden`) | yes" in rows["threshold"]
    assert "1.5 | yes" in rows["temperature"]
    assert "**Internal test set:**" in text and "not an external validation" in text and "External" not in text
    m["provenance"] = {"evaluation": "external", "evaluated_on": {"prep_out": "/data/other"},
                       "shared": {"patients": {"test": 8, "val": 5}, "train_test": 0, "train_val": 0}}
    m["operating_point"] = {**m["operating_point"], "source": "fixed", "rule": "fixed:0.5"}
    m["selected_checkpoint"]["rule"] = "last epoch"
    text = validation_section(m)
    assert "**External evaluation:**" in text and "/data/other" in text and "Internal test set" not in text
    assert "no (fixed)" in text and "no (last epoch)" in text


def test_co_findings_table_names_its_count_positive_images(tmp_path):
    """Issue 34.10: the co-findings table's count column holds positive images (against all negatives)."""
    from distributed.report import task_section

    y = np.array([1] * 10 + [0] * 10)
    p = np.linspace(0.9, 0.1, 20)
    co = np.array([True] * 4 + [False] * 16)
    m = {"task": "binary", "task_definition": {"positive_label": "Effusion", "negative_rule": "no_finding"},
         "co_findings": {"positives": 10, "positives_with_co_findings": 4,
                         "auc_with": M.split_auc(y, p, co, np.arange(20)),
                         "auc_without": M.split_auc(y, p, ~co, np.arange(20))}}
    text = task_section(m, load_config(None, [f"run.dir={tmp_path}"]))
    assert "| positives | positive images (against all negatives) | ROC AUC [95% CI] |" in text
    assert "| with co-findings | 4 |" in text and "| without co-findings | 6 |" in text


def test_the_intervals_answer_names_what_has_none(tmp_path):
    """Issue 34.8: 'every other number has intervals' was false; the answer says which kind each has."""
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    row = _row(claim_checklist(_metrics(), {}, cfg, tmp_path), "Metrics with intervals")
    assert "every other number" not in row and "exact Clopper-Pearson" in row
    assert "without intervals: the classification report and accuracy at `eval.threshold`, the oracle row" in row
    m = _metrics()
    del m["plain"]["operating_point"]
    del m["operating_point"]
    assert "Clopper-Pearson" not in _row(claim_checklist(m, {}, cfg, tmp_path), "Metrics with intervals")
