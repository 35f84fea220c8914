"""Low-level input limits: NaN and infinities in float keys, YAML aliases, 16-bit colour PNGs, a symlinked lock.

The inputs stand for files handed over by others: a config with ``.nan`` learning rates, a few hundred
bytes of nested YAML aliases (a "billion laughs"), a 48-bit RGB PNG whose grey levels differ only in
their low bytes, and a ``.cxr-lock`` that another user replaced by a symlink.
"""
import struct
import zlib

import numpy as np
import pytest

from data_prep import locks
from data_prep.config import ConfigError, load_config, reference_rows
from data_prep.imaging import load_xray

FLOAT_KEYS = [key for key, tp, *_ in reference_rows() if tp == "float"]


def test_there_are_float_keys_to_check():
    assert {"train.finetune.lr", "prep.val_fraction", "eval.threshold", "train.stop_check_s"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", ["train.finetune.lr", "train.warmup.lr", "prep.val_fraction", "prep.test_fraction",
                                 "model.dropout", "eval.threshold", "train.stop_check_s", "train.augment.rotation",
                                 "runtime.horovod_cycle_ms", "train.checkpoint_every_s"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan"])
def test_nan_and_infinities_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={value}"])
    assert str(e.value).startswith(f"{key}: ") and "\n" not in str(e.value)


def test_every_float_key_refuses_nan_in_a_file(tmp_path):
    for key in FLOAT_KEYS:
        section, *rest = key.split(".")
        tree = ".nan"
        for part in reversed(rest):
            tree = f"{{{part}: {tree}}}"
        (tmp_path / "c.yaml").write_text(f"{section}: {tree}\n")
        with pytest.raises(ConfigError, match=f"^{key}: nan is not a finite number"):
            load_config(tmp_path / "c.yaml")


def test_nested_yaml_aliases_are_refused_in_one_short_line(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    lines.append("train: {batch_size: *i}")
    (tmp_path / "laughs.yaml").write_text("\n".join(lines) + "\n")
    assert (tmp_path / "laughs.yaml").stat().st_size < 400
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "laughs.yaml")
    msg = str(e.value)
    assert "aliases" in msg and "line 2" in msg and len(msg) < 300
    with pytest.raises(ConfigError, match="aliases"):
        load_config(None, ["run.name=*a"])  # a --set value is YAML too; an alias there is refused as well


def _png16_rgb(a: np.ndarray) -> bytes:
    """A 48-bit RGB PNG (16 bits per channel, big-endian, filter 0) of ``a`` (h, w, 3) uint16."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_a_16_bit_rgb_png_is_scaled_not_cut_and_recorded(tmp_path):
    levels = 1000 + 5 * np.arange(200, dtype=np.uint16)  # 200 grey levels; their high bytes take only 5 values
    assert len(np.unique(levels >> 8)) == 5
    a = np.repeat(np.tile(levels, (200, 1))[:, :, None], 3, axis=2)
    (tmp_path / "rgb16.png").write_bytes(_png16_rgb(a))
    out, info = load_xray(tmp_path / "rgb16.png", 200)
    assert len(np.unique(out)) >= 190  # cut to 8 bits it would be 5 levels
    assert out[0, 0] == 0 and out[0, -1] == 255 and np.all(np.diff(out[0].astype(int)) >= 0)
    assert info["bits"] == 16 and info["converted_from"] == "RGB"
    kinds = {c["kind"]: c for c in info["conversions"]}
    assert "16-bit" in kinds["bit depth"]["from"] and kinds["mode"]["from"] == "RGB"
    # the same bytes from memory and from a file object
    data = (tmp_path / "rgb16.png").read_bytes()
    np.testing.assert_array_equal(load_xray(data, 200)[0], out)
    with open(tmp_path / "rgb16.png", "rb") as f:
        np.testing.assert_array_equal(load_xray(f, 200)[0], out)


def test_a_symlinked_lock_is_one_line_and_its_target_untouched(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    target = tmp_path / "victim"
    target.write_text("keep\n")
    (run / locks.LOCK_NAME).symlink_to(target)
    with pytest.raises(locks.FolderBusy) as e:
        locks.acquire(run, "training")
    assert "is a symlink" in str(e.value) and "\n" not in str(e.value)
    assert target.read_text() == "keep\n"
