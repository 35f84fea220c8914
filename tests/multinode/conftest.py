"""A virtual cluster for the multi-node tests: two namespace nodes with sshd (launch.vcluster).

Cluster id 3 (``CXR_VCLUSTER_TEST_ID`` overrides), so a user's cluster 0 is never touched. It is
made once per module and always removed (finally, and atexit for an interrupted run); a later
``up`` of the same id also clears what a killed test run left. Without root or ``ip netns`` every
test here is skipped with the one-sentence reason (shown by pytest's ``-rs``).
"""
import atexit
import sys

import pytest
from cluster_tools import CLUSTER_ID, tiny_dataset

from launch import vcluster


@pytest.fixture(scope="session")
def cluster_available():
    why = vcluster.unavailable_reason()
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def cluster(cluster_available, tmp_path_factory):
    """A 2-node cluster (1 slot each) for this module; removed afterwards whatever happened."""
    folder = tmp_path_factory.mktemp("vcluster") / f"c{CLUSTER_ID}"
    undo = lambda: vcluster.down(folder, CLUSTER_ID, quiet=True)  # noqa: E731
    atexit.register(undo)
    try:
        yield vcluster.up(nodes=2, slots=1, folder=folder, python=sys.executable, cluster_id=CLUSTER_ID,
                          log=lambda m: None)
    finally:
        undo()
        atexit.unregister(undo)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A tiny generated data set (32 px) and a config training the tiny backbone for 4 short epochs."""
    base = tmp_path_factory.mktemp("multinode")
    tiny_dataset(base, seed=5)
    return base
