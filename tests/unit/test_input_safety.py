"""Inputs from others: only PNG/JPEG decoded, a pixel limit before decoding, symlink loops and links out
of the image root."""
import os

import numpy as np
import pytest
from PIL import Image

from data_prep import metadata as md
from data_prep.fsutil import walk_tree
from data_prep.imaging import ImageError, load_xray


def _png(path, size=64):
    Image.fromarray(np.arange(size * size, dtype=np.uint8).reshape(size, size)).save(path)


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    _png(tmp_path / "big.png", 64)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1))
    with pytest.raises(ImageError, match="64x64 = 4096 pixels, more than prep.max_pixels=4000; not decoded"):
        load_xray(tmp_path / "big.png", 32, max_pixels=4000)
    assert decoded == []


def test_only_png_and_jpeg_are_decoded(tmp_path):
    _png(tmp_path / "ok.png")
    Image.open(tmp_path / "ok.png").save(tmp_path / "ok.jpg", format="JPEG")
    assert load_xray(tmp_path / "ok.png", 32)[0].shape == load_xray(tmp_path / "ok.jpg", 32)[0].shape == (32, 32)
    for fmt in ("BMP", "TIFF", "GIF", "EPS"):
        p = tmp_path / f"x.{fmt.lower()}"
        try:
            Image.open(tmp_path / "ok.png").save(p, format=fmt)
        except (OSError, KeyError):  # EPS needs Ghostscript to write: a header is enough
            p.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
        with pytest.raises(ImageError, match="not PNG or JPEG"):
            load_xray(p, 32)


def test_symlink_loops_end_and_links_out_of_the_root_are_not_followed(tmp_path):
    root, outside = tmp_path / "images", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    _png(root / "sub" / "a.png")
    _png(outside / "b.png")
    _png(outside / "c.png")
    os.symlink(root, root / "sub" / "loop")  # a loop back to the root
    os.symlink(outside, root / "out")  # a folder outside
    os.symlink(outside / "c.png", root / "c.png")  # a file outside
    os.symlink(root / "sub" / "a.png", root / "same.png")  # inside: fine
    refused = []
    found = md.find_images(root, refused=refused)
    assert found == {"a.png": str(root / "sub" / "a.png"), "same.png": str(root / "same.png")}
    reasons = {r["image"]: r["reason"] for r in refused}
    assert reasons["out"].startswith("symlink leading outside") and reasons["c.png"].startswith("symlink leading")
    assert "symlink loop" in reasons[os.path.join("sub", "loop")]
    assert [d for d, _ in walk_tree(root)] == [str(root), str(root / "sub")]
