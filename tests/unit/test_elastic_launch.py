"""``launch train --elastic``: the horovodrun command and the discovery script (nothing started)."""
import socket
import sys

from launch import discover
from launch.__main__ import main
from launch.hosts import Host


def test_elastic_train_builds_horovodrun_with_discovery_and_gloo(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {backbone: tiny}\n")
    assert main(["train", "--config", str(cfg), "--hosts", "a:1,b:1", "--elastic", "--min-np", "1", "--dry-run"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "horovodrun -np 2 --min-np 1 --max-np 2 --host-discovery-script" in line
    assert f"'{sys.executable} -m launch.discover --hosts a:1,b:1'" in line
    assert "--slots-per-host 1 --gloo" in line and "--blacklist-cooldown-range 5 60" in line
    assert line.endswith("--set train.elastic=true")
    assert " -H " not in line


def test_elastic_from_config_key_and_its_limits(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {elastic: true}\n")
    assert main(["train", "--config", str(cfg), "--hosts", "a:2,b:2", "--dry-run"]) == 0
    assert "--min-np 1 --max-np 4" in capsys.readouterr().out
    assert main(["train", "--config", str(cfg), "--hosts", "a:1,b:1", "--max-np", "1", "--dry-run"]) == 2
    assert "--min-np (1) <= ranks to start (2) <= --max-np (1)" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--hosts", "a:2", "--dry-run"]) == 2
    assert "needs at least two hosts" in capsys.readouterr().err
    # prep and evaluate are not elastic
    assert main(["evaluate", "--config", str(cfg), "--hosts", "a:1,b:1", "--dry-run"]) == 0
    assert "--min-np" not in capsys.readouterr().out


def test_discovery_lists_the_hosts_that_answer(monkeypatch):
    monkeypatch.setattr(discover, "is_local_host", lambda name: name == "here")
    with socket.socket() as srv, socket.socket() as closed:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        closed.bind(("127.0.0.2", port))  # bound, not listening: refuses
        got = discover.available([Host("127.0.0.1", 2), Host("127.0.0.2", 2), Host("here", 3)], port=port,
                                 timeout=0.5, ranks_per_node=2)
    assert got == [Host("127.0.0.1", 2), Host("here", 2)]  # 127.0.0.2 refuses; this node always counts


def test_discovery_needs_hosts(capsys, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    assert discover.main([]) == 2
    assert "no hosts to discover" in capsys.readouterr().err


def test_discovery_reads_the_slurm_allocation(capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "localhost")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2")
    assert discover.main([]) == 0
    assert capsys.readouterr().out.split() == ["localhost:2"]
