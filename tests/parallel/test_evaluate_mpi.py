"""cxr-eval end to end on a tiny prepared data set: outputs, metrics.json recomputed from
predictions.csv with scikit-learn, and a 2-rank run giving the same predictions, each image once.

The run directory holds an untrained ``build_model`` (tiny backbone, 64 px) saved where training
would put it: enough for these equality tests, and independent of the trainer.
"""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import classification_report, confusion_matrix, roc_auc_score


ROOT = Path(__file__).resolve().parents[2]
S = 64
BASE_SETS = ["eval.bootstrap=60", "eval.tta_rounds=2", "eval.gradcam_per_group=2", "eval.batch_size=16",
             "eval.threshold=0.5"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def _run(args, timeout=600, **kw):
    p = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout, **kw)
    assert p.returncode == 0, f"{' '.join(map(str, args))}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-5000:]}"
    return p


def _config(tmp: Path, task: str = "binary") -> Path:
    cfg = tmp / f"cfg-{task}.yaml"
    cfg.write_text(f"""
data:
  csv: {tmp}/data/Data_Entry_2017.csv
  images: {tmp}/data
  image_size: {S}
  task: {task}
prep:
  out: {tmp}/prepared-{task}
  shard_size: 16
  train_per_class: 20
  val_fraction: 0.15
  test_fraction: 0.4
model:
  backbone: tiny
  weights: none
  dense_units: 8
train:
  batch_size: 8
run:
  dir: {tmp}/run-{task}
  name: evaluate test ({task})
""")
    return cfg


def _make_run(cfg_path: Path, num_classes: int, multilabel: bool) -> Path:
    """config.yaml, history.csv and checkpoints/{best,last}.keras + model.keras, as training leaves them."""
    code = f"""
import tensorflow as tf
from pathlib import Path
from data_prep.config import load_config, save_resolved
from distributed.model import build_model
cfg = load_config({str(cfg_path)!r})
tf.keras.utils.set_random_seed(3)
m = build_model(cfg.model, cfg.data.image_size, {num_classes}, multilabel={multilabel})
d = Path(cfg.run.dir); (d / "checkpoints").mkdir(parents=True, exist_ok=True)
for p in ("checkpoints/best.keras", "checkpoints/last.keras", "model.keras"):
    m.save(d / p)
save_resolved(cfg, d)
(d / "history.csv").write_text("phase,epoch,loss,accuracy,val_loss,val_accuracy\\n"
    "warmup,1,0.70,0.50,0.69,0.52\\nfinetune,2,0.69,0.51,0.69,0.50\\nfinetune,3,0.68,0.52,0.69,0.50\\n")
print(d)
"""
    return Path(_run([sys.executable, "-c", code]).stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    _run([sys.executable, "-m", "data_prep.synthetic", "--out", str(tmp / "data"), "--patients", "50",
          "--image-size", str(S), "--seed", "5", "--no-progress"])
    return tmp


@pytest.fixture(scope="module")
def binary_run(workdir):
    cfg = _config(workdir)
    _run([sys.executable, "-m", "data_prep", "--config", str(cfg)])
    run = _make_run(cfg, 2, False)
    p = _run([sys.executable, "-m", "distributed.evaluate", "--config", str(cfg), *sum([["--set", s] for s in BASE_SETS], [])])
    return cfg, run, p.stdout + p.stderr


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _test_split_images(prep_out: Path):
    import h5py

    m = json.loads((prep_out / "manifest.json").read_text())
    names = []
    for sh in m["splits"]["test"]["shards"]:
        with h5py.File(prep_out / sh["file"], "r") as h:
            names += [x.decode() if isinstance(x, bytes) else str(x) for x in h["image_index"][:]]
    return m, names


def test_outputs_are_complete(binary_run):
    cfg, run, stdout = binary_run
    for rel in ("predictions.csv", "metrics.json", "report.md", "eval_config.yaml", "plots/roc.png", "plots/pr.png",
                "plots/confusion.png", "plots/history.png"):
        assert (run / rel).is_file(), rel
    m = json.loads((run / "metrics.json").read_text())
    for g, rel in m["gradcam"].items():
        assert (run / rel).is_file() and g in ("true_positives", "false_positives", "false_negatives")
    assert m["gradcam_layer"].startswith("block5_")  # the backbone's last feature map (last_conv_layer)
    report = (run / "report.md").read_text()
    # every image link is relative and resolves inside the run directory
    links = [ln.split("](", 1)[1].rstrip(")") for ln in report.splitlines() if ln.startswith("![")]
    assert "plots/roc.png" in links and "plots/history.png" in links
    for rel in links:
        assert not os.path.isabs(rel) and (run / rel).is_file()
    assert "precision" in stdout and "ROC AUC" in stdout and "with test-time augmentation" in stdout
    assert "## Data" in report and "| test |" in report and "```yaml" in report
    assert "mean of 3 predictions: the plain image's and those of 2 copies" in report  # eval.tta_rounds=2
    # history.csv says the loss stayed at ln 2 (random weights): the log and the report say so, once each
    warning = "the model is not learning: training loss 0.680 after the warm-up and 2 fine-tune epoch(s)"
    assert stdout.count(warning) == 1 and report.count(warning) == 1
    assert report.index(warning) < report.index("### Summary")


def test_each_test_image_exactly_once(binary_run):
    cfg, run, _ = binary_run
    rows = _csv(run / "predictions.csv")
    manifest, names = _test_split_images(Path(str(cfg).replace("cfg-binary.yaml", "prepared-binary")))
    assert len(rows) == manifest["splits"]["test"]["count"] == len(names)
    assert [r["image"] for r in rows] == names  # split order
    assert [int(r["index"]) for r in rows] == list(range(len(rows)))
    assert len({r["image"] for r in rows}) == len(rows)
    assert list(rows[0]) == ["index", "image", "patient", "view", "sex", "age", "label", "probability", "tta_probability"]


def test_metrics_json_matches_predictions_csv(binary_run):
    _, run, _ = binary_run
    rows = _csv(run / "predictions.csv")
    m = json.loads((run / "metrics.json").read_text())
    y = np.array([int(r["label"]) for r in rows])
    assert set(y) == {0, 1}, "the tiny test split needs both classes"
    classes = m["classes"]
    for key, col in (("plain", "probability"), ("tta", "tta_probability")):
        p = np.array([float(r[col]) for r in rows])
        mm = m[key]
        assert mm["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
        pred = (p >= m["threshold"]).astype(int)
        ref = classification_report(y, pred, target_names=classes, output_dict=True, zero_division=0)
        for c in classes + ["macro avg", "weighted avg"]:
            for f in ("precision", "recall", "f1-score"):
                assert mm["report"][c][f] == pytest.approx(ref[c][f], abs=1e-9), (key, c, f)
            assert mm["report"][c]["support"] == ref[c]["support"]
        assert mm["report"]["accuracy"] == pytest.approx(ref["accuracy"])
        assert mm["confusion_matrix"] == confusion_matrix(y, pred, labels=[0, 1]).tolist()
        assert mm["patients"] == len({r["patient"] for r in rows})
        ci = mm["auc_ci"]
        assert ci["by"] == "patient" and ci["n_valid"] > 0 and ci["low"] <= ci["high"]
        for field in ("view", "sex"):
            for k, v in mm["subgroups"][field].items():
                sel = np.array([r[field] == k for r in rows])
                assert v["n"] == sel.sum()
                if len(set(y[sel])) == 2:
                    assert v["auc"] == pytest.approx(roc_auc_score(y[sel], p[sel]), abs=1e-9)
                else:
                    assert v["auc"] is None
        assert 0.0 <= mm["youden"]["threshold"] <= 1.0


@pytest.mark.needs_mpirun
@pytest.mark.needs_horovod
def test_two_ranks_give_the_same_predictions(binary_run, tmp_path):
    cfg, run, _ = binary_run
    run2 = tmp_path / "run2"
    shutil.copytree(run / "checkpoints", run2 / "checkpoints")
    shutil.copy(run / "history.csv", run2 / "history.csv")
    _run(["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", "--mca", "btl_vader_single_copy_mechanism",
          "none", sys.executable, "-m", "distributed.evaluate",
          "--config", str(cfg), *sum([["--set", s] for s in BASE_SETS + [f"run.dir={run2}"]], [])])
    one, two = _csv(run / "predictions.csv"), _csv(run2 / "predictions.csv")
    assert len(two) == len(one) and len({r["image"] for r in two}) == len(two)
    for a, b in zip(one, two):
        for k in ("index", "image", "patient", "view", "sex", "age", "label"):
            assert a[k] == b[k]
        assert float(b["probability"]) == pytest.approx(float(a["probability"]), abs=1e-5)
        # TTA draws are seeded per image, not per rank or batch
        assert float(b["tta_probability"]) == pytest.approx(float(a["tta_probability"]), abs=1e-5)
    m2 = json.loads((run2 / "metrics.json").read_text())
    assert m2["ranks"] == 2 and m2["n"] == len(one)


def test_multilabel_per_finding_auc(workdir):
    cfg = _config(workdir, "multilabel")
    _run([sys.executable, "-m", "data_prep", "--config", str(cfg)])
    run = _make_run(cfg, 14, True)
    p = _run([sys.executable, "-m", "distributed.evaluate", "--config", str(cfg),
              "--set", "eval.tta=false", "--set", "eval.bootstrap=30", "--set", "eval.gradcam_per_group=2"])
    m = json.loads((run / "metrics.json").read_text())
    rows = _csv(run / "predictions.csv")
    assert m["task"] == "multilabel" and m["tta"] is None and len(m["classes"]) == 14
    aucs = []
    for c in m["classes"]:
        col = c.replace(" ", "_")
        y = np.array([int(r[f"label_{col}"]) for r in rows])
        pr = np.array([float(r[f"probability_{col}"]) for r in rows])
        f = m["plain"]["findings"][c]
        if len(set(y)) == 2:
            aucs.append(roc_auc_score(y, pr))
            assert f["auc"] == pytest.approx(aucs[-1], abs=1e-9)
        else:
            assert f["auc"] is None
    assert aucs and m["plain"]["mean_auc"] == pytest.approx(np.mean(aucs), abs=1e-9)
    assert "Mean AUROC" in p.stdout and "CheXNet" in (run / "report.md").read_text()
    assert (run / "plots" / "roc_per_finding.png").is_file()


def test_missing_checkpoint_names_what_exists(tmp_path):
    from distributed.evaluate import EvalError, checkpoint_path

    (tmp_path / "model.keras").write_bytes(b"x")
    with pytest.raises(EvalError, match=r"eval.checkpoint=best.*this run has: final"):
        checkpoint_path(tmp_path, "best")
    assert checkpoint_path(tmp_path, "final") == tmp_path / "model.keras"
