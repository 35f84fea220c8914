"""The virtual cluster as root: fresh state folder only, /etc/hosts edited byte-exactly (no namespaces needed)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import vcluster
from launch.hosts import LaunchError

ROOT = Path(__file__).resolve().parents[2]


def _snapshot(folder: Path):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


def test_up_on_an_existing_folder_is_refused_and_the_folder_untouched(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine\n")
    (home / "sub").mkdir()
    (home / "sub" / "key").write_bytes(b"\x00secret")
    before = _snapshot(home)
    r = subprocess.run([sys.executable, "-m", "launch", "vcluster", "up", "--id", "3", "--dir", str(home)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "already exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert _snapshot(home) == before
    r = subprocess.run([sys.executable, "-m", "launch", "vcluster", "down", "--id", "3", "--dir", str(home)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert _snapshot(home) == before  # no state file of ours there: down deletes nothing of it


def test_a_planted_symlink_is_refused_and_its_target_not_created(tmp_path):
    link = tmp_path / "cxr-vcluster-3"
    os.symlink(tmp_path / "victim", link)  # dangling: resolve() would have created the target
    with pytest.raises(LaunchError, match="is a symlink"):
        vcluster.up(nodes=1, folder=link, cluster_id=3, log=lambda m: None)
    assert not (tmp_path / "victim").exists()
    assert str(vcluster.default_dir(3)).startswith("/run/") or "CXR_VCLUSTER_DIR" in os.environ


def test_down_deletes_only_the_files_its_state_lists(tmp_path, monkeypatch):
    monkeypatch.setattr(vcluster, "HOSTS_FILE", tmp_path / "hosts")
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
    monkeypatch.setattr(vcluster, "_run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))
    folder = tmp_path / "vc"
    folder.mkdir()
    state = vcluster.State(dir=str(folder), slots=1, id=3)
    state.track("state.json", "ssh_config", "../../outside")
    (folder / "ssh_config").write_text("x")
    (folder / "user-file").write_text("keep me")
    (tmp_path / "outside").write_text("keep me too")
    vcluster.down(folder, 3, quiet=True)
    assert sorted(p.name for p in folder.iterdir()) == ["user-file"] and (tmp_path / "outside").exists()


@pytest.mark.parametrize("original", [b"127.0.0.1 localhost\n::1 ip6\n",
                                      # CRLF, no final newline
                                      b"127.0.0.1 localhost\r\n# a user's comment\r\n10.0.0.1 box",
                                      b""])
def test_hosts_lines_are_added_and_removed_byte_exactly(tmp_path, monkeypatch, original):
    hosts = tmp_path / "hosts"
    hosts.write_bytes(original)
    monkeypatch.setattr(vcluster, "HOSTS_FILE", hosts)
    names = vcluster.Names(3)
    nodes = [names.node(1), names.node(2)]
    added = vcluster._hosts_add(nodes, names)
    text = hosts.read_bytes()
    assert text.startswith(original) and text.count(names.mark.encode()) == 2
    assert b"198.18.0.203 c3node1 # cxr-vcluster-3\n" in text
    hosts.write_bytes(text + b"192.168.1.5 added-by-the-user-meanwhile\n")
    assert vcluster._hosts_remove(names, added)
    assert hosts.read_bytes() == (original + (b"\n" if added else b"") + b"192.168.1.5 added-by-the-user-meanwhile\n")
    hosts.write_bytes(text)
    vcluster._hosts_remove(names, added)
    assert hosts.read_bytes() == original
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hosts")]  # no temporary file left
