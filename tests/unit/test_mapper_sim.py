"""The project's mpirun lines checked by Open MPI's own mapper over simulated clusters of 1 to 256 nodes.

No ssh and no process of the job starts: ``mpirun --mca ras simulator --do-not-launch --display-map``
maps the ranks onto simulated nodes whose hardware is an hwloc synthetic topology (hwloc's
``lstopo-no-graphics``), and prints where each rank is bound. The node types stand for:

* ``spr``: a 2-socket Xeon Platinum 8480+ (56 cores per socket, hyper-threading on);
* ``nps4``: a 2-socket EPYC 9654 in NPS4 (96 cores per socket, 4 NUMA domains each, SMT on), one rank
  per socket and one per NUMA domain;
* ``n16``: a 16-core single-socket node without SMT.

For every one: each rank is bound to whole cores of one socket (``numa``: of one NUMA domain), no core
is bound twice, both hardware threads of a core go to the same rank, and the threads the project
plans per rank equal its bound cores. At 64 and 256 nodes the line with the cluster options sites use
(UCX, the user's own ``--mca pml ucx``, an ssh client file, an interface) is accepted by mpirun, for
mpirun and for the line horovodrun --mpi makes.
"""
import os
import shutil

import pytest

from distributed.tuning import Topology
from launch import mapview
from launch.cluster import ClusterConfig
from launch.commands import LaunchSpec, build_command, mca_params, node_topology, plan_layout
from launch.hosts import Allocation, Host

# CI (make test) installs both: there a missing one fails the tests instead of skipping them
pytestmark = pytest.mark.skipif(
    (not shutil.which("lstopo-no-graphics") or not shutil.which("mpirun"))
    and os.environ.get("CI", "").lower() != "true",
    reason="needs Open MPI's mpirun and hwloc's lstopo-no-graphics (make setup)")

NODES = {  # sockets, cores per socket, NUMA per socket, threads per core
    "spr": (2, 56, 1, 2),
    "nps4": (2, 96, 4, 2),
    "n16": (1, 16, 1, 1),
}


def cluster_for(kind: str, **extra) -> ClusterConfig:
    s, c, n, t = NODES[kind]
    return ClusterConfig(sockets_per_node=s, cores_per_socket=c, numa_per_socket=n, threads_per_core=t, **extra)


def hosts(n: int, slots: int) -> Allocation:
    return Allocation(tuple(Host(f"cn{i:03d}", slots) for i in range(1, n + 1)), "hosts")


@pytest.mark.parametrize("nodes", [1, 4, 64, 256])
@pytest.mark.parametrize("kind,per_node", [("spr", "socket"), ("nps4", "socket"), ("nps4", "numa"), ("n16", "socket"),
                                           ("spr", 4)])
def test_open_mpi_binds_every_rank_as_planned(kind, per_node, nodes):
    cl = cluster_for(kind, ranks_per_node=per_node)
    node = node_topology(cl)
    rpn = {"socket": node.sockets, "numa": node.domains}.get(per_node, per_node)
    lay = plan_layout("train", hosts(nodes, rpn), cl, node)
    assert (lay.np, lay.ranks_per_node) == (nodes * rpn, rpn)
    cmd = build_command(LaunchSpec("train", lay, config="c.yaml", cluster=cl, launcher="mpirun"), environ={}, uid=0)
    result = mapview.open_mpi_map(cmd, cl)
    assert result.source.startswith("Open MPI")
    assert [nm.name for nm in result.nodes] == [h.name for h in lay.hosts]
    assert sorted(r.rank for nm in result.nodes for r in nm.ranks) == list(range(lay.np))
    assert all(len(nm.ranks) == rpn for nm in result.nodes)
    assert mapview.check(result, lay) == [], mapview.check(result, lay)[:5]
    first = result.nodes[0].ranks
    for r in first:  # every rank's cores: one socket (numa: one domain), all hardware threads, the planned threads
        assert len(r.sockets()) == 1 or lay.unit == "node"
        assert r.threads == len(r.cores) == lay.cores_per_rank
        assert set(r.hwts.values()) == {node.threads_per_core}
        if per_node == "numa":
            assert len(r.numa(node)) == 1
    # the whole node is used, no core twice
    assert sum(len(r.cores) for r in first) == node.physical_cores


@pytest.mark.parametrize("nodes", [64, 256])
@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_site_options_are_accepted_at_scale(tmp_path, nodes, launcher):
    ssh = tmp_path / "ssh_config"
    ssh.write_text("Host *\n  BatchMode yes\n")
    transport = "ucx" if launcher == "mpirun" else "tcp"  # horovodrun --mpi forces TCP (refused with ucx)
    mpi_args = ("--mca", "pml", "ucx") if launcher == "mpirun" else ("--mca", "btl", "^openib")
    cl = cluster_for("spr", transport=transport, mpi_args=mpi_args, ssh_config=str(ssh), network_interface="ib0")
    lay = plan_layout("train", hosts(nodes, 2), cl, node_topology(cl))
    cmd = build_command(LaunchSpec("train", lay, config="c.yaml", cluster=cl, launcher=launcher), environ={}, uid=0)
    result = mapview.open_mpi_map(cmd, cl)  # raises MapRefused when mpirun refuses the line
    assert len(result.nodes) == nodes and mapview.check(result, lay) == []
    line = result.argv
    names = [line[i + 1] for i, a in enumerate(line) if a in ("--mca", "-mca")]
    assert len(names) == len(set(names)), names  # no parameter twice
    if launcher == "mpirun":
        assert mca_params(line)["pml"] == "ucx" and mca_params(line)["plm_rsh_args"] == f"-F {ssh}"


def test_a_duplicated_parameter_is_reported_as_mpirun_refuses_it():
    cl = cluster_for("n16", mpi_args=("--mca", "pml", "ob1"))
    lay = plan_layout("train", hosts(2, 1), cl, node_topology(cl))
    cmd = build_command(LaunchSpec("train", lay, config="c.yaml", cluster=cl, launcher="mpirun"), environ={}, uid=0)
    cmd.argv[1:1] = ["--mca", "pml", "ucx"]  # what the old glue did: a parameter twice
    cmd.launcher_argc += 3
    with pytest.raises(mapview.MapRefused, match="listed once"):
        mapview.open_mpi_map(cmd, cl)


def test_render_folds_nodes_bound_alike():
    cl = cluster_for("spr")
    lay = plan_layout("train", hosts(64, 2), cl, node_topology(cl))
    cmd = build_command(LaunchSpec("train", lay, config="c.yaml", cluster=cl, launcher="mpirun"), environ={}, uid=0)
    lines = mapview.render(mapview.open_mpi_map(cmd, cl), lay.node)
    assert lines[1].startswith("  cn001 rank 0: cores 0-55 (socket 0, NUMA 0, 56 cores x 2 hw threads); 56 intra-op")
    assert lines[2].startswith("  cn001 rank 1: cores 56-111 (socket 1, NUMA 1,")
    assert lines[3] == "  63 more nodes (cn002 .. cn064): bound alike" and len(lines) == 4


def test_planned_map_where_open_mpi_cannot_be_asked():
    cl = cluster_for("spr", mpi="intelmpi")
    lay = plan_layout("train", hosts(2, 2), cl, node_topology(cl))
    cmd = build_command(LaunchSpec("train", lay, config="c.yaml", cluster=cl, launcher="mpirun"), environ={}, uid=0)
    result, refused = mapview.rank_map(cmd, cl)
    assert result.source.startswith("the project's plan (Open MPI's mapper not asked: mpi: intelmpi")
    assert not refused and mapview.check(result, lay) == []


def test_synthetic_description():
    assert mapview.synthetic(Topology(sockets=2, physical_cores=192, logical_cpus=384, numa_nodes=8)) == \
        "pack:2 numa:4 core:24 pu:2"
    assert mapview.sim_names(4) == ["nodeA0", "nodeA1", "nodeA2", "nodeA3"] and mapview.sim_names(256)[-1] == "nodeA255"
