"""Across namespace nodes: a Gloo job's command lines carry no variable outside the launcher's allow-list
(read from every /proc/*/cmdline while it runs), and /etc/hosts is byte-identical after up + down."""
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from cluster_tools import CLUSTER_ID, ROOT, cluster_file, ok, start_launch

from launch import vcluster
from launch.commands import ENV_ALLOW, ENV_ALLOW_PREFIXES

pytestmark = [pytest.mark.multinode]
# set by horovodrun itself, not from the launcher's environment
HOROVOD_OWN = {"NCCL_SOCKET_IFNAME", "PYTHONUNBUFFERED"}
_ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=")


def _cmdlines(skip: set[int]) -> dict[int, list[str]]:
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) not in skip:
            try:
                out[int(p.name)] = [a.decode(errors="replace") for a in (p / "cmdline").read_bytes().split(b"\0") if a]
            except OSError:
                pass
    return out


def _assigned(argv: list[str]) -> set[str]:
    """Variable names set on a command line (``K=V`` words, also inside a quoted remote command)."""
    names = set()
    argv = [w for i, w in enumerate(argv) if not (i and argv[i - 1] == "-o")]  # ssh -o Key=value options
    for word in argv:
        try:
            parts = shlex.split(word) if " " in word else [word]
        except ValueError:
            parts = word.split()
        names |= {m.group(1) for w in parts if (m := _ASSIGN.match(w))}
    return names


def test_hosts_file_is_byte_identical_after_up_and_down(cluster_available, tmp_path):
    """First in the module: before the module's cluster (the same id) is up."""
    before = vcluster.HOSTS_FILE.read_bytes()
    folder = tmp_path / "vc"
    try:
        state = vcluster.up(nodes=1, slots=1, folder=folder, cluster_id=CLUSTER_ID, log=lambda m: None)
        during = vcluster.HOSTS_FILE.read_bytes()
        assert during.startswith(before) and during.count(state.names.mark.encode()) == 1
        assert (folder.stat().st_mode & 0o777) == 0o700
    finally:
        vcluster.down(folder, CLUSTER_ID, quiet=True)
    assert vcluster.HOSTS_FILE.read_bytes() == before
    assert not folder.exists() and vcluster.leftovers(CLUSTER_ID, folder) == []


@pytest.mark.needs_horovod
def test_a_gloo_jobs_command_lines_hold_only_allow_listed_variables(cluster, dataset, tmp_path):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    prep = tmp_path / "prepared"
    ok(subprocess.run([sys.executable, "-m", "data_prep", "--config", str(dataset / "cfg.yaml"), "--set",
                       f"prep.out={prep}"], cwd=ROOT, capture_output=True, text=True, timeout=300))
    cl = cluster_file(cluster, tmp_path, horovod_controller="gloo", env_passthrough=["CXR_TEST_PASSTHROUGH"])
    job = start_launch(cluster, "train", "--config", str(dataset / "cfg.yaml"), "--cluster", str(cl),
                       "--set", f"prep.out={prep}", "--set", f"run.dir={tmp_path / 'run'}",
                       "--set", "train.finetune.epochs=0",
                       env={"AWS_SECRET_ACCESS_KEY": secret, "CXR_TEST_PASSTHROUGH": "1",
                            "CXR_STEP_SLEEP_S": "0.05"})
    seen: dict[int, list[str]] = {}
    try:
        while job.poll() is None:
            for pid, argv in _cmdlines({job.pid}).items():
                if any("horovod" in a or "distributed.train" in a for a in argv) or any(secret in a for a in argv):
                    seen[pid] = argv
            time.sleep(0.1)
        out, err = job.communicate()
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, err[-4000:]
    remote = [a for a in seen.values() if a and Path(a[0]).name == "ssh" and any("HOROVOD_" in w for w in a)]
    assert remote, f"no Gloo ssh command line seen among {len(seen)} processes"
    harness = lambda a: a[:2] == ["bash", "-c"] and "exec env " in a[2]  # noqa: E731 - this test's own ssh session
    assert not [a for a in seen.values() if any(secret in w for w in a) and not harness(a)]
    names = set().union(*(_assigned(a) for a in remote))
    outside = sorted(n for n in names if n not in ENV_ALLOW and not n.startswith(ENV_ALLOW_PREFIXES)
                     and n not in HOROVOD_OWN)
    assert "HOROVOD_RANK" in names and outside == [], outside
