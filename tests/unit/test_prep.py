"""The prep stage in one process: bad inputs, strict mode, resume, refusal, shard format."""
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import yaml

from data_prep import synthetic
from data_prep.config import load_config
from data_prep.manifest import ManifestError, load_manifest, verify_manifest
from data_prep.metadata import SPLITS
from data_prep.prepare import PrepError, run

SIZE = 32


@pytest.fixture(scope="module")
def base_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    synthetic.generate(d, patients=24, image_size=64, seed=11, progress=False)
    return d


def _bad_inputs(data, fixtures, odd_images):
    """Add one row per kind of bad input to the CSV (and the matching files)."""
    img = data / "images"
    real = (fixtures / "00000001_000.png").read_bytes()
    (img / "99990002_000.png").write_bytes(b"")
    (img / "99990003_000.png").write_bytes(real[: len(real) // 3])
    (img / "99990004_000.png").write_text("<html>not a png</html>\n")
    shutil.copy(fixtures / "00027426_000.png", img / "99990005_000.png")
    lines = (data / "Data_Entry_2017.csv").read_text().splitlines()
    rest = ",0.143,0.143"
    lines += [
        "99990001_000.png,No Finding,0,99990001,40,M,PA,64,64" + rest,     # file missing
        "99990002_000.png,Infiltration,0,99990002,40,M,PA,64,64" + rest,   # zero-byte
        "99990003_000.png,No Finding,0,99990003,40,F,AP,64,64" + rest,     # truncated
        "99990004_000.png,Infiltration,0,99990004,40,F,AP,64,64" + rest,   # not a PNG
        "../x.png,No Finding,0,99990008,40,F,AP,64,64" + rest,             # path escape
        lines[1],                                                          # duplicate row
        "99990005_000.png,No Finding,0,99990005,150,M,PA,512,512" + rest,  # age 150, kept
    ]
    (data / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    odd_images.add(data)  # RGBA, 16-bit, JPEG named .png, 2:1: kept, each listed as converted


def _config(tmp_path, data, **prep):
    cfg = {"data": {"csv": str(data / "Data_Entry_2017.csv"), "images": str(data), "image_size": SIZE},
           "prep": {"out": str(tmp_path / "prepared"), "shard_size": 16, "seed": 3, **prep}}
    p = tmp_path / "prep.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture
def bad_data(tmp_path, base_data, fixtures, odd_images):
    d = tmp_path / "data"
    shutil.copytree(base_data, d)
    _bad_inputs(d, fixtures, odd_images)
    return d


def _read_split(out, man, split):
    cols = {k: [] for k in ("images", "label", "targets", "mask", "image_index", "patient_id", "view", "age", "sex")}
    for sh in man["splits"][split]["shards"]:
        with h5py.File(out / sh["file"], "r") as h:
            for k in cols:
                cols[k].append(h[k][...])
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}


def test_bad_inputs_are_listed_and_run_succeeds(tmp_path, bad_data, odd_images):
    cfg = load_config(_config(tmp_path, bad_data))
    man = run(cfg)
    out = tmp_path / "prepared"
    assert load_manifest(out)["config_hash"] == man["config_hash"]
    assert verify_manifest(out)["ok"]
    why = {s["image"]: s["reason"] for s in man["skipped"]}
    assert why["99990001_000.png"] == "file not found below data.images"
    assert why["99990002_000.png"] == "zero-byte file"
    assert why["99990003_000.png"] == "truncated image data"
    assert why["99990004_000.png"].startswith("not an image")
    assert why["../x.png"].startswith("unsafe Image Index")
    first = (bad_data / "Data_Entry_2017.csv").read_text().splitlines()[1].split(",")[0]
    assert why[first].startswith("duplicate row")
    assert len(man["skipped"]) == 6
    assert man["notes"][0]["image"] == "99990005_000.png" and "implausible age 150" in man["notes"][0]["reason"]
    assert sorted(man["converted"], key=lambda c: c["image"]) == odd_images.expected
    # what was written
    written = {}
    for split in SPLITS:
        cols = _read_split(out, man, split)
        n = man["splits"][split]["count"]
        assert cols["images"].shape == (n, SIZE, SIZE) and cols["images"].dtype == np.uint8
        assert cols["label"].dtype == np.int64 and cols["targets"].shape == (n, 2)
        assert cols["age"].dtype == np.int16 and cols["patient_id"].dtype == object  # strings since format 4
        assert cols["mask"].shape == (n, 2) and cols["mask"].all()
        assert (cols["targets"].argmax(1) == cols["label"]).all()
        names = [x.decode() for x in cols["image_index"]]
        assert len(set(names)) == len(names)  # no balancing asked: every image once
        written[split] = names
        lc = man["splits"][split]["label_counts"]
        assert lc == {"No Finding": int((cols["label"] == 0).sum()), "Infiltration": int((cols["label"] == 1).sum())}
        assert man["splits"][split]["patients"] == len(set(cols["patient_id"].tolist()))
        assert set(x.decode() for x in cols["view"]) <= {"AP", "PA"}
        if "99990005_000.png" in names:
            assert cols["age"][names.index("99990005_000.png")] == -1
    everything = sum(written.values(), [])
    assert {"99990005_000.png", "99990006_000.png", "99990007_000.png", "99990009_000.png",
            "99990010_000.png"} <= set(everything)
    dropped = set(why) - {first}  # the first row of a duplicated image is kept
    assert first in everything and not dropped & set(everything)
    csv_rows = (bad_data / "Data_Entry_2017.csv").read_text().splitlines()[1:]
    task_rows = {r.split(",")[0] for r in csv_rows
                 if "Infiltration" in r.split(",")[1].split("|") or r.split(",")[1] == "No Finding"}
    assert set(everything) == task_rows - dropped
    # shard file names and attrs
    for split in SPLITS:
        files = sorted(p.name for p in (out / split).glob("*.h5"))
        m = len(files)
        assert files == [f"shard-{i:05d}-of-{m:05d}.h5" for i in range(m)]
        for f in files:
            with h5py.File(out / split / f, "r") as h:
                assert h["images"].chunks == (1, SIZE, SIZE)
                assert h.attrs["config_hash"] == man["config_hash"]
    # mean/std of the training pixels
    tr = _read_split(out, man, "train")["images"].astype(np.float64)
    assert man["mean"] == pytest.approx(tr.mean(), abs=1e-9)
    assert man["std"] == pytest.approx(tr.std(), abs=1e-9)
    assert (out / "config.yaml").is_file()
    assert man["classes"] == ["No Finding", "Infiltration"] and man["image_size"] == SIZE


def test_strict_fails(tmp_path, bad_data):
    cfg = load_config(_config(tmp_path, bad_data, strict=True))
    with pytest.raises(PrepError, match="--strict: 4 image"):  # known at planning: missing, zero-byte, ../, duplicate
        run(cfg)
    assert not (tmp_path / "prepared" / "manifest.json").exists()


def test_strict_fails_on_decode_errors(tmp_path, base_data, fixtures):
    d = tmp_path / "data"
    shutil.copytree(base_data, d)
    real = (fixtures / "00000001_000.png").read_bytes()
    (d / "images" / "99990003_000.png").write_bytes(real[:1000])
    with open(d / "Data_Entry_2017.csv", "a") as f:
        f.write("99990003_000.png,No Finding,0,99990003,40,F,AP,64,64,0.143,0.143\n")
    with pytest.raises(PrepError, match="99990003_000.png: truncated"):
        run(load_config(_config(tmp_path, d, strict=True)))
    assert not (tmp_path / "prepared" / "manifest.json").exists()
    man = run(load_config(_config(tmp_path, d)))  # same config hash: shards are resumed
    assert [s["image"] for s in man["skipped"]] == ["99990003_000.png"]
    assert man["timings"]["shards_written"] == 0


def test_cli_strict_exit_code(tmp_path, bad_data, root):
    cfg = _config(tmp_path, bad_data)
    r = subprocess.run([sys.executable, "-m", "data_prep", "--config", str(cfg), "--strict"],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "--strict" in r.stderr and "zero-byte file" in r.stderr
    assert not (tmp_path / "prepared" / "manifest.json").exists()


def test_cli_balanced_run_and_resume(tmp_path, base_data, root):
    cfg = _config(tmp_path, base_data, train_per_class=40, val_per_class=5)
    cmd = [sys.executable, "-m", "data_prep", "--config", str(cfg), "--set", "prep.test_per_class=6"]
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "prepared"
    man = load_manifest(out)
    assert man["splits"]["train"]["label_counts"] == {"No Finding": 40, "Infiltration": 40}
    assert man["splits"]["train"]["count"] == 80 and len(man["splits"]["train"]["shards"]) == 5
    assert max(man["splits"]["val"]["label_counts"].values()) <= 5
    assert max(man["splits"]["test"]["label_counts"].values()) <= 6
    assert man["config"]["prep"]["test_per_class"] == 6
    for split in ("val", "test"):
        names = _read_split(out, man, split)["image_index"].tolist()
        assert len(names) == len(set(names)) == man["splits"][split]["count"]
    pats = {s: set(_read_split(out, man, s)["patient_id"].tolist()) for s in SPLITS}
    assert not (pats["train"] & pats["val"] or pats["train"] & pats["test"] or pats["val"] & pats["test"])
    # resume: a lost shard and manifest are rebuilt, identical; the rest is kept
    shas = {sh["file"]: sh["sha256"] for s in SPLITS for sh in man["splits"][s]["shards"]}
    (out / "train" / "shard-00002-of-00005.h5").unlink()
    (out / "manifest.json").unlink()
    (out / "train" / ".shard-00003-of-00005.h5.tmp-999").write_bytes(b"half")
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    man2 = load_manifest(out)
    assert {sh["file"]: sh["sha256"] for s in SPLITS for sh in man2["splits"][s]["shards"]} == shas
    assert man2["timings"]["shards_written"] == 1
    assert not list(out.rglob(".shard-*"))
    assert verify_manifest(out)["images"] == sum(man["splits"][s]["count"] for s in SPLITS)


def test_other_config_refused_then_overwritten(tmp_path, base_data):
    run(load_config(_config(tmp_path, base_data)))
    with pytest.raises(PrepError, match="different config.*--overwrite"):
        run(load_config(_config(tmp_path, base_data), ["prep.seed=4"]))
    man = run(load_config(_config(tmp_path, base_data), ["prep.seed=4", "prep.overwrite=true"]))
    assert man["config"]["prep"]["seed"] == 4
    assert verify_manifest(tmp_path / "prepared")["ok"]
    hashes = set()
    for f in (tmp_path / "prepared").rglob("*.h5"):
        with h5py.File(f, "r") as h:
            hashes.add(h.attrs["config_hash"])
    assert hashes == {man["config_hash"]}


def test_missing_columns_error_names_them(tmp_path, base_data, root):
    d = tmp_path / "data"
    d.mkdir()
    (d / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels,Patient ID\nx.png,No Finding,1\n")
    r = subprocess.run([sys.executable, "-m", "data_prep", "--config", str(_config(tmp_path, d))],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "'Patient Age'" in r.stderr and "'Patient Gender'" in r.stderr and "'View Position'" in r.stderr


def test_manifest_errors(tmp_path, base_data):
    with pytest.raises(ManifestError, match="no manifest.json"):
        load_manifest(tmp_path / "nothing")
    run(load_config(_config(tmp_path, base_data)))
    out = tmp_path / "prepared"
    man = json.loads((out / "manifest.json").read_text())
    f = out / man["splits"]["val"]["shards"][0]["file"]
    with h5py.File(f, "r+") as h:
        h["age"][0] = 99
    with pytest.raises(ManifestError, match="sha256"):
        verify_manifest(out)
    f.unlink()
    with pytest.raises(ManifestError, match="missing"):
        load_manifest(out)


def test_multilabel(tmp_path, base_data):
    man = run(load_config(_config(tmp_path, base_data), ["data.task=multilabel"]))
    out = tmp_path / "prepared"
    cols = _read_split(out, man, "train")
    assert cols["targets"].shape[1] == 14 and (cols["label"] == -1).all()
    assert man["classes"][3] == "Infiltration"
    assert man["splits"]["train"]["label_counts"]["Infiltration"] == int(cols["targets"][:, 3].sum())


def test_official_split_and_a_missing_list(tmp_path, base_data):
    man = run(load_config(_config(tmp_path, base_data), ["data.official_split=true", "prep.val_fraction=0.25"]))
    assert man["split_method"].startswith("official")
    test_list = set((base_data / "test_list.txt").read_text().split())
    cols = {s: _read_split(tmp_path / "prepared", man, s) for s in SPLITS}
    names = {s: {x.decode() for x in cols[s]["image_index"]} for s in SPLITS}
    assert names["test"] and names["test"] <= test_list
    assert not (names["train"] | names["val"]) & test_list
    assert names["val"] and not set(cols["val"]["patient_id"].tolist()) & set(cols["train"]["patient_id"].tolist())
    d = tmp_path / "nolists"
    shutil.copytree(base_data, d)
    (d / "test_list.txt").unlink()
    # a missing list stops prep with one line naming it (no silent seeded split)
    p = subprocess.run([sys.executable, "-m", "data_prep", "--config", str(_config(tmp_path, d)), "--set",
                        "data.official_split=true", "--set", f"prep.out={tmp_path / 'p2'}"],
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()]  # INFO lines before it are the log
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("cxr-prep: error: data.official_split: test_list.txt not found beside "), lines[0]
    assert not (tmp_path / "p2" / "manifest.json").exists()


def test_nothing_to_prepare_is_an_error(tmp_path):
    d = tmp_path / "data"
    (d / "images").mkdir(parents=True)
    (d / "Data_Entry_2017.csv").write_text(
        synthetic.HEADER + "\n00000001_000.png,No Finding,0,1,40,M,PA,64,64,0.1,0.1\n")
    with pytest.raises(PrepError, match="nothing to prepare.*file not found below data.images: 1"):
        run(load_config(_config(tmp_path, d)))


def test_single_process_never_imports_mpi4py(tmp_path, base_data, root):
    code = ("import sys; from data_prep.__main__ import main; rc = main(['--config', sys.argv[1]]); "
            "print('MPI' if 'mpi4py' in sys.modules else 'NOMPI'); sys.exit(rc)")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OMPI_COMM_WORLD", "PMI", "PMIX", "HOROVOD", "SLURM"))}
    r = subprocess.run([sys.executable, "-c", code, str(_config(tmp_path, base_data))], cwd=root,
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("NOMPI")
