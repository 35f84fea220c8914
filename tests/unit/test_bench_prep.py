"""The prep benchmark's two reference loaders (benchmarks/prep.py), against Pillow and load_xray."""
import numpy as np
from PIL import Image

from benchmarks.prep import article_load, decode_only
from data_prep.imaging import load_xray


def test_decode_only_matches_pil(fixtures):
    a = decode_only(fixtures / "00027426_000.png")
    assert a.shape == (512, 512) and a.dtype == np.uint8
    with Image.open(fixtures / "00027426_000.png") as im:
        assert np.array_equal(a, np.asarray(im))


def test_article_load_is_min_max_scaled_and_close_to_load_xray(fixtures):
    path = fixtures / "00027426_000.png"
    a = article_load(path, 64)
    assert a.shape == (64, 64) and a.dtype == np.uint8
    assert a.min() == 0 and a.max() >= 254  # min-max to the full range (255 may round down)
    ours, _ = load_xray(path, 64)
    # two anti-aliased resizes of the same image: the same picture, under a grey level apart on average
    assert np.abs(a.astype(int) - ours.astype(int)).mean() < 3  # 0.8 measured; a flipped image: 83


def test_article_load_turns_colour_into_gray(tmp_path):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = np.arange(40, dtype=np.uint8)[None, :] * 6
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c.png")
    a = article_load(tmp_path / "c.png", 20)
    assert a.shape == (20, 20) and a[:, 0].max() < a[:, -1].min()  # the red ramp survives as a grey ramp
