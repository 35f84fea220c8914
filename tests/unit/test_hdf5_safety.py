"""HDF5 files are data: external storage, virtual datasets, links and size claims are refused before any read.

The crafted files stand for a model file or a shard handed over by someone else: a ``.keras`` whose
``model.weights.h5`` keeps a variable's values in another local file (an SSH key, here a file of
marker bytes), a shard whose ``patient_id`` column does the same, and datasets that claim terabytes
in a file of a few KB.
"""
import io
import zipfile

import h5py
import numpy as np
import pytest

from data_prep import h5check
from data_prep.manifest import ManifestError, check_shard, open_shard_read

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- cxr-test-marker 0123456789abcdef"
S = 8


@pytest.fixture()
def secret(tmp_path):
    p = tmp_path / "id_ed25519"
    p.write_bytes(SECRET)
    return p


def _shard(path, n=4):
    """A shard as prep writes it (format 3: Fletcher-32 on images and numbers)."""
    with h5py.File(path, "w") as h:
        h.create_dataset("images", data=np.zeros((n, S, S), np.uint8), chunks=(1, S, S), fletcher32=True)
        for name, dt in (("label", np.int64), ("patient_id", np.int64), ("age", np.int16)):
            h.create_dataset(name, data=np.arange(n).astype(dt), fletcher32=True)
        h.create_dataset("targets", data=np.zeros((n, 2), np.uint8), fletcher32=True)
        for name in ("image_index", "view", "sex"):
            h.create_dataset(name, data=np.array(["x"] * n, dtype=object), dtype=h5py.string_dtype())


def _refused(path, capfd):
    with pytest.raises(ManifestError) as e:
        with open_shard_read(path) as h:
            check_shard(h, {"file": path.name, "count": 4}, {"image_size": S}, path)
    msg = str(e.value)
    out = capfd.readouterr()
    assert "\n" not in msg and str(path) in msg
    assert SECRET[:20].decode() not in msg + out.out + out.err
    return msg


def test_a_good_shard_passes_the_structure_check(tmp_path):
    _shard(tmp_path / "s.h5")
    with open_shard_read(tmp_path / "s.h5") as h:
        check_shard(h, {"file": "s.h5", "count": 4}, {"image_size": S}, tmp_path / "s.h5")
        assert sorted(h5check.walk(h, "s.h5")) == sorted(f"/{n}" for n in h)


def test_a_shard_column_in_external_storage_is_refused_unread(tmp_path, secret, capfd):
    path = tmp_path / "s.h5"
    _shard(path)
    with h5py.File(path, "a") as h:
        del h["patient_id"]  # the column's 4 int64 values = the first 32 bytes of the key file
        h.create_dataset("patient_id", shape=(4,), dtype=np.int64, external=[(str(secret), 0, 32)])
    with h5py.File(path, "r") as h:  # the attack works when nothing checks: the key's bytes come back
        assert h["patient_id"][...].tobytes() == SECRET[:32]
    msg = _refused(path, capfd)
    assert "dataset /patient_id" in msg and "external files" in msg


@pytest.mark.parametrize("kind", ["soft link", "external link", "virtual"])
def test_links_and_virtual_datasets_are_refused(tmp_path, kind, capfd):
    path = tmp_path / "s.h5"
    _shard(path)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as o:
        o.create_dataset("x", data=np.arange(4, dtype=np.int64))
    with h5py.File(path, "a") as h:
        del h["age"]
        if kind == "soft link":
            h["age"] = h5py.SoftLink("/label")
        elif kind == "external link":
            h["age"] = h5py.ExternalLink(str(other), "/x")
        else:
            layout = h5py.VirtualLayout(shape=(4,), dtype=np.int64)
            layout[:] = h5py.VirtualSource(str(other), "x", shape=(4,))
            h.create_virtual_dataset("age", layout)
    msg = _refused(path, capfd)
    assert "/age" in msg and {"soft link": "soft link", "external link": "external link",
                              "virtual": "virtual dataset"}[kind] in msg


def test_a_shard_claiming_2_to_the_36_images_is_refused_before_allocating(tmp_path, capfd):
    path = tmp_path / "s.h5"
    n = 2 ** 36
    with h5py.File(path, "w") as h:  # chunks never written: the file stays a few KB
        h.create_dataset("images", shape=(n, S, S), dtype=np.uint8, chunks=(1, S, S), fletcher32=True)
        for name, dt in (("label", np.int64), ("patient_id", np.int64), ("age", np.int16)):
            h.create_dataset(name, shape=(n,), dtype=dt, chunks=(1024,), fletcher32=True)
    assert path.stat().st_size < 20_000
    with pytest.raises(ManifestError) as e:
        with open_shard_read(path) as h:
            check_shard(h, {"file": "s.h5", "count": n}, {"image_size": S}, path)
    assert "claims" in str(e.value) and "bytes" in str(e.value) and "\n" not in str(e.value)


def test_unexpected_columns_and_shapes_are_refused(tmp_path):
    path = tmp_path / "s.h5"
    _shard(path)
    with h5py.File(path, "a") as h:
        del h["age"]
        h.create_dataset("age", data=np.zeros((4, 3), np.int16))
        h.create_dataset("extra", data=np.zeros(4))
    with open_shard_read(path) as h, pytest.raises(ManifestError, match="age is int16 \\(4, 3\\)|extra"):
        check_shard(h, {"file": "s.h5", "count": 4}, {"image_size": S}, path)


# --------------------------------------------------------------------------- model files

tf = None


def _tiny():
    global tf
    tf = pytest.importorskip("tensorflow")
    from data_prep.config import load_config
    from distributed import model as M

    cfg = load_config(None, ["model.backbone=tiny", "model.weights=none", "model.dense_units=8"]).model
    return M, M.build_model(cfg, 32, 2)


def _rewrite_weights(src, dst, edit):
    """``src`` (.keras) copied to ``dst`` with its model.weights.h5 changed by ``edit(h5py.File)``."""
    with zipfile.ZipFile(src) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    buf = io.BytesIO(members["model.weights.h5"])
    with h5py.File(buf, "a") as h:
        edit(h)
    members["model.weights.h5"] = buf.getvalue()
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def _bias_path(h):
    """The output layer's bias: the one variable of shape (2,)."""
    found = []
    h.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) and obj.shape == (2,) else None)
    assert len(found) == 1, found
    return found[0]


def test_a_keras_weight_in_external_storage_is_refused_and_no_byte_of_the_file_is_read(tmp_path, secret, capfd):
    M, m = _tiny()
    m.save(tmp_path / "m.keras")

    def plant(h):
        p = _bias_path(h)
        del h[p]
        h.create_dataset(p, shape=(2,), dtype=np.float32, external=[(str(secret), 0, 8)])

    _rewrite_weights(tmp_path / "m.keras", tmp_path / "evil.keras", plant)
    from distributed.safeload import UntrustedModel

    with pytest.raises(UntrustedModel) as e:
        M.load_model(tmp_path / "evil.keras")
    msg, out = str(e.value), capfd.readouterr()
    assert "\n" not in msg and "evil.keras" in msg and "vars/1" in msg and "external files" in msg
    assert SECRET[:8].decode() not in msg + out.out + out.err
    M.load_model(tmp_path / "m.keras")  # the untouched file still loads


@pytest.mark.parametrize("where", ["variable", "extra"])
def test_a_weights_dataset_claiming_4_tib_is_one_line(tmp_path, where):
    M, m = _tiny()
    m.save(tmp_path / "m.keras")

    def claim(h):
        p = _bias_path(h) if where == "variable" else "optimizer/vars/7"
        if p in h:
            del h[p]
        h.create_dataset(p, shape=(2 ** 40,), dtype=np.float32, chunks=(1024,))  # 4 TiB, nothing written

    _rewrite_weights(tmp_path / "m.keras", tmp_path / "big.keras", claim)
    from distributed.safeload import UntrustedModel

    with pytest.raises(UntrustedModel) as e:
        M.load_model(tmp_path / "big.keras")
    msg = str(e.value)
    assert "\n" not in msg and ("1099511627776" in msg or "claims 4398046511104 bytes" in msg), msg


def test_a_deeply_nested_config_json_is_one_line(tmp_path):
    from distributed.safeload import UntrustedModel, read_keras_config

    for depth in (200, 200_000):  # within Python's recursion limit, and far beyond it
        p = tmp_path / f"deep{depth}.keras"
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("config.json", '{"config": {"layers": ' + "[" * depth + "]" * depth + "}}")
        with pytest.raises(UntrustedModel, match="nests") as e:
            read_keras_config(p)
        assert "\n" not in str(e.value)


def test_a_model_weights_h5_file_with_external_storage_is_refused(tmp_path, secret):
    """``model.weights: path.h5`` (a weights file from someone else, Keras' legacy format)."""
    M, m = _tiny()
    m.save_weights(tmp_path / "w.h5")
    with h5py.File(tmp_path / "w.h5", "a") as h:
        p = _bias_path(h)
        del h[p]
        h.create_dataset(p, shape=(2,), dtype=np.float32, external=[(str(secret), 0, 8)])
    from data_prep.config import load_config

    cfg = load_config(None, ["model.backbone=tiny", f"model.weights={tmp_path / 'w.h5'}", "model.dense_units=8"]).model
    with pytest.raises(M.WeightsUnavailable) as e:
        M.build_model(cfg, 32, 2)
    assert "external files" in str(e.value) and "w.h5" in str(e.value) and "\n" not in str(e.value)
