import io

import numpy as np
import pytest
from PIL import Image

from data_prep.imaging import ImageError, load_xray


def _gradient(n=256):
    y, x = np.mgrid[0:n, 0:n]
    return ((x + y) * 255.0 / (2 * (n - 1))).astype(np.float64)


def _save(img: Image.Image, path, fmt="PNG"):
    img.save(path, format=fmt)
    return path


def test_real_fixture_8bit(fixtures):
    arr, info = load_xray(fixtures / "00000001_000.png", 64)
    assert arr.shape == (64, 64) and arr.dtype == np.uint8 and arr.flags.writeable
    assert arr.min() == 0 and arr.max() == 255  # per-image min-max
    assert info["mode"] == "L" and info["width"] == 512 and info["converted_from"] is None
    # also from bytes (what predict may pass)
    arr2, _ = load_xray((fixtures / "00000001_000.png").read_bytes(), 64)
    assert np.array_equal(arr, arr2)


def test_8bit_minmax_stretches_range(tmp_path):
    a = (40 + _gradient() * 0.3).astype(np.uint8)  # 40..116
    p = _save(Image.fromarray(a, "L"), tmp_path / "g.png")
    out, info = load_xray(p, 128)
    assert out.min() == 0 and out.max() == 255
    assert info["bits"] == 8


def test_16bit_scaled_by_its_real_range_not_clipped(tmp_path):
    g = _gradient()
    a16 = (1000 + g * 16).astype(np.uint16)  # 1000..5080: clipping to 8 bit would give all 255
    p = _save(Image.fromarray(a16), tmp_path / "g16.png")
    with Image.open(p) as im:
        assert im.mode.startswith("I")
    out, info = load_xray(p, 64)
    assert info["bits"] == 16
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) > 100
    ref, _ = load_xray(_save(Image.fromarray(g.astype(np.uint8), "L"), tmp_path / "g8.png"), 64)
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 3


def test_rgb_and_rgba_become_gray_and_are_recorded(tmp_path):
    g = _gradient().astype(np.uint8)
    ref, _ = load_xray(_save(Image.fromarray(g, "L"), tmp_path / "l.png"), 64)
    rgb = np.stack([g, g, g], -1)
    out, info = load_xray(_save(Image.fromarray(rgb, "RGB"), tmp_path / "rgb.png"), 64)
    assert info["converted_from"] == "RGB" and out.shape == (64, 64)
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
    rgba = np.concatenate([rgb, np.full(g.shape + (1,), 255, np.uint8)], -1)
    out, info = load_xray(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"), 64)
    assert info["converted_from"] == "RGBA"
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1


def test_jpeg(tmp_path):
    g = _gradient(512).astype(np.uint8)
    out, info = load_xray(_save(Image.fromarray(g, "L"), tmp_path / "x.jpg", "JPEG"), 64)
    assert info["format"] == "JPEG" and out.shape == (64, 64) and out.max() == 255


def test_resize_is_anti_aliased(tmp_path):
    # left: 1-pixel checkerboard (pure aliasing bait), right: mid-grey; corners give the range
    a = np.full((512, 512), 128, np.uint8)
    yy, xx = np.mgrid[0:512, 0:256]
    a[:, :256] = np.where((xx + yy) % 2 == 0, 96, 160)
    a[:32, -32:] = 0
    a[-32:, -32:] = 255
    out, _ = load_xray(_save(Image.fromarray(a, "L"), tmp_path / "c.png"), 64)
    left = out[8:56, 4:28].astype(float)
    assert left.std() < 2.0  # averaged away; point sampling would give ~64
    assert abs(left.mean() - 128) < 4


@pytest.mark.parametrize("content,reason", [
    (b"", "zero-byte"),
    (b"this is not an image at all, just text\n" * 4, "not an image"),
])
def test_bad_content(tmp_path, content, reason):
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(ImageError) as e:
        load_xray(p, 64)
    assert reason in e.value.reason


def test_truncated_png(tmp_path, fixtures):
    data = (fixtures / "00000001_000.png").read_bytes()
    p = tmp_path / "trunc.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as e:
        load_xray(p, 64)
    assert "truncated" in e.value.reason


def test_missing_file(tmp_path):
    with pytest.raises(ImageError) as e:
        load_xray(tmp_path / "nope.png", 64)
    assert e.value.reason == "file not found"


def test_constant_image_is_zeros(tmp_path):
    p = _save(Image.fromarray(np.full((100, 100), 77, np.uint8), "L"), tmp_path / "c.png")
    out, _ = load_xray(p, 32)
    assert out.shape == (32, 32) and not out.any()


def test_same_size_no_resize(tmp_path):
    g = _gradient(64).astype(np.uint8)
    out, _ = load_xray(io.BytesIO(_png_bytes(g)), 64)
    assert np.abs(out.astype(int) - g.astype(int)).max() <= 1


def _png_bytes(a):
    buf = io.BytesIO()
    Image.fromarray(a, "L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["P", "LA", "I", "1", "F"])
def test_other_modes(tmp_path, mode):
    g = _gradient().astype(np.uint8)
    img = Image.fromarray(g, "L").convert(mode)
    p = tmp_path / f"x.{'tif' if mode == 'F' else 'png'}"
    img.save(p)
    if mode == "F":  # float images come only in formats other than PNG/JPEG (TIFF), which are not decoded
        with pytest.raises(ImageError, match="not PNG or JPEG"):
            load_xray(p, 64)
        return
    out, info = load_xray(p, 64)
    assert out.shape == (64, 64) and out.dtype == np.uint8 and out.max() == 255 and out.min() == 0
    if mode in ("P", "LA", "1"):
        assert info["converted_from"] == mode
    else:
        assert info["converted_from"] is None and info["bits"] == (16 if mode == "I" else 32)  # PNG stores I as 16 bit
