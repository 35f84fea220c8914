"""DeLong's AUC variance and paired test (distributed.metrics) against pROC's published values on its aSAH
data (tests/fixtures/README.md), and the patient-clustered form (Obuchowski 1997). No TensorFlow."""
import csv
from pathlib import Path

import numpy as np
import pytest

from distributed import metrics as M
from distributed.results import BinaryResult, EvalResult

ASAH = Path(__file__).resolve().parents[1] / "fixtures" / "asah.csv"


def _asah():
    with open(ASAH, newline="") as f:
        rows = list(csv.DictReader(f))
    y = np.array([r["outcome"] == "Poor" for r in rows]).astype(int)
    return y, {k: np.array([float(r[k]) for r in rows]) for k in ("wfns", "s100b", "ndka")}


def test_the_fixture_is_pROC_s_aSAH():
    y, x = _asah()
    assert len(y) == 113 and y.sum() == 41  # "72 controls (Good) < 41 cases (Poor)"


def test_auc_variance_and_interval_as_pROC_prints_them():
    """pROC: roc(aSAH$outcome, aSAH$s100b) 'Area under the curve: 0.7314', ci() '95% CI: 0.6301-0.8326
    (DeLong)'; ndka (tests/testthat/print_output/r.ndka.formula.ci) 'AUC 0.612, 95% CI: 0.5012-0.7227
    (DeLong)'; var() in tests/testthat/test-var.R."""
    y, x = _asah()
    s = M.delong_auc(y, x["s100b"])
    assert round(s["auc"], 4) == 0.7314 and (round(s["low"], 4), round(s["high"], 4)) == (0.6301, 0.8326)
    n = M.delong_auc(y, x["ndka"])
    assert round(n["auc"], 3) == 0.612 and (round(n["low"], 4), round(n["high"], 4)) == (0.5012, 0.7227)
    for k, v in (("wfns", 0.00146991470882363), ("ndka", 0.0031908105493913), ("s100b", 0.00266868245717244)):
        assert M.delong_auc(y, x[k])["var"] == pytest.approx(v, rel=1e-12), k
    assert s["method"] == "DeLong 1988, images independent"


@pytest.mark.parametrize("a,b,z,p,lo,hi", [
    # pROC tests/testthat/test-roc.test.R: roc.test(r.wfns, r.s100b), (r.wfns, r.ndka), (r.ndka, r.s100b)
    ("s100b", "wfns", 2.20898359144091, 0.0271757822291882, 0.0104061769564846, 0.174214419249478),
    ("ndka", "wfns", 2.79777591868904, 0.00514557970691098, 0.0634011709339876, 0.3600405634833566),
    ("s100b", "ndka", -1.39077002573558, 0.164295175223054, -0.2876917446341914, 0.0488706064228094),
])
def test_paired_test_of_two_correlated_aucs_as_pROC_s_roc_test(a, b, z, p, lo, hi):
    """delong_test(y, a, b) tests AUC(b) - AUC(a): pROC's roc.test(b, a)."""
    y, x = _asah()
    t = M.delong_test(y, x[a], x[b])
    assert t["z"] == pytest.approx(z, rel=1e-12) and t["p"] == pytest.approx(p, rel=1e-12)
    assert (t["low"], t["high"]) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    assert t["auc_diff"] == pytest.approx(M.auc(y, x[b]) - M.auc(y, x[a]), abs=1e-15)
    same = M.delong_test(y, x[a], x[a])  # identical curves: Z 0, p 1 (pROC's test)
    assert same["z"] == 0 and same["p"] == 1.0


def test_structural_components_by_explicit_pairs_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    p = np.round(rng.random(40), 1)  # many ties
    pos, neg = p[y == 1], p[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = M.delong_components(y, p)
    assert np.allclose(v10, psi.mean(1)) and np.allclose(v01, psi.mean(0))
    var = np.var(psi.mean(1), ddof=1) / len(pos) + np.var(psi.mean(0), ddof=1) / len(neg)
    assert M.delong_auc(y, p)["var"] == pytest.approx(var, rel=1e-12)
    assert M.delong_auc(y, p)["auc"] == pytest.approx(M.auc(y, p), abs=1e-15)


def test_clustered_variance_counts_patients_not_images():
    """Obuchowski (1997): copying every image of a patient leaves the clustered variance unchanged (the patient
    is the unit), while DeLong on images takes the copies for new patients and about halves it."""
    y, x = _asah()
    g = np.arange(len(y))
    one = M.delong_test(y, x["s100b"], x["wfns"], groups=g)
    y2, g2 = np.repeat(y, 2), np.repeat(g, 2)
    a2, b2 = np.repeat(x["s100b"], 2), np.repeat(x["wfns"], 2)
    two = M.delong_test(y2, a2, b2, groups=g2)
    assert two["se"] == pytest.approx(one["se"], rel=1e-12) and two["cases"] == 113
    assert M.delong_test(y2, a2, b2)["se"] < 0.75 * one["se"]
    assert one["method"] == "DeLong, clustered by patient (Obuchowski 1997)"
    # one image per patient: within I / (I - 1) against m - 1 and n - 1 of DeLong's own variance
    assert one["se"] == pytest.approx(M.delong_test(y, x["s100b"], x["wfns"])["se"], rel=0.01)


def test_clustered_variance_by_hand():
    """Obuchowski's formula written out on 5 patients with 1-3 images of either class."""
    y = np.array([1, 0, 1, 1, 0, 0, 1, 0, 0])
    p = np.array([.9, .3, .6, .4, .4, .2, .8, .7, .1])
    g = np.array([0, 0, 1, 1, 1, 2, 3, 3, 4])
    pos, neg = p[y == 1], p[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    a = psi.mean()
    gp, gn = g[y == 1], g[y == 0]
    v10 = np.array([psi.mean(1)[gp == k].sum() - (gp == k).sum() * a for k in range(5)])
    v01 = np.array([psi.mean(0)[gn == k].sum() - (gn == k).sum() * a for k in range(5)])
    m, n, f = len(pos), len(neg), 5 / 4
    var = f * (v10 ** 2).sum() / m ** 2 + f * (v01 ** 2).sum() / n ** 2 + 2 * f * (v10 * v01).sum() / (m * n)
    r = M.delong_auc(y, p, groups=g)
    assert r["auc"] == pytest.approx(a) and r["var"] == pytest.approx(var, rel=1e-12)


def test_one_class_gives_no_test():
    t = M.delong_test(np.zeros(5, int), np.arange(5.0), np.arange(5.0))
    assert t["z"] is None and t["p"] is None


def test_tta_minus_plain_carries_the_clustered_delong_test_and_the_report_says_so():
    """The evaluation's paired comparison: the BCa paired bootstrap and, beside it, DeLong's test with patients as
    the unit (a deterministic function of predictions.csv)."""
    from distributed.report import binary_section

    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(60), 2)
    y = np.repeat(rng.integers(0, 2, 60), 2)
    plain = np.clip(0.3 * y + rng.random(120) * 0.7, 0, 1)
    tta = np.clip(plain + rng.normal(0, 0.05, 120), 0, 1)
    d = M.paired_auc_difference(y, plain, tta, g, n_boot=50, seed=1)
    assert d["delong"] == M.delong_test(y, plain, tta, groups=g) and d["delong"]["cases"] == 60
    assert d["delong"]["auc_diff"] == pytest.approx(d["auc_diff"], abs=1e-15)
    m = M.binary_metrics(y, plain, groups=g, n_boot=0)
    sec = binary_section(BinaryResult.from_json(m), None, ["negative", "positive"], 0,
                         EvalResult.from_json({"tta_minus_plain": d}))
    t = d["delong"]
    assert (f"DeLong's test of the paired AUCs, clustered by patient (Obuchowski 1997): difference "
            f"{t['auc_diff']:.3f}, SE {t['se']:.3f}, z = {t['z']:.2f}, two-sided p = {t['p']:.3g}") in sec
    assert "takes every image for an independent case" in sec and "paired BCa bootstrap" in sec
    one = M.delong_test(np.array([1, 0, 1, 0]), np.array([.9, .1, .8, .3]), np.array([.7, .2, .6, .4]),
                        groups=np.zeros(4, int))  # one patient with both classes: no variance between patients
    assert one["auc_diff"] == 0.0 and one["z"] is None and one["se"] is None


def test_multilabel_mean_difference_with_patients_as_clusters():
    """The mean over findings of AUC(b) - AUC(a): one finding gives delong_test's clustered numbers; with two, the
    variance is I / (I - 1) x the sum over patients of the squared mean influence difference, by explicit pairs."""
    rng = np.random.default_rng(5)
    g = np.repeat(np.arange(40), 3)
    Y = rng.integers(0, 2, (120, 3))
    Y[:, 2] = 0  # no positives: left out
    Pa = np.clip(0.3 * Y + rng.random((120, 3)) * 0.7, 0, 1).round(2)
    Pb = np.clip(Pa + rng.normal(0, 0.05, Pa.shape), 0, 1).round(2)
    one = M.delong_mean_difference(Y[:, :1], Pa[:, :1], Pb[:, :1], g)
    ref = M.delong_test(Y[:, 0], Pa[:, 0], Pb[:, 0], groups=g)
    assert (one["z"], one["p"], one["se"]) == (pytest.approx(ref["z"], rel=1e-12), pytest.approx(ref["p"], rel=1e-12),
                                              pytest.approx(ref["se"], rel=1e-12))

    def influence(y, p):
        pos, neg = p[y == 1], p[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        a, gp, gn = psi.mean(), g[y == 1], g[y == 0]
        return a, np.array([(psi.mean(1)[gp == k] - a).sum() / len(pos) + (psi.mean(0)[gn == k] - a).sum() / len(neg)
                            for k in range(40)])
    parts = [(influence(Y[:, k], Pa[:, k]), influence(Y[:, k], Pb[:, k])) for k in (0, 1)]
    d = np.mean([b[0] - a[0] for a, b in parts])
    psi = np.mean([b[1] - a[1] for a, b in parts], axis=0)
    r = M.delong_mean_difference(Y, Pa, Pb, g)
    assert r["findings"] == 2 and r["cases"] == 40 and r["auc_diff"] == pytest.approx(d, abs=1e-15)
    assert r["se"] == pytest.approx(np.sqrt(40 / 39 * (psi ** 2).sum()), rel=1e-12)
    d2 = M.paired_mean_auc_difference(Y, Pa, Pb, g, n_boot=20)
    assert d2["delong"] == r and d2["auc_diff"] == pytest.approx(r["auc_diff"], abs=1e-15)
