"""The numbers a reviewer checks: operating point chosen on validation, calibration, paired bootstrap,
prior correction, intervals (distributed.metrics; no TensorFlow). Each is recomputed independently."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score, roc_curve
from test_metrics import _data  # noqa: E402 - the same synthetic scores

from distributed import metrics as M
from distributed.results import BinaryResult, EvalResult, OperatingPoint


def _explicit_resamples(g, n_boot, seed):
    """Patients drawn with replacement, the resampled data set built by concatenating every drawn
    patient's images (the same generator calls as metrics.patient_resample_weights)."""
    pats = np.unique(g)
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        drawn = pats[rng.integers(0, len(pats), len(pats))]
        yield np.concatenate([np.flatnonzero(g == q) for q in drawn])


def test_paired_bootstrap_equals_explicit_resampling():
    y, p_plain, g = _data(seed=1)
    p_tta = np.clip(p_plain + np.random.default_rng(2).normal(0, 0.1, len(y)), 0, 1)
    d = M.paired_auc_difference(y, p_plain, p_tta, g, n_boot=200, seed=7)
    diffs = []
    for idx in _explicit_resamples(g, 200, 7):
        if len(set(y[idx])) == 2:
            diffs.append(roc_auc_score(y[idx], p_tta[idx]) - roc_auc_score(y[idx], p_plain[idx]))
    assert d["auc_diff"] == pytest.approx(roc_auc_score(y, p_tta) - roc_auc_score(y, p_plain), abs=1e-12)
    assert d["n_valid"] == len(diffs) == 200 and d["by"] == "patient"
    assert d["percentile"]["low"] == pytest.approx(np.percentile(diffs, 2.5), abs=1e-12)
    assert d["percentile"]["high"] == pytest.approx(np.percentile(diffs, 97.5), abs=1e-12)
    assert d["method"] == "bca" and d["low"] < d["auc_diff"] < d["high"]


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_average_precision_equals_sklearn(ties):
    y, p, _ = _data(ties=ties)
    w = np.random.default_rng(1).integers(0, 4, len(y)).astype(float)
    tg = M._TieGroups(y, p)
    assert tg.average_precision(np.ones(len(y))) == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert tg.average_precision(w) == pytest.approx(average_precision_score(y, p, sample_weight=w), abs=1e-12)


def test_operating_point_interval_equals_explicit_resampling():
    y, p, g = _data(seed=3)
    op = M.operating_point_metrics(y, p, 0.5, g, n_boot=100, seed=4, prevalence=0.25)
    pred = p >= 0.5
    sens, spec = pred[y == 1].mean(), 1 - pred[y == 0].mean()
    assert op["sensitivity"]["value"] == pytest.approx(sens)
    assert op["specificity"]["value"] == pytest.approx(spec)
    assert op["ppv"]["value"] == pytest.approx(y[pred].mean())
    assert op["npv"]["value"] == pytest.approx(1 - y[~pred].mean())
    assert op["accuracy"]["value"] == pytest.approx((pred == y).mean())
    ss = [pred[idx][y[idx] == 1].mean() for idx in _explicit_resamples(g, 100, 4)]
    assert op["sensitivity"]["bootstrap"]["percentile"]["low"] == pytest.approx(np.percentile(ss, 2.5))
    assert op["sensitivity"]["bootstrap"]["percentile"]["high"] == pytest.approx(np.percentile(ss, 97.5))
    assert op["sensitivity"]["bootstrap"]["n_valid"] == 100
    # PPV at a deployment prevalence of 25 %, by hand (Bayes)
    ppv = sens * 0.25 / (sens * 0.25 + (1 - spec) * 0.75)
    assert op["at_prevalence"]["ppv"]["value"] == pytest.approx(ppv)
    assert op["at_prevalence"]["ppv"]["low"] <= ppv <= op["at_prevalence"]["ppv"]["high"]


def test_the_issue_s_worked_example_of_precision_at_two_prevalences():
    """Sensitivity 0.68 / specificity 0.62: PPV 0.64 at 50 %, 0.37 at 25 %."""
    assert M.predictive_values(0.68, 0.62, 0.5)["ppv"] == pytest.approx(0.6415, abs=1e-4)
    assert M.predictive_values(0.68, 0.62, 0.25)["ppv"] == pytest.approx(0.3736, abs=1e-4)


def test_thresholds_follow_their_rule_on_the_given_split():
    y, p, _ = _data(seed=5)
    fpr, tpr, thr = roc_curve(y, p)
    scores = np.unique(p)
    best = thr[np.argmax(tpr - fpr)]  # Youden's score; the threshold halfway to the next lower score
    assert M.choose_threshold("youden", y, p) == (best + scores[scores < best].max()) / 2
    assert M.choose_threshold("fixed:0.3", y, p) == 0.3
    t = M.choose_threshold("sensitivity:0.9", y, p)
    s = scores[scores > t].min()  # the lowest score it makes positive
    up = scores[scores > s].min()  # the highest such cut: one score up loses it
    assert t not in scores and t > scores[scores < s].max()
    assert (p[y == 1] >= t).mean() >= 0.9 > (p[y == 1] >= up).mean()
    t = M.choose_threshold("specificity:0.8", y, p)
    down = scores[scores < t].max()  # the lowest such cut: one score down loses it
    assert t not in scores and (p[y == 0] < t).mean() >= 0.8 > (p[y == 0] < down).mean()
    for bad in ("youden:1", "sensitivity", "sensitivity:x", "fixed:2", "median"):
        with pytest.raises(ValueError):
            M.parse_operating_point(bad)


def test_brier_and_ece_by_hand():
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.05, 0.15, 0.12, 0.95, 0.99])
    assert M.brier(y, p) == pytest.approx(brier_score_loss(y, p))
    # bins: [0, .1): {0.05: y 0}; [.1, .2): {0.15: 0, 0.12: 1}; [.9, 1]: {0.95: 1, 0.99: 1}
    ece = (1 / 5) * abs(0 - 0.05) + (2 / 5) * abs(0.5 - 0.135) + (2 / 5) * abs(1 - 0.97)
    assert M.ece(y, p) == pytest.approx(ece)
    rel = M.reliability(y, p)
    assert [b["n"] for b in rel] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert M.ece(np.array([1]), np.array([1.0])) == 0.0  # p = 1 falls in the last bin


def test_prior_correction_by_hand():
    # trained at 50 %, natural prevalence 25 %: odds x (1/3); p 0.8 -> odds 4 -> 4/3 -> 4/7
    shift = M.prior_shift(0.5, 0.25)
    assert M.adjust(np.array([0.8]), 1.0, shift)[0] == pytest.approx(4 / 7)
    assert M.adjust(np.array([0.5]), 1.0, shift)[0] == pytest.approx(0.25)
    # temperature: logit halved at T = 2
    assert M.adjust(np.array([0.8]), 2.0, 0.0)[0] == pytest.approx(1 / (1 + np.exp(-np.log(4) / 2)))


def test_temperature_fitted_undoes_an_overconfident_model():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(int)  # calibrated at logit z
    p_over = 1 / (1 + np.exp(-3 * z))  # three times too confident
    t = M.fit_temperature(y, p_over)
    assert t == pytest.approx(3.0, rel=0.1)
    assert M.ece(y, M.adjust(p_over, t)) < M.ece(y, p_over) / 2


def test_binary_metrics_carry_intervals_and_label_the_test_fitted_threshold_oracle():
    y, p, g = _data(seed=6)
    views = np.where(np.arange(len(y)) % 3 == 0, "AP", "PA")
    m = M.binary_metrics(y, p, groups=g, subgroups={"view": views}, n_boot=50, seed=0,
                         operating={"source": "validation", "rule": "fixed:0.5", "threshold": 0.5})
    assert "youden" not in m and m["oracle"]["fitted_on"] == "test"
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    for k in ("brier_ci", "ece_ci", "average_precision_ci"):
        assert m[k]["low"] <= m[k]["high"] and m[k]["n_valid"] == 50
    assert m["average_precision_ci"]["low"] <= m["average_precision"] <= m["average_precision_ci"]["high"]
    for v in m["subgroups"]["view"].values():
        assert v["auc_ci"]["low"] <= v["auc"] <= v["auc_ci"]["high"]
    op = m["operating_point"]
    assert op["threshold"] == 0.5 and op["source"] == "validation"
    for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy"):
        assert op[k]["low"] <= op[k]["value"] <= op[k]["high"]


def test_auc_of_positives_with_and_without_co_findings():
    y, p, g = _data(seed=8)
    co = np.arange(len(y)) % 2 == 0
    a = M.split_auc(y, p, co, g, n_boot=20)
    keep = (y == 0) | (co & (y == 1))
    assert a["value"] == pytest.approx(roc_auc_score(y[keep], p[keep]))
    assert a["positives"] == int((co & (y == 1)).sum()) and a["low"] <= a["high"]


def test_multilabel_paired_mean_auc_difference_equals_explicit_resampling():
    rng = np.random.default_rng(4)
    Y = rng.integers(0, 2, (150, 3))
    Pa = np.clip(0.3 * Y + rng.random((150, 3)) * 0.7, 0, 1)
    Pb = np.clip(Pa + rng.normal(0, 0.1, Pa.shape), 0, 1)
    g = rng.integers(0, 40, 150)
    d = M.paired_mean_auc_difference(Y, Pa, Pb, g, n_boot=60, seed=2)
    diffs = [np.mean([roc_auc_score(Y[idx, k], Pb[idx, k]) - roc_auc_score(Y[idx, k], Pa[idx, k]) for k in range(3)])
             for idx in _explicit_resamples(g, 60, 2)]
    assert d["auc_diff"] == pytest.approx(np.mean([roc_auc_score(Y[:, k], Pb[:, k]) - roc_auc_score(Y[:, k], Pa[:, k])
                                                   for k in range(3)]))
    assert d["percentile"]["low"] == pytest.approx(np.percentile(diffs, 2.5))
    assert d["percentile"]["high"] == pytest.approx(np.percentile(diffs, 97.5))


def test_two_by_two_at_the_operating_point_equals_a_hand_count_from_predictions_csv():
    """Issue 34.1: the 2x2 table at the operating point (not at 0.5), counted by hand from predictions.csv."""
    import csv
    import io

    from distributed.evaluate import predictions_csv
    from distributed.report import binary_section

    rng = np.random.default_rng(5)
    n = 120
    y = (rng.random(n) < 0.4).astype(int)
    raw = np.clip(0.25 + 0.3 * y + rng.normal(0, 0.15, n), 0, 1).astype(np.float32)  # mostly below 0.5
    probs = np.stack([1 - raw, raw], axis=1)
    yv = (rng.random(80) < 0.4).astype(int)
    pv = M.as_written(np.clip(0.25 + 0.3 * yv + rng.normal(0, 0.15, 80), 0, 1))
    t = M.choose_threshold("youden", yv, pv)
    meta = {"image_index": [f"i{i}.png" for i in range(n)], "patient_id": np.arange(n) // 2, "view": ["PA"] * n,
            "sex": ["F"] * n, "age": [50] * n, "label": y}
    text = predictions_csv(meta, ["No Finding", "Effusion"], False, probs, None)
    m = M.binary_metrics(y, M.as_written(raw), class_names=("No Finding", "Effusion"), groups=meta["patient_id"],
                         n_boot=20, operating={"source": "validation", "rule": "youden", "threshold": t})
    rows = list(csv.DictReader(io.StringIO(text)))
    hand = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    for r in rows:
        pos, truth = float(r["probability"]) >= t, r["label"] == "1"
        hand[("t" if pos == truth else "f") + ("p" if pos else "n")] += 1
    op = m["operating_point"]
    assert {k: op[k] for k in hand} == hand
    assert op["sensitivity"]["value"] == hand["tp"] / (hand["tp"] + hand["fn"])
    assert t < 0.4 and m["confusion_matrix"][1][0] != hand["fn"]  # the 0.5 table is another table
    sec = binary_section(BinaryResult.from_json(m), None, ["No Finding", "Effusion"], 0,
                         EvalResult.from_json({"operating_point": op}))
    assert sec.index("### 2x2 table at the operating point") < sec.index("### Summary")
    assert f"TP {hand['tp']}, FP {hand['fp']}, FN {hand['fn']}, TN {hand['tn']}" in sec
    assert f"threshold {t:.9g}" in sec and "secondary, not the operating point" in sec


def test_clopper_pearson_of_64_of_64_and_the_zero_width_bootstrap_is_flagged():
    """Issue 34.2: sensitivity 64/64 has the exact lower bound 0.9440 (= 0.025 ** (1/64)), not 1.000."""
    lo, hi = M.clopper_pearson(64, 64)
    assert round(lo, 4) == 0.9440 and lo == pytest.approx(0.025 ** (1 / 64), abs=1e-12) and hi == 1.0
    lo, hi = M.clopper_pearson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 20), abs=1e-12)
    # a textbook value (Clopper-Pearson 7/20: 0.1539-0.5922)
    assert [round(v, 4) for v in M.clopper_pearson(7, 20)] == [0.1539, 0.5922]
    y = np.array([1] * 64 + [0] * 64)
    p = np.r_[np.full(64, 0.9), np.linspace(0.0, 0.8, 64)]
    op = M.operating_point_metrics(y, p, 0.85, np.arange(128), n_boot=200, seed=1)
    s = op["sensitivity"]
    assert (op["tp"], op["fn"]) == (64, 0) and s["value"] == 1.0
    assert round(s["low"], 4) == 0.9440 and s["high"] == 1.0 and s["method"] == "clopper-pearson"
    assert s["bootstrap"]["low"] == s["bootstrap"]["high"] == 1.0 and s["bootstrap"]["zero_width"] is True
    assert op["specificity"]["bootstrap"]["zero_width"] is True  # 64/64 negatives below 0.85 too
    from distributed.report import binary_section
    m = M.binary_metrics(y, p, groups=np.arange(128), n_boot=50,
                         operating={"source": "validation", "rule": "fixed:0.85", "threshold": 0.85})
    sec = binary_section(BinaryResult.from_json(m), None, ["negative", "positive"], 0, EvalResult.from_json({}))
    flagged = next(ln for ln in sec.splitlines() if ln.startswith("**Zero-width bootstrap interval** for"))
    assert "sensitivity at the operating point" in flagged and "Brier" not in flagged
    assert "[0.944, 1.000]" in sec  # the exact interval in the summary


def test_patients_as_clusters_widen_the_exact_interval():
    """Kish's design effect with ICC = 1: the effective n is the number of patients (4 images each -> n / 4)."""
    r = M.proportion_interval(60, 64, 16)
    assert r["design_effect"] == 4.0 and r["n_effective"] == 16.0
    assert (r["low"], r["high"]) == M.clopper_pearson(15, 16)
    one = M.proportion_interval(60, 64, 64)
    assert r["low"] < one["low"] and (one["low"], one["high"]) == M.clopper_pearson(60, 64)
    y = np.array([1, 1, 0, 0] * 16)
    p = np.tile([0.9, 0.8, 0.1, 0.7], 16)
    g = np.repeat(np.arange(32), 2)  # two images per patient, one class per patient
    op = M.operating_point_metrics(y, p, 0.5, g, n_boot=0)
    assert op["sensitivity"]["patients"] == 16 and op["specificity"]["n_effective"] == 16.0
    assert (op["specificity"]["low"], op["specificity"]["high"]) == M.clopper_pearson(8, 16)


def test_dropped_resamples_are_counted_cited_and_warned():
    """Issue 34.3: with 3 positive patients of 12, about (9/12)**12 = 3 % of resamples lack a positive; each
    interval says how many resamples it rests on, the report cites that count, and warns below 95 %."""
    from distributed.report import binary_section, resample_warning

    y = np.array([1] * 6 + [0] * 18)
    g = np.repeat(np.arange(12), 2)
    p = np.linspace(0.9, 0.1, 24)
    m = M.binary_metrics(y, p, groups=g, n_boot=400, seed=3,
                         operating={"source": "validation", "rule": "fixed:0.5", "threshold": 0.5})
    drawn = list(M.patient_resample_weights(g, 400, 3))
    valid = sum(1 for w in drawn if (w * y).sum() > 0 and (w * (1 - y)).sum() > 0)
    assert m["auc_ci"]["n_valid"] == valid < 400
    assert m["average_precision_ci"]["n_valid"] == valid
    assert m["operating_point"]["sensitivity"]["bootstrap"]["n_valid"] == sum(1 for w in drawn if (w * y).sum() > 0)
    assert f"rests on {valid} of 400 resamples" in binary_section(BinaryResult.from_json(m), None,
                                                                  ["negative", "positive"], 0, EvalResult.from_json({}))
    assert resample_warning(EvalResult.from_json({"bootstrap": 400, "plain": m})) is None  # 97 %: above the 95 % line
    y2 = np.array([1] * 2 + [0] * 22)  # one positive patient of 12: about 35 % of resamples lack it
    m2 = M.binary_metrics(y2, p, groups=g, n_boot=400, seed=3)
    v2 = m2["auc_ci"]["n_valid"]
    assert v2 < 0.95 * 400
    w = resample_warning(EvalResult.from_json({"bootstrap": 400, "plain": m2}))
    assert w is not None and f"plain.auc_ci ({v2})" in w and "of the 400 patient resamples" in w


def test_prior_correction_target_never_reads_the_test_labels(tmp_path):
    """Issue 34.4: the prior correction's target prevalence is train+val's (or eval.prevalence); flipping every
    test label changes the pooled natural prevalence but not the target."""
    import logging

    from data_prep.config import load_config
    from distributed.evaluate import calibration_plan, prevalences

    def manifest(test_pos, test_neg):
        sp = lambda pos, neg, cap: {"label_counts": {"No Finding": min(neg, cap), "Effusion": min(pos, cap)},  # noqa: E731
                                    "available": {"No Finding": neg, "Effusion": pos}}
        return {"task": "binary", "classes": ["No Finding", "Effusion"],
                "splits": {"train": sp(300, 700, 300), "val": sp(50, 150, 1000), "test": sp(test_pos, test_neg, 1000)}}

    log = logging.getLogger("test")
    cfg = load_config(None, [f"run.dir={tmp_path}", "eval.prior_correction=true"])
    a, b = calibration_plan(cfg, manifest(40, 160), None, None, log), calibration_plan(cfg, manifest(160, 40), None,
                                                                                        None, log)
    assert prevalences(manifest(40, 160))["natural"] != prevalences(manifest(160, 40))["natural"]
    assert a["target_prevalence"] == b["target_prevalence"] == 350 / 1200 and a["shift"] == b["shift"]
    assert a["target_source"].startswith("train+val") and a["train_prevalence"] == 0.5
    assert a["shift"] == M.prior_shift(0.5, 350 / 1200)
    cfg = load_config(None, [f"run.dir={tmp_path}", "eval.prior_correction=true", "eval.prevalence=0.1"])
    c = calibration_plan(cfg, manifest(40, 160), None, None, log)
    assert c["target_prevalence"] == 0.1 and c["target_source"] == "eval.prevalence"


def test_temperature_around_the_training_prior_recovers_t_at_a_025_prior():
    """Issue 34.5: trained at prevalence 0.25, the network twice too confident around that prior. Scaling
    logit(p) itself finds T about 1.55; scaling around logit(0.25) recovers T = 2 within 5 %."""
    rng = np.random.default_rng(0)
    n, lt = 20000, np.log(0.25 / 0.75)
    s = lt - 0.25 + rng.normal(0, 1.0, n)  # true log-odds; prevalence about 0.25
    y = (rng.random(n) < 1 / (1 + np.exp(-s))).astype(int)
    assert abs(y.mean() - 0.25) < 0.02
    p = 1 / (1 + np.exp(-(lt + 2 * (s - lt))))
    t = M.fit_temperature(y, p, center=lt)
    assert abs(t - 2.0) / 2.0 < 0.05
    assert abs(M.fit_temperature(y, p) - 2.0) / 2.0 > 0.15  # the older form, around logit 0
    q = M.adjust(p, t, 0.0, lt)
    assert abs(q.mean() - y.mean()) < 0.01 and M.ece(y, q) < 0.02
    # with a prior shift to 0.1: sigmoid((logit p - logit 0.25) / T + logit 0.1)
    r = M.adjust(p, t, M.prior_shift(0.25, 0.1), lt)
    assert np.allclose(M.logit(r), (M.logit(p) - lt) / t + np.log(0.1 / 0.9))


def test_temperature_at_the_search_bound_is_a_warning(tmp_path):
    """A separable validation split drives T to the bound of log T; calibration_plan warns, the report shows it,
    and the validation figures are labelled in-sample."""
    import logging

    from data_prep.config import load_config
    from distributed.evaluate import calibration_plan
    from distributed.report import calibration_section

    y = np.array([0] * 50 + [1] * 50)
    p = np.r_[np.linspace(0.05, 0.45, 50), np.linspace(0.55, 0.95, 50)]
    assert M.temperature_at_bound(M.fit_temperature(y, p))
    manifest = {"task": "binary", "classes": ["a", "b"],
                "splits": {k: {"label_counts": {"a": 50, "b": 50}, "available": {"a": 50, "b": 50}}
                           for k in ("train", "val", "test")}}
    cfg = load_config(None, [f"run.dir={tmp_path}", "eval.calibrate=temperature"])
    records = []
    log = logging.getLogger("t34")
    log.addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r.getMessage())})())
    plan = calibration_plan(cfg, manifest, y, p, log)
    assert plan["center"] == 0.0 and "search bound" in plan["warning"]
    assert any("search bound" in r for r in records)
    z = np.random.default_rng(1).normal(0, 1.5, 400)
    yz = (np.random.default_rng(2).random(400) < 1 / (1 + np.exp(-z))).astype(int)
    assert not M.temperature_at_bound(M.fit_temperature(yz, 1 / (1 + np.exp(-z))))
    plain = {"brier": 0.1, "ece": 0.05, "calibrated": {
        "brier": 0.1, "ece": 0.05, "method": "temperature", "temperature": plan["temperature"], "shift": 0.0,
        "center": 0.0, "warning": plan["warning"],
        "validation": {"before": {"brier": 0.2, "ece": 0.1}, "after": {"brier": 0.0, "ece": 0.0}, "in_sample": True}}}
    sec = calibration_section(BinaryResult.from_json(plain), None, EvalResult.from_json({}))
    assert "(validation, in-sample)" in sec and "**Warning:**" in sec and "search bound" in sec


def test_summary_says_chosen_on_validation_only_when_it_was():
    """Issue 34.8: a fixed:T or no-validation threshold is not 'chosen on the validation split'."""
    from distributed.report import binary_section

    y, p, g = _data(seed=2)
    for source, said in (("validation", True), ("fixed", False), ("eval.threshold (no validation split)", False)):
        m = M.binary_metrics(y, p, groups=g, n_boot=0,
                             operating={"source": source, "rule": "fixed:0.5" if said is False else "youden",
                                        "threshold": 0.5})
        sec = binary_section(BinaryResult.from_json(m), None, ["negative", "positive"], 0, EvalResult.from_json({}))
        assert ("chosen by `youden` on the validation split" in sec) is said
        assert ("not chosen on the validation split" in sec) is not said


def test_coverage_of_the_exact_interval_at_a_true_sensitivity_of_097_with_20_positive_patients():
    """Issue 34.2: seeded coverage simulation at the size the review named. 20 positive patients with 1-3
    images each, 6 % of them 'hard' (each image found with probability 0.5): true sensitivity 0.97. The
    exact interval on the patients' effective n covers >= 0.93; the percentile bootstrap does not (and is
    zero-width in about a third of the samples)."""
    rng = np.random.default_rng(34)
    cov_exact = cov_boot = flat = 0
    sims = 300
    for s in range(sims):
        m = rng.integers(1, 4, 20)
        hard = rng.random(20) < 0.06
        g = np.repeat(np.arange(20), m)
        hit = (rng.random(len(g)) < np.repeat(np.where(hard, 0.5, 1.0), m)).astype(float)
        r = M.proportion_interval(int(hit.sum()), len(hit), 20)
        cov_exact += r["low"] <= 0.97 <= r["high"]
        b = M.bootstrap_stats({"s": lambda w, hit=hit: (w * hit).sum() / w.sum()}, g, 200, s)["s"]
        cov_boot += b["low"] <= 0.97 <= b["high"]
        flat += b["zero_width"]
    assert cov_exact / sims >= 0.93
    assert cov_boot / sims < 0.8 and flat / sims > 0.2


def test_youden_tie_takes_the_midpoint_below_the_tied_score():
    """Issue 34.10: the threshold lies halfway between the score Youden's J picks (here a score three images share)
    and the next lower distinct score, never on an observed score; p >= threshold decides as p >= that score."""
    y = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0])
    p = np.array([.9, .7, .7, .7, .6, .4, .3, .3, .1])
    yd = M.youden(y, p)
    assert yd["threshold"] == (0.6 + 0.4) / 2 and yd["threshold"] not in p
    assert (yd["sensitivity"], yd["specificity"]) == (1.0, 0.8)
    t = M.choose_threshold("youden", y, p)
    assert t == yd["threshold"] and np.array_equal(p >= t, p >= 0.6)
    # tied maxima of J: the highest cut wins, and sits below its score
    y2, p2 = np.array([1, 0, 1, 0]), np.array([.8, .6, .4, .2])
    assert M.youden(y2, p2)["threshold"] == (0.8 + 0.6) / 2


def test_sensitivity_0_leaves_a_saturated_probability_of_1_negative(tmp_path):
    """Issue 34.10: 'sensitivity:0' (and any rule that makes nothing positive) gives a threshold above 1.0, so a
    saturated p = 1.0 is not counted positive; cxr-predict accepts it from operating_point.json."""
    import json

    from distributed import predict
    from distributed.report import two_by_two

    y = np.array([1, 1, 0, 0, 1])
    p = np.array([1.0, 0.8, 0.9, 0.2, 0.5])
    t = M.choose_threshold("sensitivity:0", y, p)
    assert t == M.NOTHING_POSITIVE > 1.0 and not (p >= t).any()
    assert M.choose_threshold("specificity:1", y, p) == 0.95  # the cut above the highest negative, below 1.0
    op = M.operating_point_metrics(y, p, t, np.arange(5), n_boot=0)
    assert (op["tp"], op["fp"]) == (0, 0) and op["sensitivity"]["value"] == 0.0
    assert "p >= 1.0000000000000002" in "\n".join(two_by_two(OperatingPoint.from_json(
        {**op, "threshold": t, "rule": "sensitivity:0", "source": "validation"}), ["a", "b"]))
    model = tmp_path / "model.keras"
    model.write_bytes(b"model")
    (tmp_path / "operating_point.json").write_text(json.dumps({"threshold": t, "rule": "sensitivity:0",
                                                               "source": "validation", "models": {"model.keras": "d"}}))
    assert predict.find_operating_point(model, "d")["threshold"] == t
    (tmp_path / "operating_point.json").write_text(json.dumps({"threshold": 1.5, "models": {"model.keras": "d"}}))
    assert predict.find_operating_point(model, "d")["applied"] is False


def test_multilabel_mean_auc_difference_averages_a_fixed_set_of_findings():
    """Issue 34.10: the paired mean-AUC difference averages the findings with both classes in the full sample, in
    every resample; a resample where one of them lacks a class is dropped and counted in n_valid (before, it
    averaged whichever findings kept both classes, a different mean per resample)."""
    rng = np.random.default_rng(7)
    g = np.repeat(np.arange(30), 2)
    Y = rng.integers(0, 2, (60, 3))
    Y[:, 2] = 0
    Y[g == 4, 2] = 1  # one patient carries the rare finding: about a third of the resamples lack it
    Pa = np.clip(0.3 * Y + rng.random((60, 3)) * 0.7, 0, 1)
    Pb = np.clip(Pa + rng.normal(0, 0.1, Pa.shape), 0, 1)
    d = M.paired_mean_auc_difference(Y, Pa, Pb, g, n_boot=200, seed=3)
    diffs = [np.mean([roc_auc_score(Y[i, k], Pb[i, k]) - roc_auc_score(Y[i, k], Pa[i, k]) for k in range(3)])
             for i in _explicit_resamples(g, 200, 3) if all(len(set(Y[i, k])) == 2 for k in range(3))]
    assert d["findings"] == 3 and d["n_valid"] == len(diffs) < 0.8 * 200
    assert d["percentile"]["low"] == pytest.approx(np.percentile(diffs, 2.5), abs=1e-12)
    assert d["percentile"]["high"] == pytest.approx(np.percentile(diffs, 97.5), abs=1e-12)
    import tempfile
    from pathlib import Path

    from data_prep.config import load_config
    from distributed.report import write_report

    ml = M.multilabel_metrics(Y, Pa, class_names=["a", "b", "c"], groups=g, n_boot=0)
    metrics = {"task": "multilabel", "classes": ["a", "b", "c"], "plain": ml, "tta": None, "tta_minus_plain": d,
               "bootstrap": 200, "n": 60, "model": "m", "checkpoint": "best", "image_size": 32, "ranks": 1,
               "seconds": 1.0}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"run.dir={tmp}"])
        write_report(tmp, cfg=cfg, manifest=None, metrics=EvalResult.from_json(metrics), plots={}, gradcam={},
                     config_yaml="")
        text = (Path(tmp) / "report.md").read_text()
    assert f"on {d['n_valid']} of 200 patient resamples: every resample averages the same findings" in text
    assert "DeLong's test of the paired mean AUCs, clustered by patient (Obuchowski 1997)" in text
    assert f"tta\\_minus\\_plain ({d['n_valid']})" in text  # the warning below 95 % of the resamples (escaped)
