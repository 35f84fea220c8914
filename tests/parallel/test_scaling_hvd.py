"""The scaling benchmark for real: ``horovodrun -np 2`` with the launcher's tuned layout, and the
same layout with the ranks training alone (the ``independent`` floor). Tiny backbone, QUICK size:
it checks the plumbing and what every rank really got, not the speed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.needs_horovod  # skipped without it, a failure under CI=true (tests/conftest.py)


def test_scaling_two_ranks_tuned_and_independent(tmp_path):
    out = tmp_path / "scaling"
    env = {**os.environ, "CXR_BENCH_CACHE": str(tmp_path / "cache")}
    env.pop("HOROVOD_CYCLE_TIME", None)
    r = subprocess.run([sys.executable, "-m", "benchmarks", "scaling", "--quick", "--np", "1,2", "--repeats", "1",
                        "--modes", "tuned,independent", "--set", "model.backbone=tiny", "--timeline",
                        "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "scaling.json").read_text())
    tuned, alone = res["runs"]["tuned"], res["runs"]["independent"]
    assert set(tuned) == {"1", "2"} and set(alone) == {"2"}  # independent with 1 rank is tuned's 1 rank
    for rec in (tuned["1"], tuned["2"], alone["2"]):
        assert rec["status"] == "ok" and rec["images_per_s"] > 0 and len(rec["rounds"]) == 1
    ranks = tuned["2"]["per_rank"]
    assert len(ranks) == 2
    cores = os.cpu_count() or 1
    for p in ranks:
        # Each rank got the tuned share (never more threads than its cores) and Horovod's cycle time.
        assert p["intra_op"] == max(1, cores // 2) and p["env"]["HOROVOD_CYCLE_TIME"] == "50"
    if cores >= 2:  # bound one per core: disjoint affinity masks
        assert not set(ranks[0]["affinity"]) & set(ranks[1]["affinity"])
    assert len(alone["2"]["per_rank"]) == 2 and all(p["step_s"] > 0 for p in alone["2"]["per_rank"])
    s = res["summary"]
    assert s["tuned"]["2"]["speedup"] == pytest.approx(tuned["2"]["images_per_s"] / tuned["1"]["images_per_s"])
    assert s["independent"]["2"]["speedup"] == pytest.approx(alone["2"]["images_per_s"] / tuned["1"]["images_per_s"])
    md = (out / "scaling.md").read_text()
    assert "| tuned | 2 |" in md and "| independent | 2 |" in md
    # --timeline: HOROVOD_TIMELINE reached rank 0 of the allreducing run (not the independent one),
    # and every timed step reduced every trainable tensor once.
    tl = tuned["2"]["rounds"][0]["timeline"]
    assert (out / "timelines" / "tuned-2ranks-round1.json").is_file() and "error" not in tl
    assert tl["steps"] == 3 and tl["steps_used"] == 2 and tl["tensors"] >= 2  # 1 untimed + 2 timed, quick
    assert tl["allreduce_ms"] > 0 and tl["skew_ms"] >= 0 and tl["exposed_ms"] >= 0
    assert tuned["2"]["timeline"]["rounds"] == 1 and "timeline" not in alone["2"]
    assert "Where a multi-rank step's time goes" in md and "| tuned, 2 ranks (1 round(s)) |" in md
