"""metrics.json through ``distributed.results`` (issue 35, typed results): real files cxr-eval wrote
(tests/fixtures/metrics_*.json.gz) read into the records and written back byte for byte, every key they hold known
to the records, and an older file without the keys added since still loads and renders. No TensorFlow."""
import dataclasses
import gzip
import json
import subprocess
import sys

import pytest

from distributed import results
from distributed.results import EvalResult

FIXTURES = ["metrics_binary.json.gz", "metrics_external.json.gz", "metrics_multilabel.json.gz"]


def _text(fixtures, name) -> str:
    return gzip.decompress((fixtures / name).read_bytes()).decode()


def _unknown_keys(obj, path="") -> list[str]:
    """Paths of the keys a record kept as unknown, anywhere below ``obj``."""
    out = []
    if isinstance(obj, results.Record):
        out += [f"{path}.{k}" for k in (getattr(obj, "unknown", None) or {})]
        for f in dataclasses.fields(obj):
            if f.name != "unknown":
                out += _unknown_keys(getattr(obj, f.name), f"{path}.{f.name}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out += _unknown_keys(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _unknown_keys(v, f"{path}[{i}]")
    return out


@pytest.mark.parametrize("name", FIXTURES)
def test_a_real_metrics_json_round_trips_byte_for_byte(fixtures, tmp_path, name):
    text = _text(fixtures, name)
    r = results.EvalResult.from_json(json.loads(text))
    results.write(tmp_path / "metrics.json", r)
    assert (tmp_path / "metrics.json").read_text() == text
    assert results.read(tmp_path / "metrics.json") == r
    assert _unknown_keys(r) == []  # every key cxr-eval writes is a field of a record (and in the reference)


def test_the_records_are_typed_all_the_way_down(fixtures):
    m = json.loads(_text(fixtures, "metrics_binary.json.gz"))
    r = EvalResult.from_json(m)
    assert r.binary and isinstance(r.plain, results.BinaryResult) and isinstance(r.tta, results.BinaryResult)
    op = r.plain.operating_point
    assert r.operating_point == op and isinstance(op.sensitivity, results.Proportion)
    assert isinstance(op.sensitivity.bootstrap, results.Interval) and op.sensitivity.value == m["operating_point"][
        "sensitivity"]["value"]
    assert op.at_prevalence.prevalence == 0.1 and op.at_prevalence.ppv.value == m["plain"]["operating_point"][
        "at_prevalence"]["ppv"]["value"]
    assert r.plain.calibrated.method == "temperature" and r.plain.calibrated.validation.in_sample is True
    assert isinstance(r.plain.report["Infiltration"], results.ClassRow)
    assert isinstance(r.plain.report["accuracy"], float)
    assert r.plain.row("Infiltration").f1_score == m["plain"]["report"]["Infiltration"]["f1-score"]
    assert all(isinstance(v, results.SubgroupAuc) for g in r.plain.subgroups.values() for v in g.values())
    assert r.tta_minus_plain.delong.cases == m["tta_minus_plain"]["delong"]["cases"]
    assert r.flow.steps[-1].step == "evaluated" and r.flow.steps[-1].images == r.n
    assert r.co_findings.auc_with.positives + r.co_findings.auc_without.positives == r.plain.positives
    ext = EvalResult.from_json(json.loads(_text(fixtures, "metrics_external.json.gz")))
    assert ext.provenance.evaluation == "external" and ext.provenance.shared.train_test > 0
    ml = EvalResult.from_json(json.loads(_text(fixtures, "metrics_multilabel.json.gz")))
    assert isinstance(ml.plain, results.MultilabelResult) and ml.operating_point is None
    aucs = [f.auc for f in ml.plain.findings.values() if isinstance(f, results.FindingResult) and f.auc is not None]
    assert len(aucs) == ml.plain.findings_with_auc and ml.plain.mean_auc == pytest.approx(sum(aucs) / len(aucs))


def test_an_older_metrics_json_loads_and_the_report_renders(fixtures, tmp_path):
    """Keys added by later versions missing (flow, decision curve, trained layers, precision, co-findings, DeLong,
    BCa's percentile): they read as None and the report says what is not recorded, as the dict readers did."""
    from data_prep.config import load_config
    from distributed.report import FLOW_NOT_RECORDED, write_report

    m = json.loads(_text(fixtures, "metrics_binary.json.gz"))
    for k in ("flow", "decision_curve", "trained_layers", "precision", "co_findings", "split_method", "format"):
        del m[k]
    del m["tta_minus_plain"]["delong"], m["plain"]["auc_ci"]["percentile"], m["plain"]["calibrated"]
    r = EvalResult.from_json(m)
    assert r.flow is None and r.tta_minus_plain.delong is None and r.plain.auc_ci.percentile is None
    out = r.to_json()  # a missing key is written as null, one left out when empty stays out
    assert out["flow"] is None and out["precision"] is None and "co_findings" not in out
    assert "calibrated" not in out["plain"] and out["plain"]["auc"] == m["plain"]["auc"]
    cfg = load_config(None, [f"run.dir={tmp_path}"])
    write_report(tmp_path, cfg=cfg, manifest=None, metrics=r, plots={}, gradcam={}, config_yaml="")
    text = (tmp_path / "report.md").read_text()
    assert FLOW_NOT_RECORDED in text and "trained layers not recorded" in text
    assert "| split method | seeded, by patient |" in text and "DeLong" not in text


def test_unknown_keys_are_kept_and_written_back_after_the_known_ones():
    doc = {"task": "binary", "plain": {"auc": 0.7, "new_number": 3, "operating_point": {"threshold": 0.4, "x": 1}},
           "tta": None, "later": [1, 2]}
    r = EvalResult.from_json(doc)
    assert r.unknown == {"later": [1, 2]} and r.plain.unknown == {"new_number": 3}
    out = r.to_json()
    assert list(out)[-1] == "later" and out["plain"]["new_number"] == 3
    assert out["plain"]["operating_point"] == {"source": None, "rule": None, "threshold": 0.4, "x": 1}


def test_results_loads_neither_tensorflow_nor_numpy():
    code = "import sys, distributed.results; print([m for m in ('tensorflow', 'numpy') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
