"""``python -m launch pipeline`` with 2 ranks on a tiny generated data set, to a finished report;
then a second run (fresh run directory) interrupted during training and rerun to the end.

Tiny backbone, 32 px, ~150 images: a few minutes on 2 cores. Needs Open MPI and Horovod.
"""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


# skipped without them, a failure under CI=true (tests/conftest.py)
pytestmark = [pytest.mark.needs_mpirun, pytest.mark.needs_horovod]


def env():
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_COMM_WORLD", "HOROVOD_"))}
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if os.getuid() == 0:
        e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return e


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--out", str(d / "data"), "--patients", "40",
                    "--image-size", "64", "--seed", "3", "--no-progress"], cwd=ROOT, env=env(), check=True,
                   capture_output=True, timeout=300)
    (d / "c.yaml").write_text(
        f"data: {{csv: {d}/data/Data_Entry_2017.csv, images: {d}/data, image_size: 32}}\n"
        f"prep: {{out: {d}/prepared, shard_size: 32, train_per_class: 40, val_fraction: 0.2, test_fraction: 0.25}}\n"
        "model: {backbone: tiny, weights: none, dense_units: 16}\n"
        "train: {batch_size: 8, warmup: {epochs: 1}, finetune: {epochs: 2, patience: 10}}\n"
        "eval: {tta_rounds: 2, bootstrap: 20, gradcam_per_group: 2}\n"
        f"run: {{dir: {d}/run}}\n"
        "runtime: {precision: float32}\n")  # auto may pick bfloat16 under load; predict is compared at float32
    return d


def launch(workdir, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", "launch", "pipeline", "--config", str(workdir / "c.yaml"),
                           "--np", "2", *args], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)


def history_epochs(run: Path) -> list[int]:
    with open(run / "history.csv") as f:
        return [int(float(row["epoch"])) for row in csv.DictReader(f)]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def youden_cut(y, p) -> float:
    """Youden's threshold recomputed with scikit-learn alone: halfway between the score that maximises
    sensitivity + specificity - 1 and the next lower distinct score (issue 34.10)."""
    import numpy as np
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, p)
    s = thr[int(np.argmax(tpr - fpr))]
    if not np.isfinite(s):  # nothing positive: the float after 1.0
        return float(np.nextafter(max(1.0, p.max()), np.inf))
    lower = p[p < s]
    return float((s + lower.max()) / 2.0) if lower.size else float(s / 2.0)


def assert_results_reproducible(run: Path) -> dict:
    """The issue's "done when": every number below recomputed from the CSVs the run wrote."""
    import numpy as np

    m = json.loads((run / "metrics.json").read_text())
    rows, vrows = read_csv(run / "predictions.csv"), read_csv(run / "val_predictions.csv")
    assert vrows and list(vrows[0]) == list(rows[0])
    yv, pv = (np.array([float(r[k]) for r in vrows]) for k in ("label", "probability"))
    op = m["operating_point"]  # eval.operating_point: youden, on validation
    assert op["source"] == "validation" and op["threshold"] == youden_cut(yv.astype(int), pv)
    y, p = (np.array([float(r[k]) for r in rows]) for k in ("label", "probability"))
    assert m["plain"]["brier"] == pytest.approx(np.mean((p - y) ** 2), abs=1e-9)
    pred = p >= op["threshold"]
    assert op["sensitivity"]["value"] == pytest.approx(pred[y == 1].mean())
    for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy"):
        assert op[k]["low"] is not None and op[k]["low"] <= op[k]["value"] <= op[k]["high"], k
    for field, vals in m["plain"]["subgroups"].items():
        for k, v in vals.items():
            assert v["auc"] is None or v["auc_ci"]["low"] is not None, (field, k)
    d = m["tta_minus_plain"]
    tta = np.array([float(r["tta_probability"]) for r in rows])
    from sklearn.metrics import roc_auc_score
    assert d["by"] == "patient" and d["auc_diff"] == pytest.approx(roc_auc_score(y, tta) - roc_auc_score(y, p),
                                                                   abs=1e-9)
    hist = [r for r in read_csv(run / "history.csv") if r["phase"] == "finetune"]
    best = min(hist, key=lambda r: float(r["val_loss"]))
    sc = m["selected_checkpoint"]
    assert sc["phase"] == "finetune" and sc["epoch"] == int(best["epoch"])
    assert sc["val_loss"] == pytest.approx(float(best["val_loss"]))
    report = (run / "report.md").read_text()
    assert "| split method | seeded, by patient |" in report
    assert f"prevalence {y.mean():.3f}" in report
    assert "![calibration](plots/calibration.png)" in report and (run / "plots" / "calibration.png").is_file()
    assert "## Reporting checklist (CLAIM)" in report
    assert f"finetune phase, epoch {sc['epoch']}" in report
    assert_flow_and_decision_curve(run, m, rows, report)
    return m


def clustered_delong_z(y, pa, pb, groups):
    """DeLong's paired z and two-sided p for AUC(b) - AUC(a), patients as clusters (Obuchowski 1997), by explicit
    pairs: per patient the sums of the components psi over its positive and its negative images."""
    import numpy as np
    from scipy.stats import norm

    pats = sorted(set(groups.tolist()))
    d10, d01, aucs = [], [], []
    for p in (pa, pb):
        psi = (p[y == 1][:, None] > p[y == 0][None, :]) + 0.5 * (p[y == 1][:, None] == p[y == 0][None, :])
        a = psi.mean()
        v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
        gp, gn = groups[y == 1], groups[y == 0]
        d10.append(np.array([v10[gp == k].sum() - (gp == k).sum() * a for k in pats]))
        d01.append(np.array([v01[gn == k].sum() - (gn == k).sum() * a for k in pats]))
        aucs.append(a)
    m, n, f = (y == 1).sum(), (y == 0).sum(), len(pats) / (len(pats) - 1)
    x10, x01 = d10[1] - d10[0], d01[1] - d01[0]  # the variance of the difference
    var = f * (x10 @ x10) / m ** 2 + f * (x01 @ x01) / n ** 2 + 2 * f * (x10 @ x01) / (m * n)
    z = (aucs[1] - aucs[0]) / np.sqrt(var) if var > 0 else 0.0
    return z, 2 * norm.sf(abs(z))


def assert_flow_and_decision_curve(run: Path, m: dict, rows: list[dict], report: str) -> None:
    """Issue 34: the flow's evaluated step and the decision curve recomputed from predictions.csv; the report
    shows both, and the net benefit at the test set's prevalence."""
    ev = next(s for s in m["flow"]["steps"] if s["step"] == "evaluated")
    pos = [r for r in rows if r["label"] == "1"]
    assert (ev["images"], ev["patients"]) == (len(rows), len({r["patient"] for r in rows}))
    assert ev["classes"][m["classes"][1]] == {"images": len(pos), "patients": len({r["patient"] for r in pos})}
    assert "### Flow of images and patients" in report and "every written test image evaluated" in report
    n, prev = len(rows), len(pos) / len(rows)
    for r in read_csv(run / "decision_curve.csv"):
        pt = float(r["threshold"])
        tp = sum(float(x["probability"]) >= pt and x["label"] == "1" for x in rows)
        fp = sum(float(x["probability"]) >= pt and x["label"] == "0" for x in rows)
        assert float(r["net_benefit"]) == pytest.approx(tp / n - fp / n * pt / (1 - pt), rel=1e-12, abs=1e-15)
        assert float(r["net_benefit_treat_all"]) == pytest.approx(prev - (1 - prev) * pt / (1 - pt), rel=1e-12)
    assert "![decision_curve](plots/decision_curve.png)" in report and "**the test set's prevalence**" in report


def exact_from_csvs(out: Path) -> dict:
    """Issue 30: every operating_point and calibration number of metrics.json recomputed from the CSVs alone
    (and calibration.json's fitted parameters), bit for bit. Point values independently (numpy, scikit-learn);
    intervals by the same patient resamples (distributed.metrics) fed only with CSV values."""
    import numpy as np

    from distributed import metrics as M

    m = json.loads((out / "metrics.json").read_text())
    rows, vrows = read_csv(out / "predictions.csv"), read_csv(out / "val_predictions.csv")

    def col(rs, k):
        return np.array([float(r[k]) for r in rs])

    y, yv = col(rows, "label").astype(int), col(vrows, "label").astype(int)
    groups = col(rows, "patient").astype(int)
    n_boot = m["bootstrap"]
    cfg = yaml.safe_load((out / "eval_config.yaml").read_text())
    seed, prevalence = cfg["train"]["seed"], cfg["eval"]["prevalence"]

    def brier(t, q):
        return float(np.mean((q - t) ** 2))

    def ece(t, q):
        b = np.minimum((q * 10).astype(int), 9)
        return float(np.abs(np.bincount(b, weights=t - q, minlength=10)).sum() / len(t))

    def check(kind, p, pv):
        res = m["plain"] if kind == "probability" else m["tta"]
        t = youden_cut(yv, pv)
        op = res["operating_point"]
        assert op["threshold"] == t and op["source"] == "validation" and op["rule"] == "youden"
        pred = p >= t
        tp, fn = int((pred & (y == 1)).sum()), int((~pred & (y == 1)).sum())
        fp, tn = int((pred & (y == 0)).sum()), int((~pred & (y == 0)).sum())
        assert (op["tp"], op["fp"], op["fn"], op["tn"]) == (tp, fp, fn, tn)  # issue 34: the 2x2 at the threshold
        assert op["sensitivity"]["value"] == tp / (tp + fn) and op["specificity"]["value"] == tn / (tn + fp)
        assert op["accuracy"]["value"] == (tp + tn) / len(y)
        assert op["ppv"]["value"] == (tp / (tp + fp) if tp + fp else None)
        assert op["npv"]["value"] == (tn / (tn + fn) if tn + fn else None)
        again = M.operating_point_metrics(y, p, t, groups, n_boot=n_boot, seed=seed, prevalence=prevalence)
        for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy"):
            assert op[k] == {**again[k], "value": op[k]["value"]}, k
        # issue 34: exact interval of sensitivity, effective n = patients with a positive image (scipy only)
        from scipy.stats import beta
        n_pat = len(set(groups[y == 1].tolist()))
        d = (tp + fn) / n_pat
        ke, ne = tp / d, (tp + fn) / d
        a = (1 - 0.95) / 2  # as metrics.clopper_pearson writes it (0.025000000000000022)
        lo = float(beta.ppf(a, ke, ne - ke + 1)) if tp else 0.0
        hi = float(beta.ppf(1 - a, ke + 1, ne - ke)) if fn else 1.0
        assert (op["sensitivity"]["low"], op["sensitivity"]["high"]) == (lo, hi)
        assert res["brier"] == brier(y, p) and res["ece"] == ece(y, p)
        again = M.calibration_metrics(y, p, groups, n_boot, seed)
        assert res["brier_ci"] == again["brier_ci"] and res["ece_ci"] == again["ece_ci"]
        assert res["reliability"] == again["reliability"]
        return t

    t = check("probability", col(rows, "probability"), col(vrows, "probability"))
    assert m["operating_point"]["threshold"] == t
    if "tta_probability" in rows[0]:
        check("tta_probability", col(rows, "tta_probability"), col(vrows, "tta_probability"))
        # issue 34: DeLong's paired test, patients as clusters (Obuchowski 1997), from the two columns by hand
        d = m["tta_minus_plain"]["delong"]
        z, p = clustered_delong_z(y, col(rows, "probability"), col(rows, "tta_probability"), groups)
        assert d["z"] == pytest.approx(z, rel=1e-9, abs=1e-12) and d["p"] == pytest.approx(p, rel=1e-9, abs=1e-12)
        assert d["cases"] == len(set(groups.tolist()))
    c = m["plain"].get("calibrated")
    if c:
        cal = json.loads((out / "calibration.json").read_text())
        pv, p, cp = col(vrows, "probability"), col(rows, "probability"), col(rows, "calibrated_probability")
        if cal["method"] == "temperature":
            assert cal["temperature"] == M.fit_temperature(yv, pv, shift=cal["validation_shift"],
                                                           center=cal["center"]) == c["temperature"]
        # issue 34: temperature scaling around the training prior, center = logit(training prevalence)
        assert cal["center"] == c["center"] == float(M.logit(cal["train_prevalence"]))
        assert np.array_equal(cp, M.as_written(M.adjust(p, cal["temperature"], cal["shift"], cal["center"])))
        assert np.array_equal(col(vrows, "calibrated_probability"), M.as_written(M.adjust(pv, cal["temperature"],
                                                                                          cal["shift"], cal["center"])))
        assert c["brier"] == brier(y, cp) and c["ece"] == ece(y, cp)
        after = M.as_written(M.adjust(pv, cal["temperature"], cal.get("validation_shift", 0.0), cal["center"]))
        v = c["validation"]
        assert v == {"before": {"brier": brier(yv, pv), "ece": ece(yv, pv)},
                     "after": {"brier": brier(yv, after), "ece": ece(yv, after)},
                     "in_sample": cal["method"] == "temperature"}
        again = M.calibration_metrics(y, cp, groups, n_boot, seed)
        assert c["brier_ci"] == again["brier_ci"] and c["ece_ci"] == again["ece_ci"]
    return m


def test_pipeline_two_ranks_to_a_report(workdir):
    r = launch(workdir)
    assert r.returncode == 0, r.stderr[-4000:]
    run = workdir / "run"
    for f in ("model.keras", "report.md", "metrics.json", "history.csv", "pipeline.json"):
        assert (run / f).exists(), f
    assert (workdir / "prepared" / "manifest.json").exists()
    # every stage on 2 ranks by mpirun (the default launcher), bound, tuned threads
    assert "prep: 2 rank(s)" in r.stderr and "via mpirun" in r.stderr
    assert "train: 2 rank(s)" in r.stderr and "evaluate: 2 rank(s)" in r.stderr and "mpirun -np 2" in r.stderr
    assert "OMP_NUM_THREADS=1" in r.stderr
    marker = json.loads((run / "pipeline.json").read_text())
    assert marker["train"]["ranks"] == 2
    assert history_epochs(run) == [1, 2, 3]
    assert "AUC" in (run / "report.md").read_text()
    # what each phase trained (issue 32): the warm-up only the head, the fine-tune all but the first 10 layers
    layers = json.loads((run / "metrics.json").read_text())["trained_layers"]
    assert layers["warmup"]["trained"] == [] and len(layers["finetune"]["frozen"]) == 10
    assert layers["finetune"]["trainable_params"] > layers["warmup"]["trainable_params"] > 0
    n = layers["finetune"]["backbone_layers"]
    assert f"finetune: 10 of {n} backbone layers frozen" in (run / "report.md").read_text()
    assert_results_reproducible(run)
    exact_from_csvs(run)

    # a second run finds every stage complete and runs nothing
    t0 = time.monotonic()
    r = launch(workdir, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    for stage in ("prep", "train", "evaluate"):
        assert f"skip {stage}" in r.stderr
    assert time.monotonic() - t0 < 120


def test_predict_labels_the_test_images_as_the_report_did(workdir):
    """cxr-predict on the run decides at the report's operating point (operating_point.json), as the report
    counted from predictions.csv."""
    run = workdir / "run"
    m = json.loads((run / "metrics.json").read_text())
    t = m["operating_point"]["threshold"]
    rows = read_csv(run / "predictions.csv")
    p = subprocess.run([sys.executable, "-m", "distributed.predict", "--model", str(run), "--json", "--precision",
                        "float32", *[str(workdir / "data" / "images" / r["image"]) for r in rows]], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout)
    assert doc["threshold"] == t and doc["threshold_source"]["source"] == "operating point"
    assert doc["threshold_source"]["rule"] == "youden" and doc["threshold_source"]["chosen_on"] == "validation"
    assert m["precision"]["evaluation"] == "float32"
    positive = m["classes"][1]
    for r, row in zip(doc["results"], rows):
        assert r["probability"] == pytest.approx(float(row["probability"]), abs=1e-4)
        if abs(float(row["probability"]) - t) > 1e-4:  # a tie at the threshold may round either way
            assert (r["prediction"] == positive) == (float(row["probability"]) >= t), (r, row)
    detected = [r for r, row in zip(doc["results"], rows) if row["label"] == "1" and float(row["probability"]) >= t]
    assert detected and all(r["prediction"] == positive for r in detected)


def test_another_prep_is_refused_then_evaluated_into_its_own_folder(workdir):
    """evaluate on a prep made with another prep.seed: refused with the overlap counted; with
    eval.allow_overlap: true written to run.dir/eval-<hash> with the overlap in the header, the run's own
    report untouched; its calibrated numbers recomputed exactly from its CSVs."""
    run = workdir / "run"
    own = (run / "report.md").read_bytes()
    e = {**env(), "CXR_NO_HOROVOD": "1"}
    cfg = str(workdir / "c.yaml")
    prep7 = workdir / "prepared-seed7"
    r = subprocess.run([sys.executable, "-m", "data_prep", "--config", cfg, "--set", f"prep.out={prep7}", "--set",
                        "prep.seed=7"], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    base = [sys.executable, "-m", "distributed.evaluate", "--config", cfg, "--set", f"prep.out={prep7}",
            "--set", "eval.tta=false", "--set", "eval.gradcam_per_group=0"]
    r = subprocess.run(base, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    got = re.search(r"(\d+) of its (\d+) test patients and (\d+) of its (\d+) validation patients were in the "
                    r"model's training split", lines[0])
    assert got and int(got[1]) + int(got[3]) > 0 and "eval.allow_overlap" in lines[0] and "prep.seed 7" in lines[0]
    r = subprocess.run(base + ["--set", "eval.allow_overlap=true", "--set", "eval.calibrate=temperature", "--set",
                               "eval.prior_correction=true"], cwd=ROOT, env=e, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (out,) = run.glob("eval-*")
    m = exact_from_csvs(out)
    sh = m["provenance"]["shared"]
    assert (m["provenance"]["evaluation"] == "external"
            and (sh["train_test"], sh["train_val"]) == (int(got[1]), int(got[3])))
    report = (out / "report.md").read_text()
    assert f"patients shared with the model's training split: **{got[1]} of {got[2]} test" in report
    assert "**external evaluation**" in report and "prep.seed 7 per its manifest" in report
    assert (run / "report.md").read_bytes() == own  # the run's own report untouched


def test_pipeline_interrupted_during_training_reruns_to_the_end(workdir):
    run = workdir / "run2"
    args = ["--set", f"run.dir={run}", "--set", "train.finetune.epochs=4"]
    cmd = [sys.executable, "-m", "launch", "pipeline", "--config", str(workdir / "c.yaml"), "--np", "2", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = run / "checkpoints" / "state.json"
    deadline = time.monotonic() + 600
    try:
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before its first checkpoint: " + proc.communicate()[1][-3000:]
        assert state.exists(), "no checkpoint within 10 minutes"
        proc.send_signal(signal.SIGTERM)  # as Slurm's scancel or a kill would
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "interrupted by SIGTERM" in err and "Traceback (most recent call last)" not in err.split("[launch]")[-1]
    assert not (run / "model.keras").exists(), "training finished before the interrupt: nothing was tested"
    done_before = json.loads(state.read_text())["epoch"]
    assert 1 <= done_before < 5

    r = launch(workdir, *args)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "skip prep" in r.stderr  # same prep config: prepared data reused
    assert "distributed.train --config" in r.stderr and "--resume" in r.stderr
    assert (run / "model.keras").exists() and (run / "report.md").exists()
    assert history_epochs(run) == [1, 2, 3, 4, 5]  # no epoch lost or repeated
    assert json.loads(state.read_text())["complete"] is True


def test_sweep_two_seeds_then_a_rerun_skips_both(workdir):
    """launch sweep: one pipeline per seed (1 process each, the tiny pipeline), sweep.json with both runs
    and their mean; the same command again skips both seeds."""
    import statistics

    base = workdir / "sweep"
    cmd = [sys.executable, "-m", "launch", "sweep", "--config", str(workdir / "c.yaml"), "--seeds", "0,1",
           "--set", f"run.dir={base}", "--set", "eval.gradcam_per_group=0", "--np", "1"]
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    s = json.loads((base / "sweep.json").read_text())
    assert s["seeds"] == [0, 1] and [x["seed"] for x in s["runs"]] == [0, 1] and s["resplit"] is False
    aucs = []
    for x in s["runs"]:
        run = Path(x["run_dir"])
        assert run == base / f"seed-{x['seed']}"
        m = json.loads((run / "metrics.json").read_text())
        assert x["auc"] == m["plain"]["auc"] and x["auc_ci"]["low"] == m["plain"]["auc_ci"]["low"]
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == x["seed"]
        aucs.append(x["auc"])
    assert (s["auc_mean"] == pytest.approx(statistics.fmean(aucs))
            and s["auc_sd"] == pytest.approx(statistics.stdev(aucs)))
    assert "| 0 |" in (base / "sweep.md").read_text()
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "skip seed 0" in r.stderr and "skip seed 1" in r.stderr and "distributed.train" not in r.stderr
    assert time.monotonic() - t0 < 60
    assert json.loads((base / "sweep.json").read_text())["runs"] == s["runs"]
