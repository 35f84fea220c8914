"""What an evaluation computes, typed: the records of ``metrics.json`` (no TensorFlow, no numpy).

``distributed.evaluate`` assembles an :class:`EvalResult` from the numbers ``distributed.metrics`` computes and
writes it with :func:`write`; every reader of ``metrics.json`` goes through :func:`read` (or
``EvalResult.from_json`` of an already parsed document). ``report.py`` and ``plots.py`` take these records.

Every record is a frozen dataclass whose fields are the JSON keys in the order they are written. A field's
``metadata`` carries its meaning (``doc``: docs/metrics-reference.md is generated from it, :func:`schema_markdown`)
and how it is written: ``key`` when the JSON name is not a Python name (``f1-score``), ``omit`` for a key that is
left out when it has no value (rather than written as null), ``json=False`` for what is kept in memory for the
plots but not written (the ROC and PR curves).

Reading is lenient, as the readers before it were: a missing key reads as None (a ``metrics.json`` of an earlier
version loads), a key this version does not know is kept (``unknown``, every record has it) and written back
after the known ones.
Values are kept as they were computed or read (no conversion): ``to_json(from_json(d)) == d`` for every document
this version writes.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

FORMAT = 2
_UNION = (typing.Union, types.UnionType)


def _f(doc: str, *, key: str | None = None, omit: bool = False, json: bool = True, default=None):
    return field(default=default, metadata={"doc": doc, "key": key, "omit": omit, "json": json})


@dataclass(frozen=True)
class Record:
    """Base of the records: ``to_json`` and ``from_json`` driven by the dataclass fields."""
    unknown: dict | None = field(default=None, metadata={"doc": "keys this version does not know, kept as read",
                                                         "json": False})

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            md = f.metadata
            if f.name == "unknown" or not md.get("json", True):
                continue
            v = getattr(self, f.name)
            if v is None and md.get("omit"):
                continue
            out[md.get("key") or f.name] = _dump(v)
        out.update(_dump(self.unknown or {}))
        return out

    @classmethod
    def from_json(cls, data: Mapping | None):
        if data is None:
            return None
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        hints = _hints(cls)
        kw, known = {}, set()
        for f in dataclasses.fields(cls):
            if f.name == "unknown":
                continue
            key = f.metadata.get("key") or f.name
            known.add(key)
            if key in data:
                kw[f.name] = _load(hints[f.name], data[key])
        unknown = {k: v for k, v in data.items() if k not in known}
        if unknown:
            kw["unknown"] = unknown
        return cls(**kw)


_HINTS: dict = {}


def _hints(cls) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _records(tp) -> list:
    """The Record classes a type hint names (at its top level or in a union)."""
    if isinstance(tp, type) and issubclass(tp, Record):
        return [tp]
    if typing.get_origin(tp) in _UNION:
        return [a for arg in typing.get_args(tp) for a in _records(arg)]
    return []


def _load(tp, v):
    if v is None:
        return None
    recs = _records(tp)
    if recs:
        return recs[0].from_json(v) if isinstance(v, Mapping) else v
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNION:
        inner = [a for a in args if a is not type(None)]
        return _load(inner[0], v) if len(inner) == 1 else v
    if origin is dict and isinstance(v, Mapping) and len(args) == 2:
        return {k: _load(args[1], x) for k, x in v.items()}
    if origin is list and isinstance(v, list) and args:
        return [_load(args[0], x) for x in v]
    return v


def _dump(v):
    if isinstance(v, Record):
        return v.to_json()
    if isinstance(v, Mapping):
        return {k: _dump(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_dump(x) for x in v]
    return v


# --------------------------------------------------------------------------- intervals

@dataclass(frozen=True)
class Percentile(Record):
    """The plain 2.5-97.5 percentile interval of the same resamples, kept beside a BCa interval."""
    low: float | None = _f("lower bound")
    high: float | None = _f("upper bound")


@dataclass(frozen=True)
class Interval(Record):
    """A patient-bootstrap interval of one statistic (``metrics.bootstrap_stats``)."""
    low: float | None = _f("lower bound of the 95% interval (BCa), null without one")
    high: float | None = _f("upper bound")
    n_valid: int | None = _f("resamples the interval rests on (those lacking a class are dropped)")
    zero_width: bool | None = _f("every resample gave the same value", omit=True)
    method: str | None = _f("`bca` (or `percentile`)", omit=True)
    percentile: Percentile | None = _f("the percentile interval of the same resamples", omit=True)


@dataclass(frozen=True)
class AucInterval(Record):
    """The ROC AUC's patient-bootstrap interval (``metrics.bootstrap_auc``)."""
    n_boot: int | None = _f("resamples drawn (`eval.bootstrap`)")
    n_valid: int | None = _f("resamples with both classes, the interval's base")
    level: float | None = _f("0.95")
    low: float | None = _f("lower bound (BCa), null without a valid resample")
    high: float | None = _f("upper bound")
    std: float | None = _f("standard deviation of the resampled AUCs")
    by: str | None = _f("`patient`: what a resample draws")
    zero_width: bool | None = _f("every resample gave the same value", omit=True)
    method: str | None = _f("`bca`", omit=True)
    percentile: Percentile | None = _f("the percentile interval of the same resamples", omit=True)


@dataclass(frozen=True)
class ValueInterval(Record):
    """A value with its bootstrap interval (PPV and NPV at a stated prevalence)."""
    value: float | None = _f("the estimate")
    low: float | None = _f("lower bound")
    high: float | None = _f("upper bound")
    n_valid: int | None = _f("resamples the interval rests on")
    zero_width: bool | None = _f("every resample gave the same value")
    method: str | None = _f("`bca`")
    percentile: Percentile | None = _f("the percentile interval of the same resamples")


@dataclass(frozen=True)
class Proportion(Record):
    """A proportion at the operating point (``metrics.operating_point_metrics``): exact Clopper-Pearson with
    patients as clusters, the patient bootstrap beside it."""
    value: float | None = _f("k / n, null when n is 0")
    low: float | None = _f("lower bound (Clopper-Pearson on the effective n)")
    high: float | None = _f("upper bound")
    method: str | None = _f("`clopper-pearson`")
    k: int | None = _f("images counted")
    n: int | None = _f("images in the denominator")
    patients: int | None = _f("patients in the denominator")
    design_effect: float | None = _f("Kish's design effect with ICC 1: images per patient")
    n_effective: float | None = _f("n / design_effect: the patients")
    bootstrap: Interval | None = _f("the patient bootstrap's interval of the same proportion")


# --------------------------------------------------------------------------- the binary task

@dataclass(frozen=True)
class AtPrevalence(Record):
    """PPV and NPV recomputed at a stated prevalence (`eval.prevalence`)."""
    prevalence: float | None = _f("the prevalence")
    ppv: ValueInterval | None = _f("positive predictive value at it")
    npv: ValueInterval | None = _f("negative predictive value at it")


@dataclass(frozen=True)
class OperatingPoint(Record):
    """The threshold chosen on validation (`eval.operating_point`) and what it gives on test."""
    source: str | None = _f("`validation`; `fixed` for `fixed:T`; `eval.threshold (no validation split)`")
    rule: str | None = _f("the rule, e.g. `youden`, `sensitivity:0.9`, `fixed:0.5`")
    threshold: float | None = _f("an image is positive when p >= threshold; null when none could be chosen")
    note: str | None = _f("why there is no threshold", omit=True)
    tp: int | None = _f("true positives (images)", omit=True)
    fp: int | None = _f("false positives", omit=True)
    fn: int | None = _f("false negatives", omit=True)
    tn: int | None = _f("true negatives", omit=True)
    sensitivity: Proportion | None = _f("sensitivity at the threshold", omit=True)
    specificity: Proportion | None = _f("specificity", omit=True)
    ppv: Proportion | None = _f("positive predictive value (test prevalence)", omit=True)
    npv: Proportion | None = _f("negative predictive value (test prevalence)", omit=True)
    accuracy: Proportion | None = _f("accuracy", omit=True)
    at_prevalence: AtPrevalence | None = _f("with `eval.prevalence`: PPV and NPV at it", omit=True)


@dataclass(frozen=True)
class Oracle(Record):
    """Youden's threshold fitted on the test set itself: optimistic, for comparison only."""
    threshold: float | None = _f("the threshold")
    j: float | None = _f("Youden's J there")
    sensitivity: float | None = _f("sensitivity there")
    specificity: float | None = _f("specificity there")
    rule: str | None = _f("`youden`")
    fitted_on: str | None = _f("`test`")
    note: str | None = _f("says it is optimistic")
    accuracy: float | None = _f("accuracy there", omit=True)


@dataclass(frozen=True)
class ClassRow(Record):
    """One row of scikit-learn's classification report."""
    precision: float | None = _f("precision")
    recall: float | None = _f("recall")
    f1_score: float | None = _f("F1", key="f1-score")
    support: int | None = _f("images of the class")


@dataclass(frozen=True)
class ReliabilityBin(Record):
    """One equal-width bin of the reliability diagram."""
    low: float | None = _f("bin start")
    high: float | None = _f("bin end")
    n: int | None = _f("images in the bin")
    mean_probability: float | None = _f("their mean probability (null when empty)")
    fraction_positive: float | None = _f("their share of positives")


@dataclass(frozen=True)
class SubgroupAuc(Record):
    """The AUC of one subgroup (a view, a sex)."""
    n: int | None = _f("images")
    positives: int | None = _f("positive images")
    auc: float | None = _f("ROC AUC, null with one class only")
    note: str | None = _f("why the AUC is null", omit=True)
    auc_ci: Interval | None = _f("patient-bootstrap interval within the subgroup")


@dataclass(frozen=True)
class RocCurve(Record):
    """A ROC curve (in memory, for the plots)."""
    fpr: list | None = _f("false positive rates")
    tpr: list | None = _f("true positive rates")


@dataclass(frozen=True)
class PrCurve(Record):
    """A precision-recall curve (in memory, for the plots)."""
    precision: list | None = _f("precisions")
    recall: list | None = _f("recalls")


@dataclass(frozen=True)
class RocBand(Record):
    """The ROC curve's pointwise band over patient resamples (in memory, for the plots)."""
    fpr: list | None = _f("the grid of false positive rates")
    tpr_low: list | None = _f("2.5th percentile of the resampled TPR")
    tpr_high: list | None = _f("97.5th percentile")


@dataclass(frozen=True)
class Curves(Record):
    """The curves the plots draw (in memory only, not in metrics.json)."""
    roc: RocCurve | None = _f("ROC curve")
    pr: PrCurve | None = _f("precision-recall curve", omit=True)
    roc_band: RocBand | None = _f("pointwise 95% band over patient resamples", omit=True)


@dataclass(frozen=True)
class BrierEce(Record):
    """Brier score and ECE of one set of probabilities."""
    brier: float | None = _f("Brier score")
    ece: float | None = _f("expected calibration error")


@dataclass(frozen=True)
class CalibrationCheck(Record):
    """The validation split before and after the transform (in-sample for a fitted temperature)."""
    before: BrierEce | None = _f("Brier and ECE before")
    after: BrierEce | None = _f("Brier and ECE after")
    in_sample: bool | None = _f("fitted and measured on the same images")


@dataclass(frozen=True)
class Calibrated(Record):
    """The calibrated probabilities (`eval.calibrate`, `eval.prior_correction`) on test, and the transform."""
    brier: float | None = _f("Brier score after the transform")
    brier_ci: Interval | None = _f("its interval")
    ece: float | None = _f("ECE after the transform")
    ece_ci: Interval | None = _f("its interval")
    ece_bins: int | None = _f("10")
    reliability: list[ReliabilityBin] | None = _f("reliability diagram after the transform")
    method: str | None = _f("`temperature` or `none`")
    prior_correction: bool | None = _f("whether the prior shift was applied")
    temperature: float | None = _f("the fitted temperature (1 without)")
    shift: float | None = _f("the prior correction's logit shift")
    target_prevalence: float | None = _f("the prior correction's target")
    center: float | None = _f("logit of the training prevalence, the temperature's center")
    target_source: str | None = _f("where the target comes from (`eval.prevalence` or train+val)")
    warning: str | None = _f("e.g. a temperature at the search bound")
    validation: CalibrationCheck | None = _f("the validation split before and after", omit=True)


@dataclass(frozen=True)
class BinaryResult(Record):
    """``plain`` and ``tta`` of a binary evaluation (``metrics.binary_metrics``)."""
    n: int | None = _f("test images")
    positives: int | None = _f("positive images")
    prevalence: float | None = _f("share of positives")
    patients: int | None = _f("test patients")
    threshold: float | None = _f("`eval.threshold` (the class table's threshold, not the operating point)")
    report: dict[str, ClassRow | float] | None = _f(
        "per class and `macro avg`/`weighted avg`: `precision, recall, f1-score, support`; `accuracy`; at "
        "`eval.threshold`")
    confusion_matrix: list | None = _f("`[[tn, fp], [fn, tp]]` at `eval.threshold`")
    auc: float | None = _f("ROC AUC")
    auc_ci: AucInterval | None = _f("its patient-bootstrap interval")
    average_precision: float | None = _f("average precision")
    average_precision_ci: Interval | None = _f("its interval")
    brier: float | None = _f("Brier score")
    brier_ci: Interval | None = _f("its interval")
    ece: float | None = _f("expected calibration error over `ece_bins` equal-width bins")
    ece_ci: Interval | None = _f("its interval")
    ece_bins: int | None = _f("10")
    reliability: list[ReliabilityBin] | None = _f("the reliability diagram's bins")
    oracle: Oracle | None = _f("Youden's threshold fitted on test: optimistic, for comparison only")
    operating_point: OperatingPoint | None = _f("the operating point chosen on validation", omit=True)
    subgroups: dict[str, dict[str, SubgroupAuc]] | None = _f("per `view` and `sex` value: the AUC")
    curves: Curves | None = _f("ROC/PR curves and band for the plots (not written)", json=False)
    calibrated: Calibrated | None = _f("with a calibration: the calibrated probabilities", omit=True)
    note: str | None = _f("why there is no AUC (written by earlier versions)", omit=True)

    def row(self, name: str) -> ClassRow:
        return self.report[name]


# --------------------------------------------------------------------------- the multi-label task

@dataclass(frozen=True)
class FindingCurves(Record):
    """A finding's ROC curve (in memory, for the plots)."""
    roc: RocCurve | None = _f("ROC curve")


@dataclass(frozen=True)
class FindingResult(Record):
    """One finding of a multi-label evaluation."""
    positives: int | None = _f("positive images")
    auc: float | None = _f("ROC AUC, null with one class only")
    auc_ci: AucInterval | None = _f("its patient-bootstrap interval")
    chexnet_auc: float | None = _f("CheXNet's published AUC (reference)")
    subgroups: dict[str, dict[str, SubgroupAuc]] | None = _f("per `view` and `sex` value: the AUC", omit=True)
    curves: FindingCurves | None = _f("ROC curve for the plot (not written)", json=False)


@dataclass(frozen=True)
class MultilabelResult(Record):
    """``plain`` and ``tta`` of a multi-label evaluation (``metrics.multilabel_metrics``)."""
    n: int | None = _f("test images")
    patients: int | None = _f("test patients")
    threshold: float | None = _f("`eval.threshold` for every finding")
    findings: dict[str, FindingResult] | None = _f("per finding")
    mean_auc: float | None = _f("mean AUC over the findings with both classes")
    findings_with_auc: int | None = _f("how many findings that is")
    report: dict[str, ClassRow | float] | None = _f("per finding and averages at `eval.threshold`; `accuracy`: "
                                                     "exact match")
    note: str | None = _f("why there is no AUC (written by earlier versions)", omit=True)


# --------------------------------------------------------------------------- comparisons and facts

@dataclass(frozen=True)
class DeLong(Record):
    """DeLong's paired test with patients as clusters (Obuchowski 1997)."""
    auc_diff: float | None = _f("the difference")
    se: float | None = _f("its standard error")
    z: float | None = _f("z")
    p: float | None = _f("two-sided p")
    low: float | None = _f("Wald interval, lower")
    high: float | None = _f("upper")
    level: float | None = _f("0.95")
    method: str | None = _f("the variance used")
    findings: int | None = _f("multi-label: findings averaged", omit=True)
    cases: int | None = _f("patients (independent cases)", omit=True)


@dataclass(frozen=True)
class AucDifference(Record):
    """TTA minus plain, paired patient bootstrap (multi-label: the mean AUC over a fixed set of findings)."""
    auc_diff: float | None = _f("the difference")
    low: float | None = _f("lower bound (BCa)")
    high: float | None = _f("upper bound")
    by: str | None = _f("`patient`")
    n_boot: int | None = _f("resamples drawn")
    n_valid: int | None = _f("resamples used")
    of: str | None = _f("multi-label: `mean AUC`", omit=True)
    findings: int | None = _f("multi-label: the findings with both classes, the same in every resample", omit=True)
    zero_width: bool | None = _f("every resample gave the same value", omit=True)
    method: str | None = _f("`bca`", omit=True)
    percentile: Percentile | None = _f("the percentile interval", omit=True)
    delong: DeLong | None = _f("DeLong's test of the same difference", omit=True)


@dataclass(frozen=True)
class SplitAuc(Record):
    """The AUC of some positives against all negatives."""
    value: float | None = _f("ROC AUC")
    low: float | None = _f("lower bound")
    high: float | None = _f("upper bound")
    n_valid: int | None = _f("resamples used")
    method: str | None = _f("`bca`")
    images: int | None = _f("images")
    positives: int | None = _f("positive images")
    negatives: int | None = _f("negative images")


@dataclass(frozen=True)
class CoFindings(Record):
    """Binary: positives with and without other findings."""
    positives: int | None = _f("test positives")
    positives_with_co_findings: int | None = _f("of them with another finding")
    auc_with: SplitAuc | None = _f("AUC of those against all negatives")
    auc_without: SplitAuc | None = _f("AUC of the others against all negatives")
    negatives_with_findings: int | None = _f("negatives carrying a finding")


@dataclass(frozen=True)
class SelectedCheckpoint(Record):
    """The evaluated model (``rundir.select_checkpoint``)."""
    file: str | None = _f("the file, relative to `run.dir`")
    rule: str | None = _f("how it was chosen")
    phase: str | None = _f("its phase")
    epoch: int | None = _f("its epoch")
    val_loss: float | None = _f("its validation loss")
    note: str | None = _f("a fallback taken", omit=True)


@dataclass(frozen=True)
class PrepSummary(Record):
    """A prep folder's identity (``provenance.summary``)."""
    format: int | None = _f("`training_prep.json`'s format (`trained_on` only)", omit=True)
    prep_out: str | None = _f("the prep folder")
    manifest_sha256: str | None = _f("sha256 of its manifest.json")
    config_hash: str | None = _f("its config hash")
    prep_seed: int | None = _f("its prep.seed")
    created: str | None = _f("when it was made")
    splits: dict | None = _f("per split: `patients`, `patients_sha256`")


@dataclass(frozen=True)
class Shared(Record):
    """Patients in two splits."""
    patients: dict[str, int] | None = _f("patients per split (`train`, `val`, `test`)")
    train_val: int | None = _f("training patients in validation")
    train_test: int | None = _f("training patients in test")
    val_test: int | None = _f("validation patients in test")


@dataclass(frozen=True)
class Provenance(Record):
    """The prep evaluated against the one the run trained on (``provenance.check``)."""
    evaluation: str | None = _f("`internal`, `external` or `unverified`")
    trained_on: PrepSummary | None = _f("the prep the model trained on (as in `training_prep.json`)")
    evaluated_on: PrepSummary | None = _f("the prep evaluated (with `splits.test`)")
    note: str | None = _f("how the training prep was found")
    allow_overlap: bool | None = _f("`eval.allow_overlap`")
    shared: Shared | None = _f("patients shared between splits; null when not checked")


@dataclass(frozen=True)
class Timings(Record):
    """Where the evaluation's time went."""
    predict_per_rank: list | None = _f("seconds per rank")
    metrics: float | None = _f("seconds for the metrics")


@dataclass(frozen=True)
class ClassCount(Record):
    """Images and patients of one class at a step of the flow."""
    images: int | None = _f("distinct images of the class")
    patients: int | None = _f("patients with an image of the class")


@dataclass(frozen=True)
class FlowStep(Record):
    """One step of the flow of images and patients (``data_prep.flow``)."""
    step: str | None = _f("`csv`, `usable`, `task`, `files`, `split`, `capped`, `written` or `evaluated`")
    split: str | None = _f("the split, null for the whole data set")
    what: str | None = _f("what the step keeps")
    images: int | None = _f("distinct images")
    patients: int | None = _f("patients (null where not counted)")
    classes: dict[str, ClassCount] | None = _f("per class: images and patients")
    rows: int | None = _f("rows with a balanced split's resampled copies", omit=True)


@dataclass(frozen=True)
class Flow(Record):
    """STARD's flow of images and patients: the manifest's, with the evaluated test images added."""
    classes: list | None = _f("the classes counted")
    steps: list[FlowStep] | None = _f("the steps, in order")


@dataclass(frozen=True)
class Labels(Record):
    """How the prep read the labels (the manifest's ``labels``; [user guide](user-guide.md#your-own-data))."""
    format: str | None = _f("`data.format`: `nih`, `chexpert` or `csv`")
    uncertain: str | None = _f("`data.uncertain`: `ignore` (masked), `positive` or `negative`", omit=True)
    uncertain_labels: dict[str, int] | None = _f("per finding: uncertain (-1) labels read", omit=True)
    blank_labels: dict[str, int] | None = _f("per finding: blank labels read", omit=True)
    masked_images: int | None = _f("binary: images left out because their positive label was uncertain and "
                                   "masked", omit=True)
    patient_from: str | None = _f("where patient ids came from: a column, CheXpert's path, the DICOM header or the "
                                   "image itself", omit=True)
    pseudonymized: bool | None = _f("patient ids replaced by a keyed hash (`data.pseudonymize`)", omit=True)
    masked_per_split: dict[str, dict[str, int]] | None = _f("per split and finding: labels masked in the shards",
                                                            omit=True)
    masked_test_labels: int | None = _f("multilabel: labels masked in the evaluated test split", omit=True)


@dataclass(frozen=True)
class TaskDefinition(Record):
    """The task the model was trained for (`data.*`)."""
    task: str | None = _f("`data.task`")
    positive_label: str | None = _f("binary: `data.positive_label`")
    negative_rule: str | None = _f("binary: `data.negative_rule`")


@dataclass(frozen=True)
class Prevalence(Record):
    """Share of positives per split as prepared, the natural one, and the stated deployment prevalence."""
    train: float | None = _f("training split", omit=True)
    val: float | None = _f("validation split", omit=True)
    test: float | None = _f("test split", omit=True)
    natural: float | None = _f("all images of the task before caps and balancing", omit=True)
    natural_train_val: float | None = _f("the same of train+val: the prior-correction target unless "
                                         "`eval.prevalence`", omit=True)
    deployment: float | None = _f("`eval.prevalence` or null")

    def items(self) -> Iterator[tuple[str, Any]]:
        """(name, share) in the order metrics.json holds them."""
        return iter(self.to_json().items())


@dataclass(frozen=True)
class AboveBoth(Record):
    """Where the model's net benefit exceeds treating all and treating none."""
    thresholds: int | None = _f("thresholds where the model beats treat-all and treat-none")
    lowest: float | None = _f("the lowest of them")
    highest: float | None = _f("the highest")


@dataclass(frozen=True)
class DecisionCurve(Record):
    """Binary: the decision curve's summary (``decision.summary``); the values are in decision_curve.csv."""
    file: str | None = _f("`decision_curve.csv`")
    probability: str | None = _f("the column used")
    threshold_range: list | None = _f("[lowest, highest] threshold probability")
    n: int | None = _f("images")
    prevalence: float | None = _f("the test split's prevalence")
    model_above_both: AboveBoth | None = _f("where the model's net benefit exceeds both")


@dataclass(frozen=True)
class PhaseLayers(Record):
    """What one training phase trained (``trained_layers.json``)."""
    backbone_layers: int | None = _f("layers of the backbone")
    frozen: list | None = _f("frozen backbone layers")
    trained: list | None = _f("trained backbone layers")
    head: list | None = _f("the head's layers (trained)", omit=True)
    trainable_params: int | None = _f("trainable parameters")
    non_trainable_params: int | None = _f("frozen parameters", omit=True)


@dataclass(frozen=True)
class PrecisionUsed(Record):
    """The compute precisions (`runtime.precision`); probabilities are float32 either way."""
    evaluation: str | None = _f("compute precision of the evaluation")
    training: str | None = _f("compute precision of the training")


@dataclass(frozen=True)
class EvalResult(Record):
    """The top level of ``metrics.json``."""
    format: int | None = _f("2")
    task: str | None = _f("`binary` or `multilabel`")
    classes: list | None = _f("class names")
    positive_class: str | None = _f("binary: the positive class")
    model: str | None = _f("the evaluated file, relative to `run.dir`")
    run_dir: str | None = _f("the run directory")
    provenance: Provenance | None = _f("the evaluated prep against the training prep")
    checkpoint: str | None = _f("`eval.checkpoint`")
    selected_checkpoint: SelectedCheckpoint | None = _f("the evaluated model, from `history.csv`")
    image_size: int | None = _f("image side (px)")
    n: int | None = _f("test images")
    n_val: int | None = _f("validation images")
    ranks: int | None = _f("ranks that predicted")
    threshold: float | None = _f("`eval.threshold`")
    tta_rounds: int | None = _f("TTA copies per image (0 = off)")
    bootstrap: int | None = _f("`eval.bootstrap` resamples")
    bootstrap_by: str | None = _f("`patient`")
    bootstrap_interval: str | None = _f("`bca`")
    primary: str | None = _f("`plain`: the primary result")
    seconds: float | None = _f("wall time of the evaluation")
    timings: Timings | None = _f("seconds per stage")
    warnings: list | None = _f("warnings also in the log and the report (e.g. a model that does not learn)")
    split_method: str | None = _f("how the split was made")
    trained_layers: dict[str, PhaseLayers] | None = _f("`trained_layers.json` of the run (null before it existed)")
    task_definition: TaskDefinition | None = _f("the task's rule")
    prevalence: Prevalence | None = _f("share of positives per split (binary)")
    flow: Flow | None = _f("the manifest's flow of images and patients with the `evaluated` test step "
                           "(`data_prep.flow`); null for a prep that recorded none")
    labels: Labels | None = _f("how the prep read the labels: format, uncertain-label policy and masked counts "
                               "(absent for a prep that recorded none)", omit=True)
    decision_curve: DecisionCurve | None = _f("binary: the decision curve's summary")
    operating_point: OperatingPoint | None = _f("binary: the plain evaluation's operating point (copy of "
                                                "`plain.operating_point`)", omit=True)
    tta_minus_plain: AucDifference | None = _f("with TTA: TTA minus plain, paired", omit=True)
    co_findings: CoFindings | None = _f("binary, with the CSV readable: positives with other findings", omit=True)
    plain: BinaryResult | MultilabelResult | None = _f("the network's probabilities: the primary result")
    tta: BinaryResult | MultilabelResult | None = _f("the TTA average (null without TTA)")
    plots: dict[str, str] | None = _f("`{name: relative path}` of the plots written")
    gradcam: dict[str, str] | None = _f("`{group: relative path}` of the Grad-CAM grids written")
    gradcam_layer: str | None = _f("the layer Grad-CAM used")
    gradcam_threshold: float | None = _f("the threshold that sorted the images")
    precision: PrecisionUsed | None = _f("compute precisions")
    console: str | None = _f("the tables printed on the console")

    @property
    def binary(self) -> bool:
        return self.task == "binary"

    @classmethod
    def from_json(cls, data: Mapping | None):
        if data is None:
            return None
        r = super().from_json(data)
        kind = MultilabelResult if data.get("task") == "multilabel" else BinaryResult
        return dataclasses.replace(r, plain=kind.from_json(data.get("plain")), tta=kind.from_json(data.get("tta")))

    def chosen_operating_point(self) -> OperatingPoint:
        """The operating point the report states: the top-level one, else the plain evaluation's, else empty."""
        return self.operating_point or getattr(self.plain, "operating_point", None) or OperatingPoint()


def trained_layers(doc) -> dict | None:
    """``trained_layers.json`` (``rundir.read_trained_layers``) as ``EvalResult.trained_layers``."""
    return _load(_hints(EvalResult)["trained_layers"], doc)


# --------------------------------------------------------------------------- metrics.json

def write(path, result: EvalResult) -> Path:
    """``metrics.json``: the one place it is written."""
    from data_prep.fsutil import atomic_write_json

    return atomic_write_json(path, result.to_json())


def read(path) -> EvalResult:
    """``metrics.json``: the one place it is read (OSError, ValueError or TypeError when unreadable)."""
    return EvalResult.from_json(json.loads(Path(path).read_text()))


def read_if_valid(path) -> EvalResult | None:
    """:func:`read`, or None when the file is missing, unreadable or not a JSON object."""
    try:
        return read(path)
    except (OSError, ValueError, TypeError):
        return None


# --------------------------------------------------------------------------- the schema, from the code

def _link(rec) -> str:
    return f"[{rec.__name__}](#{rec.__name__.lower()})"


def _type_text(tp) -> str:
    """A field's JSON type as the reference writes it, records linked to their section."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNION:
        return " or ".join(_type_text(a) for a in args if a is not type(None))
    if isinstance(tp, type) and issubclass(tp, Record):
        return _link(tp)
    if origin is dict:
        return f"map of {_type_text(args[1])}" if len(args) == 2 else "object"
    if origin is list:
        return f"list of {_type_text(args[0])}" if args else "list"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "list"}
    return names[tp] if tp in names else str(tp)


def _below(tp) -> list:
    """The Record classes a field's type names, at any depth (``dict[str, dict[str, X]]``, unions, lists)."""
    if isinstance(tp, type) and issubclass(tp, Record):
        return [tp]
    return [r for a in typing.get_args(tp) for r in _below(a)]


def _json_fields(cls) -> list:
    return [f for f in dataclasses.fields(cls) if f.name != "unknown" and f.metadata.get("json", True)]


def records(root=EvalResult) -> list:
    """Every record metrics.json can hold, from ``root`` down, each once, in the order first reached."""
    out, todo = [], [root]
    while todo:
        cls = todo.pop(0)
        if cls in out:
            continue
        out.append(cls)
        todo += [r for f in _json_fields(cls) for r in _below(_hints(cls)[f.name])]
    return out


def schema_markdown() -> str:
    """``docs/metrics-reference.md``: a table per record (key, type, meaning), from the fields and their ``doc``."""
    out = ["# metrics.json reference", "",
           "Generated from `distributed/results.py` (`python -m distributed.results > docs/metrics-reference.md`); "
           "what the numbers mean and how they are computed is in the [results guide](results-guide.md#metricsjson). "
           "Every key is written, null when it has no value, except those marked *omitted when empty*. "
           "`map of X`: an object whose keys are names (classes, findings, subgroups, phases).", ""]
    for cls in records():
        out += [f"## {cls.__name__}", "", " ".join(cls.__doc__.split()).replace("``", "`"), "",
                "| key | type | meaning |", "| --- | --- | --- |"]
        for f in _json_fields(cls):
            doc = f.metadata["doc"] + (" (*omitted when empty*)" if f.metadata.get("omit") else "")
            out.append(f"| `{f.metadata.get('key') or f.name}` | {_type_text(_hints(cls)[f.name])} | "
                       f"{doc.replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(schema_markdown(), end="")
