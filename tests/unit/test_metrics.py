"""distributed.metrics against scikit-learn, and the patient bootstrap's behaviour (no TensorFlow)."""
import numpy as np
import pytest
from sklearn.metrics import classification_report, confusion_matrix, roc_auc_score, roc_curve

from distributed import metrics as M


def _data(n=300, seed=0, patients=60, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.35 * y + rng.normal(0.35, 0.2, n), 0, 1)
    if ties:
        p = np.round(p, 1)
    g = rng.integers(0, patients, n)
    return y, p, g


@pytest.mark.parametrize("ties", [False, True])
def test_weighted_auc_equals_sklearn(ties):
    y, p, _ = _data(ties=ties)
    w = np.random.default_rng(1).integers(0, 4, len(y)).astype(float)
    assert M.weighted_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert M.weighted_auc(y, p, w) == pytest.approx(roc_auc_score(y, p, sample_weight=w), abs=1e-12)


def test_patient_resample_keeps_patients_whole():
    g = np.array([5, 5, 5, 9, 9, 2, 7, 7, 7, 7])
    for w in M.patient_resample_weights(g, 50, seed=3):
        for pid in np.unique(g):
            vals = w[g == pid]
            assert (vals == vals[0]).all()  # all images of a patient drawn the same number of times
        # as many patient draws as patients
        per_patient = {pid: w[g == pid][0] for pid in np.unique(g)}
        assert sum(per_patient.values()) == len(np.unique(g))


def test_bootstrap_interval_contains_auc_and_is_reproducible():
    y, p, g = _data(n=400)
    a = M.bootstrap_auc(y, p, g, n_boot=300, seed=7)
    b = M.bootstrap_auc(y, p, g, n_boot=300, seed=7)
    assert a == b
    assert a["by"] == "patient" and a["n_valid"] == 300
    assert a["low"] < roc_auc_score(y, p) < a["high"]


def test_bootstrap_by_patient_is_wider_for_clustered_data():
    # 20 patients with 20 near-identical images each: resampling images pretends 400
    # independent cases; resampling patients gives the honest (wider) interval.
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(20), 20)
    y = np.repeat(rng.integers(0, 2, 20), 20)
    p = np.clip(np.repeat(0.3 * y[::20] + rng.normal(0.35, 0.2, 20), 20) + rng.normal(0, 0.01, 400), 0, 1)
    by_patient = M.bootstrap_auc(y, p, g, n_boot=400, seed=1)
    by_image = M.bootstrap_auc(y, p, np.arange(400), n_boot=400, seed=1)
    assert (by_patient["high"] - by_patient["low"]) > 2 * (by_image["high"] - by_image["low"])


def test_bootstrap_roc_band_brackets_curve():
    y, p, g = _data(n=400)
    a = M.bootstrap_auc(y, p, g, n_boot=200, seed=0, roc_band=True)
    band = a["roc_band"]
    fpr, tpr, _ = roc_curve(y, p)
    mid = np.interp(band["fpr"], fpr, tpr)
    inside = (np.asarray(band["tpr_low"]) <= mid + 1e-9) & (mid <= np.asarray(band["tpr_high"]) + 1e-9)
    assert inside.mean() > 0.9


def test_youden_threshold_maximises_j():
    y, p, _ = _data()
    yd = M.youden(y, p)
    fpr, tpr, thr = roc_curve(y, p)
    assert yd["j"] == pytest.approx((tpr - fpr).max())
    pred = p >= yd["threshold"]
    sens = pred[y == 1].mean()
    spec = 1 - pred[y == 0].mean()
    assert sens == pytest.approx(yd["sensitivity"]) and spec == pytest.approx(yd["specificity"])


def test_binary_metrics_match_sklearn():
    y, p, g = _data()
    names = ["No Finding", "Infiltration"]
    views = np.where(np.arange(len(y)) % 3 == 0, "AP", "PA")
    sex = np.where(np.arange(len(y)) % 2 == 0, "M", "F")
    m = M.binary_metrics(y, p, class_names=names, threshold=0.4, groups=g,
                         subgroups={"view": views, "sex": sex}, n_boot=100, seed=0)
    pred = (p >= 0.4).astype(int)
    ref = classification_report(y, pred, target_names=names, output_dict=True, zero_division=0)
    for k in names + ["macro avg", "weighted avg"]:
        for f in ("precision", "recall", "f1-score"):
            assert m["report"][k][f] == pytest.approx(ref[k][f])
        assert m["report"][k]["support"] == ref[k]["support"]
    assert m["report"]["accuracy"] == pytest.approx(ref["accuracy"])
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    for v in ("AP", "PA"):
        mask = views == v
        assert m["subgroups"]["view"][v]["auc"] == pytest.approx(roc_auc_score(y[mask], p[mask]))
    assert m["patients"] == len(np.unique(g))


def test_subgroup_with_one_class_has_no_auc():
    y = np.array([0, 1, 0, 1, 0, 0])
    p = np.array([.1, .9, .2, .7, .3, .4])
    s = M.subgroup_auc(y, p, ["PA", "PA", "PA", "PA", "AP", "AP"])
    assert s["AP"]["auc"] is None and s["AP"]["n"] == 2
    assert s["PA"]["auc"] == pytest.approx(1.0)


def test_one_class_only_is_not_an_error():
    y = np.zeros(10, int)
    p = np.linspace(0, 1, 10)
    m = M.binary_metrics(y, p, n_boot=20)
    assert m["auc"] is None and m["auc_ci"]["low"] is None and m["oracle"]["threshold"] is None


def test_multilabel_metrics_and_table():
    rng = np.random.default_rng(0)
    names = ["Atelectasis", "Cardiomegaly", "Hernia"]
    Y = rng.integers(0, 2, (200, 3))
    Y[:, 2] = 0  # no Hernia in the test split: no AUC, left out of the mean
    P = np.clip(0.3 * Y + rng.random((200, 3)) * 0.7, 0, 1)
    g = rng.integers(0, 50, 200)
    ml = M.multilabel_metrics(Y, P, class_names=names, groups=g, n_boot=50)
    for k, n in enumerate(names[:2]):
        assert ml["findings"][n]["auc"] == pytest.approx(roc_auc_score(Y[:, k], P[:, k]))
        assert ml["findings"][n]["chexnet_auc"] is not None
    assert ml["findings"]["Hernia"]["auc"] is None
    assert ml["mean_auc"] == pytest.approx(np.mean([roc_auc_score(Y[:, k], P[:, k]) for k in range(2)]))
    txt = M.format_auc_table(ml)
    assert "Mean AUROC" in txt and "Cardiomegaly" in txt


def test_format_class_table_looks_like_sklearn():
    y, p, _ = _data()
    names = ["No Finding", "Infiltration"]
    rep = M.class_table(y, (p >= 0.5).astype(int), names)
    txt = M.format_class_table(rep)
    ref = classification_report(y, (p >= 0.5).astype(int), target_names=names, zero_division=0)
    # same rows and the same numbers at 2 digits
    assert ([ln.split() for ln in txt.splitlines() if ln.strip()]
            == [ln.split() for ln in ref.splitlines() if ln.strip()])
    both = M.format_side_by_side(txt, txt)
    assert len(both.splitlines()) == len(txt.splitlines())


def test_masked_class_report_equals_sklearn_on_the_labelled_entries():
    """With every label kept it is classification_report; a masked entry counts for nothing: flipping its label
    or prediction changes no number, and each finding's row is sklearn's on that finding's labelled images."""
    from sklearn.metrics import precision_recall_fscore_support

    rng = np.random.default_rng(4)
    Y = rng.integers(0, 2, (60, 3))
    pred = rng.integers(0, 2, (60, 3))
    names = ["a", "b", "c"]
    full = M.masked_class_report(Y, pred, np.ones_like(Y, bool), names)
    ref = classification_report(Y, pred, target_names=names, output_dict=True, zero_division=0)
    for k in ref:
        for m in ("precision", "recall", "f1-score"):
            assert full[k][m] == pytest.approx(ref[k][m]), (k, m)
    labelled = rng.random((60, 3)) > 0.3
    rep = M.masked_class_report(Y, pred, labelled, names)
    flipped = M.masked_class_report(np.where(labelled, Y, 1 - Y), np.where(labelled, pred, 1 - pred),
                                          labelled, names)
    assert rep == flipped
    for k, n in enumerate(names):
        p, r, f, _ = precision_recall_fscore_support(Y[labelled[:, k], k], pred[labelled[:, k], k],
                                                     average="binary", zero_division=0)
        assert (rep[n]["precision"], rep[n]["recall"], rep[n]["f1-score"]) == pytest.approx((p, r, f))
        assert rep[n]["support"] == int(Y[labelled[:, k], k].sum())
    assert rep["accuracy"] == pytest.approx(np.mean([all(Y[i][labelled[i]] == pred[i][labelled[i]])
                                                     for i in range(60)]))
