"""DICOM radiographs in the one image function: modality and VOI LUTs, MONOCHROME1, compressed pixels,
non-image objects, limits, and no patient identifier in what is recorded. Files are written here with
pydicom (a DX object as hospitals export it: 12 bits stored, rescale, a window)."""
import io

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from data_prep import dicom  # noqa: E402
from data_prep.imaging import ImageError, load_xray  # noqa: E402

RNG = np.random.default_rng(0)


def ramp(h=40, w=48, hi=4095):
    return (np.linspace(0, hi, h * w).reshape(h, w)).astype(np.uint16)


def test_monochrome1_is_inverted(tmp_path):
    px = ramp()
    dicom.write_dicom(tmp_path / "m1.dcm", px, photometric="MONOCHROME1")
    dicom.write_dicom(tmp_path / "m2.dcm", px, photometric="MONOCHROME2")
    v1, i1 = dicom.read_dicom(tmp_path / "m1.dcm")
    v2, i2 = dicom.read_dicom(tmp_path / "m2.dcm")
    assert i1["inverted"] and not i2["inverted"]
    np.testing.assert_array_equal(v1, px.max() + px.min() - px.astype(np.float32))
    np.testing.assert_array_equal(v2, px.astype(np.float32))
    a1, _ = load_xray(tmp_path / "m1.dcm", 24)
    a2, _ = load_xray(tmp_path / "m2.dcm", 24)
    assert a1[0, 0] == 255 and a2[0, 0] == 0  # dark in MONOCHROME2 is bright in MONOCHROME1
    assert np.abs(a1.astype(int) + a2.astype(int) - 255).max() <= 1


def test_rescale_and_window_against_a_hand_computation(tmp_path):
    px = ramp()
    slope, intercept, center, width = 0.5, -100.0, 700.0, 801.0
    dicom.write_dicom(tmp_path / "w.dcm", px, slope=slope, intercept=intercept, window=(center, width))
    values, info = dicom.read_dicom(tmp_path / "w.dcm")
    hu = px.astype(np.float64) * slope + intercept
    # DICOM PS3.3 C.11.2.1.2.1, onto 0..1
    lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    want = np.where(hu <= lo, 0.0, np.where(hu > hi, 1.0, (hu - (center - 0.5)) / (width - 1) + 0.5))
    np.testing.assert_allclose(values, want, atol=1e-6)
    assert info["rescale"] == {"slope": 0.5, "intercept": -100.0}
    assert info["window"] == {"center": 700.0, "width": 801.0}
    assert info["pixel_spacing_mm"] == pytest.approx([0.143, 0.143])
    kinds = [c["kind"] for c in dicom.conversions(info)]
    assert kinds == ["format", "modality LUT", "VOI", "bit depth"]


def test_rle_compressed_pixels_are_decoded(tmp_path):
    px = (RNG.integers(0, 4096, (32, 32))).astype(np.uint16)
    dicom.write_dicom(tmp_path / "rle.dcm", px, compress="rle")
    values, info = dicom.read_dicom(tmp_path / "rle.dcm")
    assert info["transfer_syntax"] == "RLE Lossless"
    np.testing.assert_array_equal(values, px.astype(np.float32))


def test_a_transfer_syntax_nothing_decodes_is_one_line(tmp_path):
    px = ramp()
    p = tmp_path / "mpeg.dcm"
    dicom.write_dicom(p, px)
    ds = pydicom.dcmread(p)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: not a radiograph codec
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x01" * 100])
    ds.save_as(p, enforce_file_format=False)
    with pytest.raises(ImageError, match=r"DICOM pixels not decoded \(MPEG2"):
        load_xray(p, 24)


def test_non_image_objects_and_limits_are_refused_from_the_header(tmp_path):
    px = ramp()
    p = tmp_path / "sr.dcm"
    dicom.write_dicom(p, px)
    ds = pydicom.dcmread(p)
    for tag in ("PixelData", "Rows", "Columns"):
        del ds[tag]
    ds.Modality = "SR"
    ds.save_as(p, enforce_file_format=True)
    with pytest.raises(ImageError, match=r"DICOM without an image \(SR"):
        load_xray(p, 24)
    dicom.write_dicom(tmp_path / "big.dcm", px)
    with pytest.raises(ImageError, match="over the limit of 1000"):
        load_xray(tmp_path / "big.dcm", 24, max_pixels=1000)
    rgb = tmp_path / "rgb.dcm"
    dicom.write_dicom(rgb, px)
    ds = pydicom.dcmread(rgb)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.save_as(rgb, enforce_file_format=True)
    with pytest.raises(ImageError, match="only MONOCHROME1/2"):
        load_xray(rgb, 24)


def test_no_patient_identifier_is_recorded(tmp_path):
    dicom.write_dicom(tmp_path / "p.dcm", ramp(), patient_id="MRN-0042-SECRET")
    _, info = load_xray(tmp_path / "p.dcm", 24)
    assert "MRN-0042" not in repr(info) and "SECRET" not in repr(info)
    assert info["format"] == "DICOM" and info["dicom"]["mode"] == "MONOCHROME2"


def test_a_dicom_and_the_png_of_its_window_give_the_same_image(tmp_path):
    """What predict sees: the DICOM, and a 16-bit PNG written from the same windowed values."""
    from PIL import Image

    px = ramp(64, 64)
    dicom.write_dicom(tmp_path / "x.dcm", px, window=(2000.0, 3000.0))
    values, _ = dicom.read_dicom(tmp_path / "x.dcm")
    png = tmp_path / "x.png"
    Image.fromarray(np.rint(values * 65535).astype(np.uint16)).save(png)
    a, _ = load_xray(tmp_path / "x.dcm", 32)
    b, _ = load_xray(png, 32)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_bytes_and_file_objects_are_read_too(tmp_path):
    dicom.write_dicom(tmp_path / "b.dcm", ramp())
    raw = (tmp_path / "b.dcm").read_bytes()
    a, _ = load_xray(raw, 16)
    b, _ = load_xray(io.BytesIO(raw), 16)
    c, _ = load_xray(tmp_path / "b.dcm", 16)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)


def test_prep_reads_the_generators_dicom_set_as_its_png_set(tmp_path):
    """``data_prep.synthetic --format dicom`` (12-bit, windowed, MONOCHROME1 on odd follow-ups, some RLE)
    through prep gives the images prep makes of the PNG set of the same seed, and records each decoding."""
    import json
    import subprocess
    import sys

    import h5py

    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    out = {}
    for fmt in ("nih", "dicom"):
        d = tmp_path / fmt
        subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--out", str(d / "data"), "--patients", "12",
                        "--image-size", "64", "--seed", "3", "--format", fmt, "--no-progress"], check=True, cwd=root,
                       capture_output=True)
        cfg = d / "cfg.yaml"
        cfg.write_text(f"data: {{csv: {d}/data/Data_Entry_2017.csv, images: {d}/data, image_size: 32}}\n"
                       f"prep: {{out: {d}/prepared}}\nmodel: {{backbone: tiny, weights: none}}\n"
                       f"run: {{dir: {d}/run}}\n")
        subprocess.run([sys.executable, "-m", "data_prep", "--config", str(cfg)], check=True, cwd=root,
                       capture_output=True)
        man = json.loads((d / "prepared" / "manifest.json").read_text())
        images = {}
        for split in ("train", "val", "test"):
            for shard in sorted((d / "prepared" / split).glob("*.h5")):
                with h5py.File(shard, "r") as h:
                    names = [n.decode() if isinstance(n, bytes) else str(n) for n in h["image_index"][()]]
                    for n, img in zip(names, h["images"][()]):
                        images[n.rsplit(".", 1)[0]] = img.astype(int)
        out[fmt] = (man, images)
    (_man_png, png), (man_dcm, dcm) = out["nih"], out["dicom"]
    assert sorted(png) == sorted(dcm) and len(png) > 20
    # the same pictures: the PNG path resizes 8-bit values, the DICOM path its windowed floats (rounding)
    assert max(np.abs(png[k] - dcm[k]).max() for k in png) <= 2
    assert np.mean([np.abs(png[k] - dcm[k]).mean() for k in png]) < 0.5
    kinds = {c["kind"] for c in man_dcm["converted"]}
    assert {"format", "VOI", "photometric", "bit depth"} <= kinds and not man_dcm["skipped"]
    assert not any("0000000" in json.dumps(c.get("from", "")) for c in man_dcm["converted"])  # no patient ids
