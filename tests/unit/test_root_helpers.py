"""The root helpers' folders (launch.vslurm, launch.vcluster) without /tmp races; nothing is started.

The daemons are stubbed: these tests check only what up and down do with the file system. A "victim"
folder stands for a folder of root's (/etc) that another local user points a planted symlink at.
"""
import os
import subprocess
from pathlib import Path

import pytest

from launch import vcluster, vslurm
from launch.hosts import LaunchError


def _snapshot(folder: Path):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


@pytest.fixture()
def victim(tmp_path):
    v = tmp_path / "etc"
    v.mkdir()
    for name in ("passwd", "munge.key", "slurm.conf", "state.json"):
        (v / name).write_text(f"root's {name}\n")
    (v / "ctld").mkdir()
    (v / "ctld" / "keep").write_text("keep\n")
    return v


@pytest.fixture()
def cluster(tmp_path, monkeypatch):
    """A virtual cluster's state folder (two nodes), as ``vcluster up`` leaves it; no namespaces."""
    monkeypatch.setattr(vslurm, "unavailable_reason", lambda: None)
    monkeypatch.setattr(vcluster, "netns_pids", lambda ns: [])
    folder = tmp_path / "vc"
    vcluster.make_fresh_dir(folder)
    names = vcluster.Names(2)
    state = vcluster.State(dir=str(folder), slots=1, id=2, nodes=[names.node(1), names.node(2)])
    state.track("state.json")
    return folder


def test_default_folders_are_under_run():
    if "CXR_VSLURM_DIR" not in os.environ:
        assert str(vslurm.default_dir(3)) == "/run/cxr-vslurm-3"


def test_vslurm_up_and_down_with_the_folder_planted_as_a_symlink_leave_the_victim_untouched(tmp_path, victim,
                                                                                           cluster):
    link = tmp_path / "cxr-vslurm-2"
    link.symlink_to(victim)
    before = _snapshot(victim)
    with pytest.raises(LaunchError, match="is a symlink"):
        vslurm.up(2, link, cluster, log=lambda m: None)
    vslurm.down(link, quiet=True)
    assert _snapshot(victim) == before and link.is_symlink()


def test_vslurm_up_refuses_a_premade_folder_of_someone_else_with_a_planted_key_link(tmp_path, victim, cluster):
    folder = tmp_path / "cxr-vslurm-2"
    folder.mkdir(mode=0o777)
    os.chmod(folder, 0o777)  # made by another user in a shared /tmp: writable by them
    (folder / "munge.key").symlink_to(victim / "munge.key")
    (folder / "state.json").write_text(
        '{"dir": "%s", "cluster_id": 2, "nodes": [], "netns": [], "files": ["munge.key", "state.json"]}' % folder)
    before = _snapshot(victim)
    with pytest.raises(LaunchError, match="not this helper's own folder"):
        vslurm.up(2, folder, cluster, log=lambda m: None)
    assert vslurm.down(folder, quiet=True) == []  # a state file in a folder others may write is not trusted
    assert _snapshot(victim) == before and (folder / "munge.key").is_symlink()


def test_vslurm_up_makes_a_fresh_0700_folder_that_down_removes_whole(tmp_path, cluster, monkeypatch):
    monkeypatch.setattr(vslurm, "_start", lambda state, name, argv: None)
    monkeypatch.setattr(vslurm, "_wait", lambda *a, **k: None)
    folder = tmp_path / "cxr-vslurm-2"
    state = vslurm.up(2, folder, cluster, log=lambda m: None)
    assert (os.stat(folder).st_mode & 0o777) == 0o700 and (os.stat(folder / "munge.key").st_mode & 0o777) == 0o600
    assert (folder / "mpi.conf").read_text() == f"PMIxCliTmpDirBase={folder / 'pmix'}\n"
    assert sorted(p.name for p in (folder / "pmix-nodes").iterdir()) == ["c2node1", "c2node2"]
    assert {"mpi.conf", "pmix", "pmix-nodes", "munge.sock", "slurmd-c2node1.pid"} <= set(state.files)
    (folder / "munge.sock").write_text("")  # what the daemons would have made
    (folder / "spool" / "c2node1" / "cred_state").write_text("x")
    (folder / "slurmd-c2node1.pid").write_text("1")
    # up again on its own folder of the earlier start: taken down, made fresh
    vslurm.up(2, folder, cluster, log=lambda m: None)
    assert not (folder / "munge.sock").exists()
    vslurm.down(folder, quiet=True)
    assert not os.path.lexists(folder) and vslurm.leftovers(folder=folder) == []


def _swap_after_check(folder: Path, victim: Path):
    """Called by down() after it checked ``folder``: the folder becomes a symlink to ``victim``."""
    def swap(*a, **k):
        if not folder.is_symlink():
            os.rename(folder, folder.with_name(folder.name + ".moved"))
            folder.symlink_to(victim)
        return []
    return swap


def test_vslurm_down_with_the_folder_swapped_for_a_symlink_deletes_nothing_outside(tmp_path, victim, cluster,
                                                                                  monkeypatch):
    monkeypatch.setattr(vslurm, "_start", lambda state, name, argv: None)
    monkeypatch.setattr(vslurm, "_wait", lambda *a, **k: None)
    folder = tmp_path / "cxr-vslurm-2"
    vslurm.up(2, folder, cluster, log=lambda m: None)
    before = _snapshot(victim)
    monkeypatch.setattr(vcluster, "netns_pids", _swap_after_check(folder, victim))
    vslurm.down(folder, quiet=True)
    assert folder.is_symlink() and _snapshot(victim) == before
    assert not os.listdir(folder.with_name(folder.name + ".moved"))  # the deletions went to the real folder


def test_vcluster_down_with_the_folder_swapped_for_a_symlink_deletes_nothing_outside(tmp_path, victim, monkeypatch):
    monkeypatch.setattr(vcluster, "HOSTS_FILE", tmp_path / "hosts")
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    monkeypatch.setattr(vcluster, "_run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))
    folder = tmp_path / "cxr-vcluster-3"
    vcluster.make_fresh_dir(folder)
    state = vcluster.State(dir=str(folder), slots=1, id=3)
    state.track("state.json", "passwd", "munge.key")
    for name in ("passwd", "munge.key"):
        (folder / name).write_text("ours\n")
    before = _snapshot(victim)
    monkeypatch.setattr(vcluster, "_our_netns", _swap_after_check(folder, victim))
    vcluster.down(folder, 3, quiet=True)
    assert folder.is_symlink() and _snapshot(victim) == before
    assert not os.listdir(folder.with_name(folder.name + ".moved"))


def test_vcluster_up_refuses_an_existing_folder_holding_a_state_file_of_others(tmp_path):
    folder = tmp_path / "vc"
    folder.mkdir()
    os.chmod(folder, 0o777)
    (folder / "state.json").write_text('{"dir": "%s", "slots": 1, "nodes": [], "files": ["notes"]}' % folder)
    (folder / "notes").write_text("mine\n")
    before = _snapshot(folder)
    with pytest.raises(LaunchError, match="not this helper's own folder"):
        vcluster.up(1, 1, folder, cluster_id=3, log=lambda m: None)
    assert _snapshot(folder) == before
