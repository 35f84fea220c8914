"""Every sentence of the CLAIM checklist from a fact (issue 30, item 3): change a file the evaluation wrote, or
the patient sets it counted, and the sentence changes. No TensorFlow."""
import json

import numpy as np

from data_prep.config import load_config
from distributed import metrics as M
from distributed.report import claim_checklist
from distributed.results import BinaryResult, EvalResult


def _result(m):
    """metrics.json's record of a metrics dict (the report takes the typed results)."""
    return EvalResult.from_json(m)


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
    row = _row(claim_checklist(_result(_metrics(grids)), {}, cfg, tmp_path), "Failure cases")
    assert "Grad-CAM grids of true positives;" in row and "none of false positives or false negatives" in row
    (tmp_path / "gradcam" / "false_positives.png").write_bytes(b"png")
    row = _row(claim_checklist(_result(_metrics(grids)), {}, cfg, tmp_path), "Failure cases")
    assert "Grad-CAM grids of true positives, false positives;" in row and "none of false negatives" in row
    row = _row(claim_checklist(_result(_metrics({})), {}, cfg, tmp_path), "Failure cases")
    assert row.startswith("| Failure cases | no Grad-CAM grids")


def test_calibration_follows_calibration_json(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    row = _row(claim_checklist(_result(_metrics(calibrated=True)), {}, cfg, tmp_path), "Calibration")
    assert "no `calibration.json` was found" in row
    (tmp_path / "calibration.json").write_text(json.dumps({"temperature": 1.5, "shift": -0.25, "method": "temperature",
                                                           "prior_correction": True}))
    row = _row(claim_checklist(_result(_metrics(calibrated=True)), {}, cfg, tmp_path), "Calibration")
    assert "temperature 1.500 fitted on validation" in row and "shift -0.250 (prior correction)" in row
    row = _row(claim_checklist(_result(_metrics(calibrated=False)), {}, cfg, tmp_path), "Calibration")
    assert "not calibrated" in row


def test_leakage_follows_the_patient_sets(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    clean = {"evaluation": "internal", "shared": {"patients": {"train": 30, "val": 5, "test": 8}, "train_val": 0,
                                                  "train_test": 0, "val_test": 0}}
    row = _row(claim_checklist(_result(_metrics(provenance=clean)), {}, cfg, tmp_path), "Split and leakage control")
    assert "No patient is in two splits (checked on the patient ids: 30 training patients" in row
    leaky = {"evaluation": "external", "shared": {**clean["shared"], "train_test": 4, "train_val": 2}}
    row = _row(claim_checklist(_result(_metrics(provenance=leaky)), {}, cfg, tmp_path), "Split and leakage control")
    assert "4 test patient(s) and 2 validation patient(s) were in the model's training split" in row
    assert "External evaluation" in row and "No patient is in two splits" not in row
    row = _row(claim_checklist(_result(_metrics(provenance={"evaluation": "unverified", "shared": None})), {}, cfg,
                               tmp_path),
               "Split and leakage control")
    assert "**not checked**" in row


def test_operating_point_says_where_it_came_from(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    m = _metrics()
    assert "chosen on the validation split" in _row(claim_checklist(_result(m), {}, cfg, tmp_path), "Operating point")
    m["operating_point"] = {**m["operating_point"], "source": "eval.threshold (no validation split)"}
    row = _row(claim_checklist(_result(m), {}, cfg, tmp_path), "Operating point")
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
    text = validation_section(_result(m))
    rows = {ln.split(" | ")[0][2:]: ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "epoch 3" in rows["checkpoint"] and "yes (lowest validation loss)" in rows["checkpoint"]
    assert "0.5 (`youden`) | yes" in rows["threshold"]
    assert "1.5 | yes" in rows["temperature"]
    assert "**Internal test set:**" in text and "not an external validation" in text and "External" not in text
    m["provenance"] = {"evaluation": "external", "evaluated_on": {"prep_out": "/data/other"},
                       "shared": {"patients": {"test": 8, "val": 5}, "train_test": 0, "train_val": 0}}
    m["operating_point"] = {**m["operating_point"], "source": "fixed", "rule": "fixed:0.5"}
    m["selected_checkpoint"]["rule"] = "last epoch"
    text = validation_section(_result(m))
    assert "**External evaluation:**" in text and "/data/other" in text and "Internal test set" not in text
    assert "no (fixed)" in text and "no (last epoch)" in text


def test_co_findings_table_names_its_count_positive_images(tmp_path):
    """Issue 34.10: the co-findings table's "images" column holds the images of that AUC (its positives and all
    negatives), beside the positive and negative images."""
    from distributed.report import task_section

    y = np.array([1] * 10 + [0] * 10)
    p = np.linspace(0.9, 0.1, 20)
    co = np.array([True] * 4 + [False] * 16)
    m = {"task": "binary", "task_definition": {"positive_label": "Effusion", "negative_rule": "no_finding"},
         "co_findings": {"positives": 10, "positives_with_co_findings": 4,
                         "auc_with": M.split_auc(y, p, co, np.arange(20)),
                         "auc_without": M.split_auc(y, p, ~co, np.arange(20))}}
    text = task_section(_result(m), load_config(None, [f"run.dir={tmp_path}"]))
    assert "| positives | images | positive images | negative images | ROC AUC [95% CI] |" in text
    assert "| with co-findings | 14 | 4 | 10 |" in text and "| without co-findings | 16 | 6 | 10 |" in text


def test_the_intervals_answer_names_what_has_none(tmp_path):
    """Issue 34.8: 'every other number has intervals' was false; the answer says which kind each has."""
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    row = _row(claim_checklist(_result(_metrics()), {}, cfg, tmp_path), "Metrics with intervals")
    assert "every other number" not in row and "exact Clopper-Pearson" in row
    assert "without intervals: the classification report and accuracy at `eval.threshold`, the oracle row" in row
    m = _metrics()
    del m["plain"]["operating_point"]
    del m["operating_point"]
    assert "Clopper-Pearson" not in _row(claim_checklist(_result(m), {}, cfg, tmp_path), "Metrics with intervals")


def test_trained_layers_sentence_follows_the_record(tmp_path):
    """Issue 32: the recipe names what each phase froze and trained, from trained_layers.json."""
    from distributed import rundir
    from distributed.report import trained_layers_text

    assert "not recorded" in trained_layers_text(_result({"trained_layers": rundir.read_trained_layers(tmp_path)}))
    rundir.record_phase_layers(tmp_path, "warmup", {"backbone_layers": 3, "frozen": ["image", "c1", "c2"],
                                                    "trained": [], "head": ["predictions"], "trainable_params": 10})
    rundir.record_phase_layers(tmp_path, "finetune", {"backbone_layers": 3, "frozen": ["image"],
                                                      "trained": ["c1", "c2"], "head": ["predictions"],
                                                      "trainable_params": 1234})
    text = trained_layers_text(_result({"trained_layers": rundir.read_trained_layers(tmp_path)}))
    assert text == ("warmup: 3 of 3 backbone layers frozen (`image` .. `c2`), 0 trained (none) and the head, "
                    "10 trainable parameters; finetune: 1 of 3 backbone layers frozen (`image`), 2 trained "
                    "(`c1` .. `c2`) and the head, 1,234 trainable parameters")


def _flow(unreadable=0):
    """A flow of 100 CSV rows: 20 dropped by the task rule, 10 by the test cap, ``unreadable`` by prep."""
    def step(name, images, split=None):
        return {"step": name, "split": split, "what": name, "images": images, "patients": None, "classes": None}
    return {"classes": ["No Finding", "Infiltration", "not in the task"],
            "steps": [step("csv", 100), step("usable", 100), step("task", 80), step("files", 80),
                      step("split", 50, "train"), step("split", 30, "test"), step("capped", 50, "train"),
                      step("capped", 20, "test"), step("written", 50 - unreadable, "train"),
                      step("written", 20, "test"), step("evaluated", 20, "test")]}


def test_inclusion_counts_every_exclusion_of_the_flow(tmp_path):
    """Issue 34.8: 'N image(s) excluded' counted prep's skips only; now the task rule and the caps too, and a prep
    with skips changes the count; without a flow the answer says what is not counted."""
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    m = _metrics()
    m["flow"] = _flow()
    row = _row(claim_checklist(_result(m), {"skipped": []}, cfg, tmp_path), "Inclusion / exclusion")
    assert "30 of 100 CSV rows excluded before training and testing (20 by the task rule; 10 by balancing and " \
           "per-class caps); 70 images in the shards; every written test image evaluated" in row
    m["flow"] = _flow(unreadable=3)
    row = _row(claim_checklist(_result(m), {"skipped": [{"image": "a"}] * 3}, cfg, tmp_path), "Inclusion / exclusion")
    assert "33 of 100 CSV rows excluded" in row and "; 3 unreadable images skipped by prep)" in row
    del m["flow"]
    row = _row(claim_checklist(_result(m), {"skipped": [{"image": "a"}] * 3}, cfg, tmp_path), "Inclusion / exclusion")
    assert "flow not recorded (a prep older than it): 3 image(s) skipped by prep" in row
    assert "the images the task rule and the caps excluded are not counted" in row


def test_the_intervals_answer_follows_what_metrics_json_holds(tmp_path):
    """Issue 34.8: with resamples every bootstrap metric is listed as such; without them (eval.bootstrap 0) the AUC,
    AP, Brier and ECE move to 'without intervals'; fitted extras (temperature, in-sample validation figures) are
    listed without; a multilabel run names its mean AUC and precision/recall/F1."""
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    row = _row(claim_checklist(_result(_metrics()), {}, cfg, tmp_path), "Metrics with intervals")
    assert "patient bootstrap" not in row
    assert "without intervals: the classification report and accuracy at `eval.threshold`, the oracle row, ROC AUC " \
           "0.905" in row and ", average precision, Brier score, ECE" in row
    rng = np.random.default_rng(1)
    y = np.array([0, 1] * 20)
    p = np.clip(y * 0.4 + rng.random(40) * 0.6, 0, 1)
    plain = M.binary_metrics(y, p, class_names=("No Finding", "Infiltration"), groups=np.arange(40), n_boot=40,
                             operating={"source": "validation", "rule": "youden", "threshold": 0.5})
    plain["calibrated"] = {**M.calibration_metrics(y, p, np.arange(40), 40, 0), "method": "temperature",
                           "validation": {"before": {"brier": 0.2}, "after": {"brier": 0.1}}}
    m = {**_metrics(), "plain": plain, "bootstrap": 40, "operating_point": plain["operating_point"]}
    row = _row(claim_checklist(_result(m), {}, cfg, tmp_path), "Metrics with intervals")
    # the intervals come from metrics.py, which makes them BCa (method "bca")
    boot, rest = row.split("; without intervals: ")
    assert (boot.startswith("| Metrics with intervals | BCa patient bootstrap (40 resamples")
            and "ROC AUC" in boot and "calibrated Brier score, calibrated ECE" in boot)
    assert ("sensitivity at the operating point, specificity at the operating point" in boot
            and "Clopper-Pearson" in boot)
    assert rest.startswith("the classification report and accuracy at `eval.threshold`, the oracle row, the validation "
                           "Brier score and ECE before and after calibration (in-sample), the fitted temperature")
    Y = np.eye(3, dtype=int)[np.arange(30) % 3]
    ml = M.multilabel_metrics(Y, rng.random((30, 3)), class_names=["a", "b", "c"], groups=np.arange(30), n_boot=20)
    row = _row(claim_checklist(_result({**m, "task": "multilabel", "plain": ml, "bootstrap": 20}), {}, cfg, tmp_path),
               "Metrics with intervals")
    assert row.endswith("BCa patient bootstrap (20 resamples; `n_valid` beside each in `metrics.json`): "
                        "per-finding ROC "
                        "AUC; without intervals: the mean AUC, the per-finding precision, recall and F1 at "
                        "`eval.threshold`, the exact-match accuracy |")


def test_the_intervals_answer_names_the_bootstrap_kind_each_interval_records(tmp_path):
    """An interval that records ``method: bca`` is called BCa; a mix says where to look."""
    from distributed.report import intervals_fact

    m = _metrics()
    p = m["plain"]
    p["auc_ci"] = {"low": 0.7, "high": 0.9, "method": "bca"}
    p["average_precision_ci"] = {"low": 0.6, "high": 0.9, "method": "bca"}
    assert intervals_fact(_result(m)).startswith("BCa patient bootstrap (0 resamples; ")
    p["brier_ci"] = {"low": 0.1, "high": 0.2}
    assert intervals_fact(_result(m)).startswith("patient bootstrap (BCa or percentile: `method` in `metrics.json`) ")


def test_fixed_and_fallback_thresholds_are_not_said_to_come_from_validation(tmp_path):
    """Issue 34.8: the summary's row, the ROC plot's title and the file list say 'chosen on validation' only when
    the threshold was; `fixed:T` is 'fixed' even with a validation split (evaluate's source)."""
    from distributed.report import binary_section, fitted_on_validation

    m = _metrics()
    assert ("| operating point (threshold chosen on validation) |"
            in binary_section(BinaryResult.from_json(m["plain"]), None, m["classes"], 0, _result(m)))
    assert fitted_on_validation(_result(m)) == "the operating point fitted on it"
    for source in ("fixed", "eval.threshold (no validation split)"):
        op = {**m["plain"]["operating_point"], "source": source}
        m2 = {**m, "plain": {**m["plain"], "operating_point": op}, "operating_point": op}
        sec = binary_section(BinaryResult.from_json(m2["plain"]), None, m["classes"], 0, _result(m2))
        assert f"| operating point (threshold {source}: not chosen on validation) |" in sec
        assert fitted_on_validation(_result(m2)) == "nothing was fitted on it"
    import logging

    from distributed.evaluate import operating_spec

    y, p, log = np.array([0, 1, 0, 1]), np.array([0.1, 0.8, 0.3, 0.6]), logging.getLogger("test")
    assert operating_spec("fixed:0.3", y, p, 0.5, log) == {"source": "fixed", "rule": "fixed:0.3", "threshold": 0.3}
    assert operating_spec("youden", y, p, 0.5, log)["source"] == "validation"
    assert operating_spec("youden", None, None, 0.4, log) == {"source": "eval.threshold (no validation split)",
                                                               "rule": "fixed:0.4", "threshold": 0.4}


def test_predict_says_chosen_on_validation_only_when_it_was():
    """cxr-predict's threshold line, from operating_point.json's source: fixed:T and the fallback are not
    'chosen on the validation split'."""
    from distributed.predict import threshold_note

    th = {"threshold": 0.3, "source": "operating point", "rule": "youden", "chosen_on": "validation", "file": "m"}
    assert "(youden, chosen on the validation split; m)" in threshold_note(th)
    for src in ("fixed", "eval.threshold (no validation split)"):
        note = threshold_note({**th, "rule": "fixed:0.3", "chosen_on": src})
        assert f"(fixed:0.3, {src}, not chosen on validation; m)" in note and "chosen on the" not in note
