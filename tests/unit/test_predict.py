"""cxr-predict on the real NIH fixtures, an RGBA and a 16-bit file, and a corrupt one."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
from PIL import Image  # noqa: E402

import data_prep.imaging  # noqa: E402
from data_prep.config import load_config, save_resolved  # noqa: E402
from distributed import predict  # noqa: E402
from distributed.model import build_model, load_model  # noqa: E402

S = 64


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory shaped like the contract: config.yaml and model.keras (untrained tiny)."""
    d = tmp_path_factory.mktemp("run")
    cfg = load_config(None, ["model.backbone=tiny", "model.weights=none", "model.dense_units=8",
                             f"data.image_size={S}", f"run.dir={d}", f"prep.out={d / 'no-prep'}",
                             "data.positive_label=Effusion", "eval.threshold=0.3"])
    tf.keras.utils.set_random_seed(0)
    build_model(cfg.model, S, 2).save(d / "model.keras")
    save_resolved(cfg, d)
    return d


@pytest.fixture(scope="module")
def images(tmp_path_factory, fixtures):
    d = tmp_path_factory.mktemp("imgs")
    gray = np.asarray(Image.open(fixtures / "00000001_000.png").convert("L"))
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 200)])[:, :400]       # 400 x 512 (W x H)
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray((gray.astype(np.uint16) * 257)[:300], "I;16").save(d / "x16.png")  # 512 x 300
    (d / "corrupt.png").write_bytes((fixtures / "00027426_000.png").read_bytes()[:2500])
    return {"nih1": str(fixtures / "00000001_000.png"), "nih2": str(fixtures / "00027426_000.png"),
            "rgba": str(d / "rgba.png"), "x16": str(d / "x16.png"), "corrupt": str(d / "corrupt.png"), "dir": d}


def test_uses_the_one_preprocessing_function():
    assert predict.load_xray is data_prep.imaging.load_xray


def test_all_kinds_of_input_with_overlays(run_dir, images, tmp_path, capsys):
    files = [images[k] for k in ("nih1", "nih2", "rgba", "x16")]
    cams = tmp_path / "cams"
    rc = predict.main(["--model", str(run_dir), *files, "--json", "--gradcam", str(cams), "--precision", "float32"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["failed"] == 0
    # eval.threshold (0.3 in the run's config) is the class table's, not a decision: without an operating point 0.5
    assert out["image_size"] == S and out["classes"] == ["No Finding", "Effusion"] and out["threshold"] == 0.5
    by = {r["file"]: r for r in out["results"]}
    assert by[images["rgba"]]["converted_from"] == "RGBA" and by[images["x16"]]["bits"] == 16
    model = load_model(str(run_dir / "model.keras"))
    for f in files:
        r = by[f]
        assert 0.0 <= r["probability"] <= 1.0
        assert r["prediction"] == ("Effusion" if r["probability"] >= 0.5 else "No Finding")
        # the same number as the model on load_xray's output
        x, _ = data_prep.imaging.load_xray(f, S)
        ref = model.predict(x[None, ..., None].astype(np.float32), verbose=0)[0, 1]
        assert r["probability"] == pytest.approx(float(ref), abs=1e-5)
        with Image.open(f) as src, Image.open(r["gradcam"]) as ov:
            assert ov.size == src.size and ov.mode == "RGB"
        assert os.path.dirname(r["gradcam"]) == str(cams)


def test_corrupt_file_is_reported_and_the_rest_still_run(run_dir, images, capsys):
    rc = predict.main(["--model", str(run_dir / "model.keras"), images["nih1"], images["corrupt"],
                       str(images["dir"] / "missing.png"), images["x16"]])
    cap = capsys.readouterr()
    assert rc == 1
    lines = [ln for ln in cap.out.splitlines() if not ln.startswith("# ")]  # the notes: threshold, calibration
    assert len(lines) == 5  # header + 4 files
    assert any(images["corrupt"] in ln and "ERROR" in ln and "truncated" in ln for ln in lines)
    assert any("missing.png" in ln and "file not found" in ln for ln in lines)
    for key in ("nih1", "x16"):
        row = next(ln for ln in lines if ln.startswith(images[key]))
        assert 0.0 <= float(row.split()[1]) <= 1.0
    assert "corrupt.png: truncated" in cap.err


def test_overlay_beside_the_input_and_gradcam_before_images(run_dir, images, capsys):
    # "--gradcam IMG ..." : argparse would take IMG as the folder; it is recognised as an image
    rc = predict.main(["--model", str(run_dir), "--json", "--gradcam", images["rgba"]])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and len(out["results"]) == 1
    ov = out["results"][0]["gradcam"]
    assert ov == str(images["dir"] / "rgba.gradcam.png")
    with Image.open(ov) as im:
        assert im.size == (400, 512)


def test_image_size_must_match_a_fixed_model(run_dir, images, capsys):
    assert predict.main(["--model", str(run_dir), "--image-size", "128", images["nih1"]]) == 2
    assert "does not match" in capsys.readouterr().err
    assert predict.main(["--model", str(run_dir / "nope.keras"), images["nih1"]]) == 1


def test_command_line_exit_code(run_dir, images, root):
    env = {**os.environ, "PYTHONPATH": str(root), "TF_CPP_MIN_LOG_LEVEL": "2"}
    p = subprocess.run([sys.executable, "-m", "distributed.predict", "--model", str(run_dir), "--json",
                        images["nih2"], images["corrupt"]], capture_output=True, text=True, cwd=root, env=env,
                       timeout=300)
    assert p.returncode == 1, p.stderr
    doc = json.loads(p.stdout)
    assert doc["failed"] == 1
    assert [("error" in r) for r in doc["results"]] == [False, True]


def test_gradcam_decodes_each_file_once(run_dir, images, tmp_path, monkeypatch, capsys):
    opened = []
    real_open = data_prep.imaging._open
    monkeypatch.setattr(data_prep.imaging, "_open", lambda src: opened.append(str(src)) or real_open(src))
    files = [images["nih1"], images["x16"], images["rgba"]]
    assert predict.main(["--model", str(run_dir), *files, "--json", "--gradcam", str(tmp_path)]) == 0
    assert sorted(opened) == sorted(files)
    for f, wh in ((images["x16"], (512, 300)), (images["rgba"], (400, 512))):
        net, original, info = data_prep.imaging.load_xray_and_original(f, S)
        np.testing.assert_array_equal(net, data_prep.imaging.load_xray(f, S)[0])  # the same network input
        assert original.shape == (wh[1], wh[0]) == (info["height"], info["width"]) and original.dtype == np.uint8
        assert (int(original.min()), int(original.max())) == (0, 255)  # min-maxed like the network input


def test_jpeg_probability_does_not_depend_on_gradcam(run_dir, images, tmp_path, capsys):
    """A JPEG's network input is the DCT-downscaled decode of load_xray with and without --gradcam."""
    gray = np.asarray(Image.open(images["nih1"]).convert("L"))
    jpg = tmp_path / "x.jpg"
    Image.fromarray(gray).save(jpg, quality=90)
    net, original, _ = data_prep.imaging.load_xray_and_original(jpg, S)
    np.testing.assert_array_equal(net, data_prep.imaging.load_xray(jpg, S)[0])
    assert original.shape == gray.shape
    probs = []
    for extra in ([], ["--gradcam", str(tmp_path / "cams")]):
        assert predict.main(["--model", str(run_dir), str(jpg), "--json", "--precision", "float32", *extra]) == 0
        probs.append(json.loads(capsys.readouterr().out)["results"][0]["probability"])
    assert probs[0] == probs[1]


# --------------------------------------------------------------------------- the run's own decisions (issues 30, 36)

def _run_copy(run_dir, tmp_path):
    import shutil

    d = tmp_path / "parent" / "run"
    shutil.copytree(run_dir, d)
    return d


def _digest(path):
    from data_prep.fsutil import sha256_file

    return sha256_file(path)


def test_threshold_is_the_runs_operating_point_else_05(run_dir, images, tmp_path, capsys):
    d = _run_copy(run_dir, tmp_path)
    rc = predict.main(["--model", str(d), images["nih1"], images["nih2"], "--json", "--precision", "float32"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["threshold"] == 0.5 and out["threshold_source"]["source"] == "default"
    assert "no operating_point.json" in out["threshold_note"]
    probs = [r["probability"] for r in out["results"]]
    t = float(np.mean(probs))  # between the two: one positive, one negative
    (d / "operating_point.json").write_text(json.dumps({"threshold": t, "rule": "youden", "source": "validation",
                                                        "models": {"model.keras": _digest(d / "model.keras")}}))
    rc = predict.main(["--model", str(d), images["nih1"], images["nih2"], "--precision", "float32"])
    text = capsys.readouterr().out
    assert rc == 0 and f"threshold {t:.9g}: the run's operating point (youden, chosen on the validation split" in text
    rc = predict.main(["--model", str(d), images["nih1"], images["nih2"], "--json", "--precision", "float32"])
    out = json.loads(capsys.readouterr().out)
    assert out["threshold"] == t and [r["prediction"] for r in out["results"]] == \
        ["Effusion" if p >= t else "No Finding" for p in probs] and len({r["prediction"] for r in out["results"]}) == 2
    # --threshold overrides it; another model file's operating point is not used
    rc = predict.main(["--model", str(d), images["nih1"], "--json", "--threshold", "0", "--precision", "float32"])
    assert json.loads(capsys.readouterr().out)["results"][0]["prediction"] == "Effusion"
    (d / "operating_point.json").write_text(json.dumps({"threshold": t, "rule": "youden", "source": "validation",
                                                        "models": {"model.keras": "0" * 64}}))
    predict.main(["--model", str(d), images["nih1"], "--json", "--precision", "float32"])
    out = json.loads(capsys.readouterr().out)
    assert out["threshold"] == 0.5 and "not this model file" in out["threshold_note"]


def test_calibration_only_from_the_run_folder_and_never_silently_missing(run_dir, images, tmp_path, capsys):
    d = _run_copy(run_dir, tmp_path)
    planted = {"temperature": 1.0, "shift": 12.0, "method": "none", "prior_correction": True,
               "models": {"model.keras": _digest(d / "model.keras")}}
    (d.parent / "calibration.json").write_text(json.dumps(planted))  # the run folder's parent: ignored
    assert predict.main(["--model", str(d / "model.keras"), images["nih1"], "--json", "--precision", "float32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["calibration"] is None and "raw_probability" not in out["results"][0]
    raw = out["results"][0]["probability"]
    # the run's own file: applied, and the whole transform printed
    (d / "calibration.json").write_text(json.dumps({**planted, "shift": -0.5, "temperature": 2.0}))
    assert predict.main(["--model", str(d), images["nih1"], "--precision", "float32"]) == 0
    text = capsys.readouterr().out
    assert "sigmoid(logit(p) / 2 + -0.5)" in text and "temperature 2" in text and "shift -0.5" in text
    # issue 34: the temperature around the training prior (center = logit of the training prevalence)
    c = float(np.log(0.25 / 0.75))
    (d / "calibration.json").write_text(json.dumps({**planted, "shift": -0.5, "temperature": 2.0, "center": c}))
    assert predict.main(["--model", str(d), images["nih1"], "--json", "--precision", "float32"]) == 0
    got = json.loads(capsys.readouterr().out)["results"][0]
    z = np.log(got["raw_probability"]) - np.log1p(-got["raw_probability"])
    assert got["probability"] == pytest.approx(1 / (1 + np.exp(-((z - c) / 2.0 + c - 0.5))), abs=1e-6)
    (d / "calibration.json").write_text(json.dumps({**planted, "center": "nan"}))
    bad = predict.find_calibration(d / "model.keras")
    assert bad["applied"] is False and bad["broken"] and "center" in bad["why"]
    # the run's report says calibrated, the file is gone: refused in one line, unless --raw
    (d / "metrics.json").write_text(json.dumps({"plain": {"calibrated": {"temperature": 2.0}}}))
    (d / "calibration.json").unlink()
    assert predict.main(["--model", str(d), images["nih1"]]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calibration.json is missing" in err[0] and "--raw" in err[0]
    assert predict.main(["--model", str(d), images["nih1"], "--raw", "--json", "--precision", "float32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"][0]["probability"] == raw and "--raw" in out["calibration"]["note"]


def test_folders_recursive_and_out_csv(run_dir, images, tmp_path, capsys):
    import csv
    import shutil

    top = tmp_path / "in"
    (top / "sub" / "deeper").mkdir(parents=True)
    shutil.copy(images["nih1"], top / "a.png")
    shutil.copy(images["rgba"], top / "sub" / "b.PNG")
    shutil.copy(images["x16"], top / "sub" / "deeper" / "c.png")
    shutil.copy(images["corrupt"], top / "sub" / "=bad.png")
    (top / "notes.txt").write_text("not an image")
    assert predict.main(["--model", str(run_dir), str(top), "--json"]) == 0  # the folder alone: a.png
    assert [r["file"] for r in json.loads(capsys.readouterr().out)["results"]] == [str(top / "a.png")]
    out_csv = tmp_path / "p.csv"
    assert predict.main(["--model", str(run_dir), str(top), "--recursive", "--out", str(out_csv)]) == 1
    capsys.readouterr()
    rows = list(csv.DictReader(out_csv.open()))
    files = {r["file"]: r for r in rows}
    assert len(rows) == 4 and set(files) == {str(top / "a.png"), str(top / "sub" / "b.PNG"),
                                             str(top / "sub" / "deeper" / "c.png"), str(top / "sub" / "=bad.png")}
    for f in ("a.png", "sub/b.PNG", "sub/deeper/c.png"):
        r = files[str(top / f)]
        assert 0 <= float(r["probability"]) <= 1 and r["prediction"] in ("Effusion", "No Finding") and not r["error"]
        assert float(r["threshold"]) == 0.5 and r["threshold_source"] == "default"
    bad = files[str(top / "sub" / "=bad.png")]
    assert bad["error"] and not bad["probability"]


def test_header_names_the_positive_class_when_every_file_failed(run_dir, images, capsys):
    assert predict.main(["--model", str(run_dir), images["corrupt"]]) == 1
    assert "P(Effusion)" in capsys.readouterr().out


def test_a_dicom_and_the_png_of_its_window_get_the_same_probability(run_dir, images, tmp_path, capsys):
    """Issue 31: predict reads a DICOM radiograph (here MONOCHROME1, 12 bits, windowed) by its content,
    from a folder too, and gives what it gives the 16-bit PNG written from the same display values."""
    dicom = pytest.importorskip("data_prep.dicom")
    gray = np.asarray(Image.open(images["nih1"]).convert("L")).astype(np.uint16)
    stored = 4095 - (gray * 16 + 8)
    d = tmp_path / "dcm"
    d.mkdir()
    dicom.write_dicom(d / "x.dcm", stored, photometric="MONOCHROME1", window=(2048.0, 4096.0))
    values, _ = dicom.read_dicom(d / "x.dcm")
    Image.fromarray(np.rint(values * 65535).astype(np.uint16)).save(tmp_path / "x.png")
    assert predict.main(["--model", str(run_dir), str(d), str(tmp_path / "x.png"), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["file"] for r in results] == [str(d / "x.dcm"), str(tmp_path / "x.png")]
    assert results[0]["probability"] == pytest.approx(results[1]["probability"], abs=1e-3)
