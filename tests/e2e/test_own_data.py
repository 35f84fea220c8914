"""A research group's own data through the whole pipeline on 2 ranks (tiny backbone, 32 px): a generated
CheXpert-style set (one file name in many patient/study folders, string patients, uncertain and blank labels,
lateral views filtered) under each uncertain-label policy, and a generated DICOM set read by the csv format
with the patient from the header's PatientID, pseudonymised. Each goes prep -> train -> evaluate -> report.md,
with the splits disjoint by patient (read from the shards) and the label policy stated. Needs Open MPI and
Horovod."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from test_pipeline import env  # the subprocess environment of the e2e pipeline tests

from data_prep import synthetic

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.needs_mpirun, pytest.mark.needs_horovod]

COMMON = ("model: {backbone: tiny, weights: none, dense_units: 16}\n"
          "train: {batch_size: 8, warmup: {epochs: 1}, finetune: {epochs: 1, patience: 10}}\n"
          "eval: {tta: false, bootstrap: 20, gradcam_per_group: 1}\n"
          "runtime: {precision: float32}\n")


def pipeline(d: Path, data_yaml: str):
    (d / "c.yaml").write_text(
        data_yaml + f"prep: {{out: {d}/prepared, shard_size: 32, val_fraction: 0.2, test_fraction: 0.25}}\n"
        + COMMON + f"run: {{dir: {d}/run}}\n")
    r = subprocess.run([sys.executable, "-m", "launch", "pipeline", "--config", str(d / "c.yaml"), "--np", "2"],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    for f in ("report.md", "metrics.json", "predictions.csv"):
        assert (d / "run" / f).is_file(), f
    return r


def shard_columns(prep: Path) -> dict:
    """Per split: (image ids, patient ids) read from the shards."""
    man = json.loads((prep / "manifest.json").read_text())
    out = {}
    for split, s in man["splits"].items():
        images, patients = [], []
        for sh in s["shards"]:
            with h5py.File(prep / sh["file"], "r") as h:
                images += [x.decode() for x in h["image_index"][...]]
                patients += [x.decode() for x in h["patient_id"][...]]
        out[split] = (images, patients)
    return out


def assert_disjoint_by_patient(cols: dict):
    sets = {s: set(p) for s, (_, p) in cols.items()}
    assert all(sets.values()), {s: len(v) for s, v in sets.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])


@pytest.mark.parametrize("policy", ["ignore", "positive", "negative"])
def test_chexpert_style_set_under_each_uncertain_policy(tmp_path, policy):
    """U-Ignore, U-Ones and U-Zeros end to end: the same generated set, the policy stated in the manifest,
    metrics.json and report.md; only U-Ignore leaves the uncertain images out of the binary task."""
    s = synthetic.generate(tmp_path / "data", patients=40, image_size=64, seed=5, progress=False, fmt="chexpert")
    assert s["uncertain Lung Opacity"] > 0
    r = pipeline(tmp_path, f"data: {{format: chexpert, csv: {tmp_path}/data/CheXpert-v1.0-small/train.csv, "
                           f"images: {tmp_path}/data, positive_label: Lung Opacity, uncertain: {policy}, "
                           "image_size: 32}\n")
    prep = tmp_path / "prepared"
    man = json.loads((prep / "manifest.json").read_text())
    lab = man["labels"]
    assert lab["format"] == "chexpert" and lab["uncertain"] == policy
    assert lab["uncertain_labels"]["Lung Opacity"] == s["uncertain Lung Opacity"]
    # U-Ignore: each uncertain image left out of the binary task; U-Ones/U-Zeros keep them
    assert lab["masked_images"] == (s["uncertain Lung Opacity"] if policy == "ignore" else 0)
    laterals = [x for x in man["skipped"] if x["reason"].startswith("view not in data.views")]
    assert len(laterals) == s["images"] - s["frontal"] and all(x["image"].endswith("view2_lateral.jpg")
                                                               for x in laterals)
    cols = shard_columns(prep)
    assert_disjoint_by_patient(cols)
    images = [i for im, _ in cols.values() for i in im]
    assert len(images) == len(set(images)) and all(i.endswith("/view1_frontal.jpg") for i in images)
    assert all(p.startswith("patient") for _, ps in cols.values() for p in ps)
    with open(tmp_path / "run" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == cols["test"][0] and [r["patient"] for r in rows] == cols["test"][1]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["labels"]["uncertain"] == policy and m["classes"] == ["No Finding", "Lung Opacity"]
    report = (tmp_path / "run" / "report.md").read_text()
    stated = (f"uncertain labels (`data.uncertain: {policy}`): {sum(lab['uncertain_labels'].values())} read, "
              + {"ignore": "masked out of the loss and the metrics (U-Ignore)",
                 "positive": "counted as positive (U-Ones)", "negative": "counted as negative (U-Zeros)"}[policy])
    assert stated in report
    assert (f"{lab['masked_images']} images left out" in report) == (policy == "ignore")
    # the task in CheXpert's words, not NIH's (no "Finding Labels", no ChestX-ray14 published figures)
    assert "Positives: every image whose **Lung Opacity** observation is positive" in report
    assert "Finding Labels include" not in report and "CheXNet 0.7345" not in report
    assert "prep: 2 rank(s)" in r.stderr and "train: 2 rank(s)" in r.stderr


def test_dicom_set_with_patients_from_the_header(tmp_path):
    n = 30
    synthetic.generate(tmp_path / "data", patients=n, image_size=64, seed=9, progress=False, fmt="dicom")
    d = tmp_path / "data"
    r = pipeline(tmp_path, f"data: {{format: csv, csv: {d}/labels.csv, images: {d}, image_size: 32, "
                           "positive_label: Infiltration, columns: {image: image, labels: [Infiltration], "
                           "view: view, sex: sex, age: age}}\n")
    prep = tmp_path / "prepared"
    man = json.loads((prep / "manifest.json").read_text())
    assert man["labels"]["patient_from"] == "DICOM PatientID" and man["labels"]["pseudonymized"] is True
    kinds = {c["kind"] for c in man["converted"]}
    assert {"format", "VOI", "photometric", "bit depth"} <= kinds, kinds  # windowed to 8 bits, per image
    syntaxes = {c["from"] for c in man["converted"] if c["kind"] == "format"}
    assert any("RLE" in x for x in syntaxes) and len(syntaxes) >= 2, syntaxes  # some RLE-compressed
    key = prep / ".patient-key"
    assert key.is_file() and (key.stat().st_mode & 0o777) == 0o600
    cols = shard_columns(prep)
    assert_disjoint_by_patient(cols)
    assert all(i.startswith("images/") and i.endswith(".dcm") for im, _ in cols.values() for i in im)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "patient ids (DICOM PatientID) pseudonymised by a keyed hash" in report
    # no PatientID of a header in any file the run wrote, nor in its console output; the key file holds none
    mrns = [synthetic.patient_mrn(9, p).encode() for p in range(1, n + 1)]
    assert any(m in (d / "images" / "00000001_000.dcm").read_bytes() for m in mrns)  # the search can find them
    written = [f for base in (prep, tmp_path / "run") for f in base.rglob("*") if f.is_file()]
    assert len(written) > 20
    leaks = [str(f) for f in written for m in mrns if m in f.read_bytes()]
    assert not leaks, leaks[:5]
    assert not [m for m in mrns if m.decode() in r.stdout + r.stderr]


def test_chexpert_multilabel_masked_labels_train_and_evaluate(tmp_path):
    """Multilabel under U-Ignore: uncertain and blank labels stay in the shards as masked, the masked loss
    trains, and each finding's AUC counts only its labelled test images."""
    synthetic.generate(tmp_path / "data", patients=30, image_size=64, seed=6, progress=False, fmt="chexpert")
    pipeline(tmp_path, f"data: {{format: chexpert, csv: {tmp_path}/data/CheXpert-v1.0-small/train.csv, "
                       f"images: {tmp_path}/data, task: multilabel, uncertain: ignore, image_size: 32}}\n")
    prep = tmp_path / "prepared"
    man = json.loads((prep / "manifest.json").read_text())
    masked = man["splits"]["test"]["masked"]
    assert len(masked) == 13 and sum(masked.values()) > 0
    with h5py.File(prep / man["splits"]["test"]["shards"][0]["file"], "r") as h:
        assert h["mask"].shape == h["targets"].shape and (h["mask"][...] == 0).any()
    hist = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(hist) == 3 and all("nan" not in row for row in hist[1:])
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    test_mask = {}
    for sh in man["splits"]["test"]["shards"]:
        with h5py.File(prep / sh["file"], "r") as h:
            for j, c in enumerate(man["classes"]):
                test_mask[c] = test_mask.get(c, 0) + int((h["mask"][:, j] == 0).sum())
    assert {c: f["masked"] for c, f in m["plain"]["findings"].items()} == test_mask
    assert m["labels"]["masked_test_labels"] == sum(test_mask.values())
    assert "labels masked in the shards" in (tmp_path / "run" / "report.md").read_text()
