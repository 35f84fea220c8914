"""A virtual cluster for the Slurm and elastic tests (``launch.vcluster``), reused when one is up.

Its id is ``CXR_VCLUSTER_TEST_ID`` (default 3: a user's cluster 0 is never touched). When a
cluster of that id with enough nodes is already up (another test module's), it is used as it is
and left up; otherwise one is made and removed afterwards, also after a failed test.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from launch import vcluster

TEST_ID = int(os.environ.get("CXR_VCLUSTER_TEST_ID", "3"))


def running(nodes: int) -> vcluster.State | None:
    """The test cluster when it is up with at least ``nodes`` nodes and every sshd alive."""
    state = vcluster.State.load(vcluster.default_dir(TEST_ID).resolve())
    if state is None or len(state.nodes) < nodes:
        return None
    if not all(n.sshd_pid and Path(f"/proc/{n.sshd_pid}").exists() and not vcluster._zombie(n.sshd_pid)
               for n in state.nodes):
        return None
    return state


@contextlib.contextmanager
def virtual_cluster(nodes: int = 2):
    """Yields a vcluster.State of ``nodes`` nodes (1 slot each)."""
    state = running(nodes)
    if state is not None:
        yield state
        return
    state = vcluster.up(nodes, 1, vcluster.default_dir(TEST_ID), sys.executable, TEST_ID, log=lambda m: None)
    try:
        yield state
    finally:
        vcluster.down(Path(state.dir), TEST_ID, quiet=True)


def ssh_wrapper(state: vcluster.State, folder: Path) -> Path:
    """A folder holding an ``ssh`` that uses the cluster's client file: put it first on PATH so that
    mpirun and horovodrun reach the nodes by name."""
    folder.mkdir(parents=True, exist_ok=True)
    ssh = folder / "ssh"
    ssh.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {Path(state.dir) / "ssh_config"} "$@"\n')
    ssh.chmod(0o755)
    return folder
