"""BCa intervals over patients (distributed.metrics.bca_interval, bootstrap_auc, bootstrap_stats): the formula
by hand, the grouped jackknife, and a seeded coverage simulation at the sizes issue 34 names. No TensorFlow."""
import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score
from test_results import _explicit_resamples  # noqa: E402 - the same generator calls as the metrics

from distributed import metrics as M
from distributed.results import BinaryResult, EvalResult


def _clustered(rng, n_pos, n_neg, auc=0.82):
    """Patients with 1-3 images each; an image's score is its patient's latent value plus its own noise
    (intra-patient correlation 0.5), so the image-level AUC is Phi(d / sqrt 2) = ``auc``."""
    d = math.sqrt(2.0) * norm.ppf(auc)
    m = rng.integers(1, 4, n_pos + n_neg)
    label = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    latent = label * d + rng.normal(0.0, math.sqrt(0.5), n_pos + n_neg)
    g = np.repeat(np.arange(n_pos + n_neg), m)
    score = np.repeat(latent, m) + rng.normal(0.0, math.sqrt(0.5), len(g))
    return np.repeat(label, m), 1.0 / (1.0 + np.exp(-score)), g


def test_bca_by_hand_on_the_auc():
    """Efron (1987): z0 from the share of resamples below the estimate, the acceleration from the
    leave-one-patient-out AUCs (scikit-learn), the interval at the adjusted quantiles."""
    y, p, g = _clustered(np.random.default_rng(1), 12, 30)
    r = M.bootstrap_auc(y, p, g, n_boot=300, seed=5)
    boot = np.array([roc_auc_score(y[i], p[i]) for i in _explicit_resamples(g, 300, 5) if len(set(y[i])) == 2])
    est = roc_auc_score(y, p)
    z0 = norm.ppf(((boot < est).sum() + 0.5 * (boot == est).sum()) / len(boot))
    jack = np.array([roc_auc_score(y[g != k], p[g != k]) for k in np.unique(g)])
    dev = jack.mean() - jack
    a = (dev ** 3).sum() / (6 * ((dev ** 2).sum()) ** 1.5)
    q = [norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z))) for z in (norm.ppf(0.025), norm.ppf(0.975))]
    assert r["method"] == "bca" and r["n_valid"] == len(boot)
    assert (r["low"], r["high"]) == (pytest.approx(np.quantile(boot, q[0]), abs=1e-12),
                                     pytest.approx(np.quantile(boot, q[1]), abs=1e-12))
    assert r["percentile"] == {"low": pytest.approx(np.percentile(boot, 2.5), abs=1e-12),
                               "high": pytest.approx(np.percentile(boot, 97.5), abs=1e-12)}


def test_without_bias_or_acceleration_bca_is_the_percentile_interval():
    draws = np.r_[np.linspace(-1, 1, 201)]
    lo, hi = M.bca_interval(draws, 0.0, np.array([-0.1, 0.1]))
    assert (lo, hi) == (np.quantile(draws, 0.025), np.quantile(draws, 0.975))
    assert M.bca_interval([1.0] * 50, 1.0, [1.0] * 10) == (1.0, 1.0)  # every resample the same: width 0
    assert M.bca_interval([], 0.5, []) == (None, None)


def test_the_jackknife_leaves_out_whole_patients_and_at_most_100_blocks():
    g = np.repeat(np.arange(250) * 7, 2)  # 250 patients, 2 images each
    b = M.jackknife_blocks(g)
    assert b.max() == 99 and all(len(set(b[g == k])) == 1 for k in np.unique(g))
    few = np.array([3, 3, 9, 1])
    assert M.jackknife_blocks(few).tolist() == [1, 1, 2, 0]  # a block per patient below 100
    W = M.jackknife_weights(M.jackknife_blocks(few))
    assert W.tolist() == [[1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 0, 1]]


def test_batched_resamples_are_the_per_resample_draws():
    g = np.array([4, 4, 1, 7, 7, 7, 2])
    one = np.array(list(M.patient_resample_weights(g, 300, seed=3)))
    batched = np.concatenate(list(M.patient_resample_batches(g, 300, seed=3, chunk=64)))
    assert np.array_equal(one, batched)
    y = np.array([1, 1, 0, 0, 1, 0, 0])
    p = np.array([.9, .4, .5, .1, .6, .4, .3])
    tg = M._TieGroups(y, p)
    assert np.allclose(tg.aucs(batched), [tg.auc(w) for w in one], equal_nan=True, rtol=0, atol=1e-15)


def test_every_bootstrap_interval_names_its_method_and_keeps_the_percentile():
    y, p, g = _clustered(np.random.default_rng(2), 20, 40)
    m = M.binary_metrics(y, p, groups=g, n_boot=100, seed=0,
                         operating={"source": "validation", "rule": "fixed:0.5", "threshold": 0.5}, prevalence=0.2)
    op = m["operating_point"]
    for ci in (m["auc_ci"], m["average_precision_ci"], m["brier_ci"], m["ece_ci"], op["sensitivity"]["bootstrap"],
               op["at_prevalence"]["ppv"]):
        assert ci["method"] == "bca" and set(ci["percentile"]) == {"low", "high"}
        assert ci["low"] <= ci["high"]
    from distributed.report import binary_section, intervals_fact
    sec = binary_section(BinaryResult.from_json(m), None, ["negative", "positive"], 0, EvalResult.from_json({}))
    assert "is a bias-corrected and accelerated (BCa) bootstrap interval over 100 resamples" in sec
    assert "`percentile`" in sec
    assert "BCa patient bootstrap (100 resamples" in intervals_fact(
        EvalResult.from_json({"task": "binary", "plain": m, "bootstrap": 100}))


@pytest.mark.parametrize("n_pos,n_neg,sims", [(15, 45, 1000), (30, 90, 800)])
def test_coverage_of_the_auc_interval_at_a_true_auc_of_082(n_pos, n_neg, sims):
    """Issue 34.2: the nominal 95 % AUC interval over patients covers the true AUC 0.82 in >= 93 % of seeded
    samples of 15 positive / 45 negative and 30 / 90 patients with 1-3 correlated images each."""
    rng = np.random.default_rng(34)
    covered = 0
    for s in range(sims):
        y, p, g = _clustered(rng, n_pos, n_neg)
        r = M.bootstrap_auc(y, p, g, n_boot=1000, seed=s)
        covered += r["low"] <= 0.82 <= r["high"]
    assert covered / sims >= 0.93, covered / sims
