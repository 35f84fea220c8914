"""The prep stage under mpirun: same shards as one process; killed mid-run, a rerun completes it."""
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import yaml

from data_prep import synthetic
from data_prep.manifest import load_manifest, verify_manifest
from data_prep.metadata import SPLITS

pytestmark = pytest.mark.needs_mpirun  # skipped without it, a failure under CI=true (tests/conftest.py)
DATASETS = ("images", "label", "targets", "image_index", "patient_id", "view", "age", "sex")


def _mpirun(np_):
    return ["mpirun", "-np", str(np_), "--oversubscribe", "--bind-to", "none",
            "--mca", "btl_vader_single_copy_mechanism", "none", sys.executable, "-m", "data_prep"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    synthetic.generate(d, patients=20, image_size=64, seed=5, progress=False)
    return d


def _config(folder, data, out, **prep):
    p = folder / f"{out}.yaml"
    p.write_text(yaml.safe_dump({
        "data": {"csv": str(data / "Data_Entry_2017.csv"), "images": str(data), "image_size": 32},
        "prep": {"out": str(folder / out), "shard_size": 8, "train_per_class": 24, "seed": 9, **prep}}))
    return p


def _kill_tree(proc):
    """SIGKILL mpirun and every rank at once (Open MPI puts ranks in their own process groups),
    as a crashed node would; then wait until none is left."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _run(cmd, root, **kw):
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=180, **kw)
    assert r.returncode == 0, f"{cmd}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def test_two_ranks_equal_one_process(tmp_path, data, root):
    _run([sys.executable, "-m", "data_prep", "--config", str(_config(tmp_path, data, "one"))], root)
    r = _run(_mpirun(2) + ["--config", str(_config(tmp_path, data, "two"))], root)
    assert r.stderr.count("[rank 0]") > 0 and "[rank 1] INFO" not in r.stderr  # rank 1 stays quiet
    one, two = load_manifest(tmp_path / "one"), load_manifest(tmp_path / "two")
    assert one["config_hash"] == two["config_hash"]
    assert two["timings"]["ranks"] == 2 and one["timings"]["ranks"] == 1
    n_shards = 0
    for split in SPLITS:
        a, b = one["splits"][split], two["splits"][split]
        assert [s["file"] for s in a["shards"]] == [s["file"] for s in b["shards"]]
        assert a["count"] == b["count"] and a["label_counts"] == b["label_counts"]
        for sa in a["shards"]:
            n_shards += 1
            with (h5py.File(tmp_path / "one" / sa["file"], "r") as ha,
                  h5py.File(tmp_path / "two" / sa["file"], "r") as hb):
                for ds in DATASETS:
                    assert np.array_equal(ha[ds][...], hb[ds][...]), (sa["file"], ds)
                assert ha["images"].shape[0] == sa["count"] > 0
    assert n_shards >= 6
    assert sum(two["timings"]["shards_per_rank"]) == n_shards and len(two["timings"]["shards_per_rank"]) == 2
    assert one["mean"] == two["mean"] and one["std"] == two["std"]
    assert one["flow"] == two["flow"]  # the flow of images and patients does not depend on the ranks
    # HDF5 files written without timestamps: byte-identical too
    assert [s["sha256"] for sp in SPLITS for s in one["splits"][sp]["shards"]] == \
           [s["sha256"] for sp in SPLITS for s in two["splits"][sp]["shards"]]


def test_odd_images_are_on_record_with_one_and_two_ranks(tmp_path, data, root, odd_images):
    """RGBA, 16-bit, JPEG content under a .png name and a 2:1 image: each listed in ``converted``
    with what was done, the same with 1 and 2 ranks, counted per kind in the summary line."""
    odd = tmp_path / "data"
    shutil.copytree(data, odd)
    odd_images.add(odd)
    one = _run([sys.executable, "-m", "data_prep", "--config", str(_config(tmp_path, odd, "one"))], root)
    _run(_mpirun(2) + ["--config", str(_config(tmp_path, odd, "two"))], root)
    for out in ("one", "two"):
        man = load_manifest(tmp_path / out)
        assert sorted(man["converted"], key=lambda c: c["image"]) == odd_images.expected, out
    assert "converted 4 (mode 1, bit depth 1, format 1, aspect 1)" in one.stderr


def test_killed_run_resumes_to_complete_manifest(tmp_path, data, root):
    cfg = _config(tmp_path, data, "killed", shard_size=4)
    out = tmp_path / "killed"
    env = dict(os.environ, CXR_PREP_THROTTLE_S="0.05")
    proc = subprocess.Popen(_mpirun(2) + ["--config", str(cfg)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not list(out.glob("*/shard-*.h5")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no shard appeared"
            time.sleep(0.05)
        _kill_tree(proc)
    finally:
        _kill_tree(proc)
        proc.wait()
        proc.stderr.close()
    assert not (out / "manifest.json").exists()
    before = {p.relative_to(out).as_posix() for p in out.glob("*/shard-*.h5")}
    # rerun with a different number of ranks: the plan does not depend on it
    _run([sys.executable, "-m", "data_prep", "--config", str(cfg)], root)
    man = load_manifest(out)
    report = verify_manifest(out)
    planned = [s["file"] for sp in SPLITS for s in man["splits"][sp]["shards"]]
    assert before and before < set(planned)  # killed mid-run: some, not all
    assert man["timings"]["shards_written"] == len(planned) - len(before)
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/*.h5")) == sorted(planned)
    assert not list(out.rglob(".shard-*"))  # temporary files of the killed run removed
    assert man["splits"]["train"]["label_counts"] == {"No Finding": 24, "Infiltration": 24}
    assert report["images"] == sum(man["splits"][sp]["count"] for sp in SPLITS)
    for sp in ("val", "test"):
        names = []
        for s in man["splits"][sp]["shards"]:
            with h5py.File(out / s["file"], "r") as h:
                names += h["image_index"][...].tolist()
        assert len(names) == len(set(names)) == man["splits"][sp]["count"]
    # and the result equals an uninterrupted single run
    ref = tmp_path / "ref"
    _run([sys.executable, "-m", "data_prep", "--config", str(cfg), "--set", f"prep.out={ref}"], root)
    ref_man = load_manifest(ref)
    assert [s["sha256"] for sp in SPLITS for s in ref_man["splits"][sp]["shards"]] == \
           [s["sha256"] for sp in SPLITS for s in man["splits"][sp]["shards"]]
    assert man["flow"] == ref_man["flow"]  # resumed shards count in the flow as written ones


def test_error_on_rank0_stops_every_rank_once(tmp_path, data, root):
    cfg = _config(tmp_path, data, "err")
    r = subprocess.run(_mpirun(2) + ["--config", str(cfg), "--set", f"data.csv={tmp_path / 'nope.csv'}"],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.count("metadata CSV not found") == 1, r.stderr
    assert not (tmp_path / "err" / "manifest.json").exists()


def test_strict_decode_error_under_mpirun(tmp_path, data, root):
    d = tmp_path / "data"
    shutil.copytree(data, d)
    rows = [ln.split(",") for ln in (d / "Data_Entry_2017.csv").read_text().splitlines()[1:]]
    victim = d / "images" / [r[0] for r in rows if r[1] == "No Finding"][3]  # an image of the task
    victim.write_bytes(victim.read_bytes()[:200])  # truncated: found only when its shard is decoded
    cfg = _config(tmp_path, d, "strict", train_per_class=0)
    r = subprocess.run(_mpirun(2) + ["--config", str(cfg), "--strict"], cwd=root, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert r.stderr.count(f"{victim.name}: truncated image data") == 1, r.stderr
    assert not (tmp_path / "strict" / "manifest.json").exists()
    _run(_mpirun(2) + ["--config", str(cfg)], root)  # without --strict: listed, run succeeds
    man = load_manifest(tmp_path / "strict")
    assert [(s["image"], s["reason"]) for s in man["skipped"]] == [(victim.name, "truncated image data")]
