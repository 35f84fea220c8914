"""The decision curve (issue 34): net benefit recomputed by hand from predictions.csv, the report's note on the test
set's prevalence, and the plot. No TensorFlow."""
import io

import numpy as np
import pandas as pd
import pytest

from distributed import decision
from distributed import metrics as M
from distributed.evaluate import predictions_csv
from distributed.plots import plot_decision_curve
from distributed.report import decision_note
from distributed.results import DecisionCurve


@pytest.fixture(scope="module")
def predictions():
    """predictions.csv of 60 test images (as cxr-eval writes it, probabilities as written), read back."""
    rng = np.random.default_rng(34)
    y = np.array([1] * 20 + [0] * 40)
    p = M.as_written(np.clip(0.3 * y + rng.random(60) * 0.7, 0, 1).astype(np.float32))
    meta = {"image_index": [f"{i:08d}_000.png" for i in range(60)], "patient_id": np.arange(60) // 2,
            "view": ["PA"] * 60, "sex": ["M"] * 60, "age": np.full(60, 40), "label": y}
    probs = np.stack([1 - p, p], axis=1)
    return pd.read_csv(io.StringIO(predictions_csv(meta, ["No Finding", "Infiltration"], False, probs, None)))


def test_net_benefit_equals_a_hand_computation_from_predictions_csv(predictions):
    y, p = predictions["label"].to_numpy(), predictions["probability"].to_numpy()
    c = decision.curve(y, p)
    dc = pd.read_csv(io.StringIO(decision.curve_csv(c)))
    assert list(dc["threshold"]) == [k / 100 for k in range(1, 100)]
    n, prev = len(y), y.mean()
    for _, r in dc.iterrows():
        pt = r["threshold"]
        tp = sum(1 for yi, pi in zip(y, p) if pi >= pt and yi == 1)
        fp = sum(1 for yi, pi in zip(y, p) if pi >= pt and yi == 0)
        assert (r["tp"], r["fp"], r["n"]) == (tp, fp, 60)
        assert r["net_benefit"] == pytest.approx(tp / n - fp / n * pt / (1 - pt), rel=1e-12, abs=1e-15)
        assert r["net_benefit_treat_all"] == pytest.approx(prev - (1 - prev) * pt / (1 - pt), rel=1e-12, abs=1e-15)
        assert r["net_benefit_treat_none"] == 0.0
    s = decision.summary(c, float(prev))
    above = dc[(dc["net_benefit"] > dc["net_benefit_treat_all"]) & (dc["net_benefit"] > 0)]["threshold"]
    assert s["model_above_both"] == {"thresholds": len(above), "lowest": above.min(), "highest": above.max()}
    assert s["prevalence"] == pytest.approx(1 / 3) and s["n"] == 60 and s["threshold_range"] == [0.01, 0.99]


def test_report_says_the_net_benefit_holds_at_the_test_prevalence(predictions, tmp_path):
    y, p = predictions["label"].to_numpy(), predictions["probability"].to_numpy()
    c = decision.curve(y, p)
    note = decision_note(DecisionCurve.from_json(decision.summary(c, float(y.mean()))))
    assert "**the test set's prevalence** (0.333, 60 images)" in note and "`decision_curve.csv`" in note
    assert "TP/n − FP/n × pt/(1 − pt)" in note and "from 0.01 to 0.99" in note
    out = plot_decision_curve(tmp_path / "plots" / "decision_curve.png", c, float(y.mean()))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    none = decision.curve(y, np.zeros_like(p))
    assert "exceeds both at none of the thresholds" in decision_note(
        DecisionCurve.from_json(decision.summary(none, float(y.mean()))))
