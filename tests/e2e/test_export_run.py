"""``cxr-export`` of a trained tiny-backbone run (``python -m launch pipeline --np 1`` on a generated data set,
about 2 minutes on 2 cores): the SavedModel gives cxr-predict's answers on a raw 16-bit PNG and a non-square
JPEG, ONNX Runtime gives TensorFlow's on 20 images, model.json and MODEL_CARD.md hold metrics.json's numbers,
and ``cxr-predict --model BUNDLE`` answers as the run does.
"""
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_pipeline import env  # the subprocess environment of the e2e pipeline tests

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
S = 32

pytestmark = [pytest.mark.needs_mpirun, pytest.mark.needs_horovod]


def run(*args, timeout=900):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A finished run (calibrated, Grad-CAM grids), its bundle with ONNX, and input files of every kind."""
    d = tmp_path_factory.mktemp("export")
    r = run("-m", "data_prep.synthetic", "--out", str(d / "data"), "--patients", "40", "--image-size", "64",
            "--seed", "3", "--no-progress", timeout=300)
    assert r.returncode == 0, r.stderr
    (d / "c.yaml").write_text(
        f"data: {{csv: {d}/data/Data_Entry_2017.csv, images: {d}/data, image_size: {S}}}\n"
        f"prep: {{out: {d}/prepared, shard_size: 32, train_per_class: 40, val_fraction: 0.2, test_fraction: 0.25}}\n"
        "model: {backbone: tiny, weights: none, dense_units: 16}\n"
        "train: {batch_size: 8, warmup: {epochs: 1}, finetune: {epochs: 2, patience: 10}}\n"
        "eval: {bootstrap: 20, gradcam_per_group: 2, calibrate: temperature}\n"
        f"run: {{dir: {d}/run}}\n"
        "runtime: {precision: float32}\n")
    r = run("-m", "launch", "pipeline", "--config", str(d / "c.yaml"), "--np", "1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = run("-m", "distributed.export", "--run", str(d / "run"), "--out", str(d / "bundle"), "--format",
            "savedmodel,onnx")
    assert r.returncode == 0, r.stderr[-3000:]
    # input files: NIH PNGs (8-bit), a raw 16-bit PNG, non-square JPEGs (gray; RGB larger than 8 S: DCT-scaled)
    nih = np.asarray(Image.open(FIXTURES / "00000001_000.png"))
    files = d / "files"
    files.mkdir()
    for f in sorted(FIXTURES.glob("*.png")):
        shutil.copy(f, files / f.name)
    a16 = np.asarray(Image.fromarray(nih).resize((480, 400))).astype(np.uint16) * 257 + 1000
    Image.fromarray(a16.astype(np.uint16), "I;16").save(files / "raw16.png")
    Image.fromarray(nih).resize((300, 220)).save(files / "gray.jpg", quality=90)
    g = Image.fromarray(nih).resize((400, 530))
    Image.merge("RGB", (g, g.transpose(Image.FLIP_TOP_BOTTOM), g)).save(files / "colour.jpg", quality=90)
    return d


def decoded(path: Path) -> np.ndarray:
    """What a server's decoder hands the SavedModel (docs/export.md): gray, JPEG at Pillow's draft scale."""
    import tensorflow as tf

    from distributed.tfprep import jpeg_draft_ratio

    raw = path.read_bytes()
    img = Image.open(io.BytesIO(raw))
    if img.format == "JPEG":
        r = jpeg_draft_ratio(*img.size, S)
        return tf.io.decode_jpeg(raw, channels=1, ratio=r, dct_method="INTEGER_ACCURATE").numpy()[..., 0]
    a = np.asarray(img)
    return a.astype(np.uint16) if a.dtype != np.uint8 else a


def predict_json(model, files) -> dict:
    r = run("-m", "distributed.predict", "--model", str(model), "--json", "--precision", "float32",
            *map(str, files), timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def signature_for(a: np.ndarray) -> str:
    return "uint16" if a.dtype == np.uint16 else "uint8"


def test_savedmodel_gives_predict_s_answers_on_raw_files(work):
    import tensorflow as tf

    from data_prep.imaging import load_xray

    files = sorted((work / "files").iterdir())
    ref = {r["file"]: r for r in predict_json(work / "run", files)["results"]}
    sm = tf.saved_model.load(str(work / "bundle" / "saved_model"))
    for f in files:
        a = decoded(f)
        kind = signature_for(a)
        pre = sm.signatures[f"preprocess_{kind}"](images=tf.constant(a[None]))["image"].numpy()[0]
        assert np.array_equal(pre, load_xray(f, S)[0]), f.name  # the network input, pixel for pixel
        out = {k: v.numpy()[0] for k, v in sm.signatures[f"predict_{kind}"](images=tf.constant(a[None])).items()}
        r = ref[str(f)]
        assert out["raw_probability"] == pytest.approx(r["raw_probability"], abs=1e-6), f.name
        assert out["probability"] == pytest.approx(r["probability"], abs=1e-6), f.name
        assert out["label"].decode() == r["prediction"], f.name
    assert {"raw16.png", "colour.jpg", "gray.jpg"} <= {f.name for f in files}


def test_predict_on_the_bundle_equals_predict_on_the_run(work):
    files = sorted((work / "files").iterdir())
    a, b = predict_json(work / "run", files), predict_json(work / "bundle", files)
    assert a["classes"] == b["classes"] and a["threshold"] == b["threshold"] and a["image_size"] == b["image_size"]
    for x, y in zip(a["results"], b["results"]):
        assert (x["probability"], x["raw_probability"], x["prediction"]) == \
               (y["probability"], y["raw_probability"], y["prediction"]), x["file"]
    assert b["calibration"]["applied"] and b["threshold_source"]["source"] == "operating point"


def test_onnx_runtime_gives_tensorflow_s_probabilities_on_20_images(work):
    ort = pytest.importorskip("onnxruntime")
    import tensorflow as tf

    doc = json.loads((work / "bundle" / "model.json").read_text())
    sm = tf.saved_model.load(str(work / "bundle" / "saved_model"))
    sessions = {k: ort.InferenceSession(str(work / "bundle" / doc["onnx"]["files"][f"predict_{k}"]),
                                        providers=["CPUExecutionProvider"]) for k in ("uint8", "uint16")}
    images = sorted((work / "data" / "images").glob("*.png"))[:15] + sorted((work / "files").iterdir())
    assert len(images) == 20
    worst = 0.0
    for f in images:
        a = decoded(f)
        kind = signature_for(a)
        s = sessions[kind]
        got = dict(zip([o.name for o in s.get_outputs()], s.run(None, {"images": a[None]})))
        want = sm.signatures[f"predict_{kind}"](images=tf.constant(a[None]))
        for k in ("raw_probability", "probability"):
            worst = max(worst, float(np.abs(got[k] - want[k].numpy()).max()))
        assert got["label"].astype(str).tolist() == want["label"].numpy().astype(str).tolist(), f.name
    assert worst <= 1e-4, worst


def test_model_json_holds_the_run_s_numbers(work):
    from data_prep.fsutil import sha256_file

    run_dir, bundle = work / "run", work / "bundle"
    doc = json.loads((bundle / "model.json").read_text())
    m = json.loads((run_dir / "metrics.json").read_text())
    op = json.loads((run_dir / "operating_point.json").read_text())
    cal = json.loads((run_dir / "calibration.json").read_text())
    tp = json.loads((run_dir / "training_prep.json").read_text())
    assert doc["classes"] == m["classes"] and doc["positive_class"] == m["positive_class"] == m["classes"][1]
    assert doc["input"]["image_size"] == m["image_size"] == S
    d = doc["decision"]
    assert d["threshold"] == op["threshold"] == m["operating_point"]["threshold"]
    assert (d["rule"], d["chosen_on"], d["applied_to"]) == (op["rule"], "validation", "raw_probability")
    c = doc["calibration"]
    assert c["applied"] and (c["temperature"], c["shift"], c["center"]) == \
           (cal["temperature"], cal["shift"], cal["center"]) == \
           (m["plain"]["calibrated"]["temperature"], m["plain"]["calibrated"]["shift"], cal["center"])
    t, plain = doc["metrics"], m["plain"]
    assert (t["n"], t["positives"], t["prevalence"]) == (plain["n"], plain["positives"], plain["prevalence"])
    assert (t["auc"]["value"], t["auc"]["low"], t["auc"]["high"]) == \
           (plain["auc"], plain["auc_ci"]["low"], plain["auc_ci"]["high"])
    for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy"):
        assert t["operating_point"][k] == m["operating_point"][k], k
    assert (t["brier"], t["ece"]) == (plain["brier"], plain["ece"])
    assert t["calibrated"] == {"brier": plain["calibrated"]["brier"], "ece": plain["calibrated"]["ece"]}
    td = doc["training_data"]
    assert (td["prep_hash"], td["manifest_sha256"]) == (tp["config_hash"], tp["manifest_sha256"])
    assert td["manifest_format"] == 4 and td["source"]["synthetic"] is True  # shard format 4 since issue 31
    assert doc["files"]["model.keras"] == sha256_file(run_dir / "model.keras") == doc["source_run"]["sha256"]
    for rel, digest in doc["files"].items():
        assert sha256_file(bundle / rel) == digest, rel
    assert {"saved_model/saved_model.pb", "onnx/predict_uint8.onnx", "onnx/predict_uint16.onnx",
            "MODEL_CARD.md"} <= set(doc["files"])
    assert doc["project"] == {"name": "cxr-transfer", "version": "0.1.0"}


def _card_numbers_match(card: str, m: dict) -> None:
    from distributed.modelcard import interval, num

    plain, op = m["plain"], m["operating_point"]
    assert f"| ROC AUC | {interval({'value': plain['auc'], **plain['auc_ci']})} |" in card
    for k in ("sensitivity", "specificity", "ppv", "npv", "accuracy"):
        assert f"| {k} at the operating point | {interval(op[k])} |" in card, k
    assert f"threshold {op['threshold']:.9g} on the network's probability" in card
    assert f"Brier {num(plain['brier'])}, ECE {num(plain['ece'])}" in card
    c = plain["calibrated"]
    assert f"temperature {num(c['temperature'])}" in card and f"ECE {num(c['ece'])}" in card
    assert f"prevalence {num(plain['prevalence'])}" in card
    for field, groups in plain["subgroups"].items():
        for name, v in groups.items():
            if v["auc"] is not None:
                assert f"| {field} {name} | {v['n']} | {v['positives']} | " \
                       f"{interval({'value': v['auc'], **v['auc_ci']})} |" in card, (field, name)


def test_model_card_numbers_and_links(work, tmp_path):
    run_dir = work / "run"
    m = json.loads((run_dir / "metrics.json").read_text())
    card = (work / "bundle" / "MODEL_CARD.md").read_text()
    _card_numbers_match(card, m)
    assert "**Generated data, not medical images.**" in card and "mined from the radiology reports by NLP" in card
    assert "python -m launch pipeline --config config.yaml" in card
    links = re.findall(r"\]\((gradcam/[^)]+)\)", card)
    assert links and all((work / "bundle" / link).is_file() for link in links)
    assert {Path(v).name for v in m["gradcam"].values()} == {Path(link).name for link in links}
    # a grid missing from the run is not linked
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export", "tb"))
    gone = Path(links[0]).name
    (copy / "gradcam" / gone).unlink()
    r = run("-m", "distributed.export", "--run", str(copy), "--out", str(tmp_path / "b"), timeout=300)
    assert r.returncode == 0, r.stderr
    card2 = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    assert gone not in card2 and not (tmp_path / "b" / "gradcam" / gone).exists()
    _card_numbers_match(card2, m)


def test_a_changed_bundle_is_refused_in_one_line(work, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(work / "bundle", b)
    doc = json.loads((b / "model.json").read_text())
    doc["decision"]["threshold"] = 2.0
    (b / "model.json").write_text(json.dumps(doc))
    r = run("-m", "distributed.predict", "--model", str(b), str(FIXTURES / "00000001_000.png"), timeout=300)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "threshold" in r.stderr
    doc["decision"]["threshold"] = 0.5
    (b / "model.json").write_text(json.dumps(doc))
    with open(b / "model.keras", "ab") as f:
        f.write(b"\0")
    r = run("-m", "distributed.predict", "--model", str(b), str(FIXTURES / "00000001_000.png"), timeout=300)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "sha256" in r.stderr
