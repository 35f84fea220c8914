"""The exported bundle's parts that need no trained run: the in-graph preprocessing (distributed.tfprep)
against data_prep.imaging.load_xray, model.json's checks (distributed.bundle), and the commands' one-line
refusals. The export of a real run: tests/e2e/test_export_run.py."""
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import imaging
from data_prep.imaging import load_xray
from distributed.bundle import FORMAT, BundleError, read_bundle

ROOT = Path(__file__).resolve().parents[2]
SHARED_NIH = ROOT.parent / "shared" / "data" / "nih" / "samples"


def _png(a, mode=None) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a, mode).save(b, format="PNG")
    return b.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, format="JPEG", quality=90)
    return b.getvalue()


def _cases(fixtures):
    """(name, encoded file, what a decoder gives the graph): real NIH PNGs, 16-bit PNGs, non-square JPEGs
    (gray and RGB; decoded by TensorFlow at Pillow's draft scale), odd sizes."""
    import tensorflow as tf

    from distributed.tfprep import jpeg_draft_ratio

    nih = sorted(fixtures.glob("*.png")) + (sorted(SHARED_NIH.glob("*.png")) if SHARED_NIH.is_dir() else [])
    out = []
    for f in nih:
        raw = f.read_bytes()
        out.append((f.name, raw, np.asarray(Image.open(io.BytesIO(raw)))))
    a = np.asarray(Image.open(nih[0]))
    rng = np.random.default_rng(0)
    for h, w in ((1000, 770), (97, 130), (300, 1001), (33, 64)):
        g = np.asarray(Image.fromarray(a).resize((w, h))).astype(np.uint16) * 257
        a16 = np.clip(g + rng.integers(0, 200, (h, w)) + 3000, 0, 65535).astype(np.uint16)
        out.append((f"16-bit {w}x{h}", _png(a16, "I;16"), a16))
        a8 = np.asarray(Image.fromarray(a).resize((w, h)))
        out.append((f"8-bit {w}x{h}", _png(a8), a8))
    for w, h, rgb in ((900, 700, False), (800, 1024, True), (70, 50, False)):
        g = Image.fromarray(a).resize((w, h))
        img = Image.merge("RGB", (g, g.transpose(Image.FLIP_TOP_BOTTOM), g.point(lambda v: v // 2))) if rgb else g
        raw = _jpeg(img)
        out.append((f"JPEG {'RGB' if rgb else 'gray'} {w}x{h}", raw, lambda S, raw=raw, w=w, h=h: tf.io.decode_jpeg(
            raw, channels=1, ratio=jpeg_draft_ratio(w, h, S), dct_method="INTEGER_ACCURATE").numpy()[..., 0]))
    return out


def test_constants_are_prep_s():
    pytest.importorskip("tensorflow")
    from distributed import tfprep

    assert tfprep.REDUCING_GAP == imaging.REDUCING_GAP and imaging.RESAMPLE == Image.BILINEAR


@pytest.mark.parametrize("size", [32, 224])
def test_graph_preprocessing_equals_load_xray(fixtures, size):
    """Bit for bit: every pixel of every case equal to prep's (the measured difference is 0 pixels)."""
    pytest.importorskip("tensorflow")
    from distributed.tfprep import preprocess

    for name, raw, decoded in _cases(fixtures):
        arr = decoded(size) if callable(decoded) else decoded
        ref, info = load_xray(raw, size)
        got = preprocess(arr, size).numpy()
        assert got.shape == (1, size, size) and got.dtype == np.uint8
        diff = got[0].astype(int) - ref
        assert np.count_nonzero(diff) == 0, (name, size, np.count_nonzero(diff), np.abs(diff).max())


def test_batch_is_per_image(fixtures):
    """A batch of same-size images: each min-maxed on its own, each equal to its single-image result."""
    pytest.importorskip("tensorflow")
    from distributed.tfprep import preprocess

    a = np.asarray(Image.open(fixtures / "00000001_000.png"))
    batch = np.stack([a, a // 3 + 20, np.full_like(a, 7)])
    got = preprocess(batch, 32).numpy()
    for k in range(3):
        assert np.array_equal(got[k], load_xray(_png(batch[k]), 32)[0])
    assert not got[2].any()  # a constant image becomes all zeros, as in prep


def test_jpeg_draft_ratio_is_pillow_s():
    pytest.importorskip("tensorflow")
    from distributed.tfprep import jpeg_draft_ratio

    for w, h, S in ((900, 700, 32), (800, 1024, 224), (70, 50, 32), (20, 20, 32), (2048, 2500, 384)):
        img = Image.open(io.BytesIO(_jpeg(Image.new("L", (w, h), 90))))
        img.draft("L", (S, S))
        r = jpeg_draft_ratio(w, h, S)
        assert img.size == ((w + r - 1) // r, (h + r - 1) // r), (w, h, S)


# --------------------------------------------------------------------------- model.json checks

def _bundle(tmp_path, **changes) -> Path:
    from data_prep.fsutil import sha256_file

    (tmp_path / "model.keras").write_bytes(b"not really a model")
    doc = {"format": FORMAT, "format_version": 1, "task": "binary", "classes": ["No Finding", "Infiltration"],
           "positive_class": "Infiltration", "input": {"image_size": 32},
           "decision": {"threshold": 0.25, "applied_to": "raw_probability", "rule": "youden",
                        "chosen_on": "validation"},
           "calibration": {"applied": True, "temperature": 1.5, "shift": 0.1, "center": 0.0},
           "files": {"model.keras": sha256_file(tmp_path / "model.keras")}}
    for k, v in changes.items():
        keys = k.split("__")
        d = doc
        for part in keys[:-1]:
            d = d[part]
        d[keys[-1]] = v
    (tmp_path / "model.json").write_text(json.dumps(doc))
    return tmp_path


def test_a_valid_model_json_reads(tmp_path):
    b = read_bundle(_bundle(tmp_path))
    assert b.classes == ("No Finding", "Infiltration") and b.threshold == 0.25 and b.threshold_on == "raw_probability"
    assert b.calibration["temperature"] == 1.5 and b.image_size == 32


@pytest.mark.parametrize("change, says", [
    ({"format": "onnx-bundle"}, "format"),
    ({"format_version": 2}, "version 2"),
    ({"task": "multilabel"}, "task"),
    ({"classes": ["a"]}, "classes"),
    ({"positive_class": "No Finding"}, "positive_class"),
    ({"input__image_size": True}, "image_size"),
    ({"input__image_size": 10 ** 6}, "image_size"),
    ({"decision__threshold": 1.5}, "threshold"),
    ({"decision__threshold": "0.3"}, "threshold"),
    ({"decision__threshold": float("nan")}, "threshold"),
    ({"decision__applied_to": "logit"}, "applied_to"),
    ({"calibration__temperature": 0.0}, "temperature"),
    ({"calibration__shift": float("inf")}, "shift"),
    ({"files__model.keras": "0" * 64}, "sha256 differs"),
    ({"files": {}}, "no sha256"),
])
def test_a_bad_model_json_is_one_line(tmp_path, change, says):
    with pytest.raises(BundleError) as e:
        read_bundle(_bundle(tmp_path, **change))
    assert says in str(e.value) and "\n" not in str(e.value)


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_predict_refuses_a_bad_bundle_in_one_line(tmp_path, fixtures):
    _bundle(tmp_path, format="something-else")
    r = _run("-m", "distributed.predict", "--model", str(tmp_path), str(fixtures / "00000001_000.png"))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("cxr-predict: error: ") and r.stderr.count("\n") == 1 and "format" in r.stderr


def test_export_refuses_unknown_formats_and_missing_runs_in_one_line(tmp_path):
    r = _run("-m", "distributed.export", "--run", str(tmp_path), "--format", "savedmodel,tflite")
    assert r.returncode == 2 and r.stderr == "cxr-export: error: --format tflite: expected one of savedmodel, onnx\n"
    r = _run("-m", "distributed.export", "--run", str(tmp_path / "nothing"))
    assert r.returncode == 1 and r.stderr.startswith("cxr-export: error: ") and r.stderr.count("\n") == 1
    # --config names the run by its run.dir, as for every command; --run wins
    (tmp_path / "c.yaml").write_text(f"run: {{dir: {tmp_path / 'elsewhere'}}}\n")
    r = _run("-m", "distributed.export", "--config", str(tmp_path / "c.yaml"), "--set", "run.name=x")
    assert r.returncode == 1 and f"{tmp_path / 'elsewhere'}: not a run folder" in r.stderr
    r = _run("-m", "distributed.export", "--set", "run.dir=x")
    assert r.returncode == 2 and "--set needs --config" in r.stderr
