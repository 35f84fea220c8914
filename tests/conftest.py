import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# Multi-process tests start mpirun/horovodrun from the same venv as pytest.
VENV_BIN = str(Path(sys.executable).parent)
if VENV_BIN not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = VENV_BIN + os.pathsep + os.environ.get("PATH", "")
# Open MPI refuses to start as root without these; CI runs as root.
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# runtime.precision auto caches its calibration (distributed/precision_probe.py): in a folder of this test
# session (inherited by the commands the tests start), not in the user's ~/.cache.
os.environ.setdefault("CXR_CACHE_DIR", tempfile.mkdtemp(prefix="cxr-test-cache-"))


@pytest.fixture(scope="session")
def root():
    return ROOT


@pytest.fixture(scope="session")
def fixtures():
    return FIXTURES


# CI (CI=true, set by CI services) builds everything (`make test`): there a missing mpirun or
# Horovod is a broken set-up, so the tests that need them fail instead of skipping.
IN_CI = os.environ.get("CI", "").lower() == "true"


def have_mpirun() -> bool:
    return shutil.which("mpirun") is not None


@functools.cache
def have_horovod() -> bool:
    """horovodrun on PATH and Horovod importable with TensorFlow and MPI built in, what `make
    setup` checks (in a subprocess: importing TensorFlow here would slow every test run)."""
    if shutil.which("horovodrun") is None:
        return False
    code = "import horovod.tensorflow as h, horovod.tensorflow.keras; assert h.mpi_built()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300).returncode == 0


def have_mlflow() -> bool:
    """MLflow, the optional extra of experiment tracking (requirements-tracking.txt, which `make setup` installs)."""
    import importlib.util

    return importlib.util.find_spec("mlflow") is not None


MISSING = {
    "needs_mpirun": (have_mpirun, "mpirun (Open MPI) not installed"),
    "needs_horovod": (have_horovod, "Horovod with TensorFlow and MPI not built (make setup)"),
    "needs_mlflow": (have_mlflow, "MLflow not installed (pip install -r requirements-tracking.txt)"),
}


MULTINODE = ROOT / "tests" / "multinode"


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (its worker hook is registered after this file)
def pytest_collection_modifyitems(config, items):
    """``make test`` runs two pytest-xdist workers (``--dist loadgroup``): a module's tests stay on
    one worker, so its module fixtures (a prepared data set, a reference run) are made once; all of
    tests/multinode form one group, since its modules share one virtual cluster id, /etc/hosts and a
    Slurm, and it goes first, as the longest group (``--no-loadscope-reorder`` keeps this order).
    Without ``-n`` the marks do nothing and only the order changes."""
    def multinode(item) -> bool:
        return MULTINODE in Path(item.fspath).parents

    items.sort(key=lambda item: not multinode(item))  # stable: the order within each part is kept
    for item in items:
        group = "multinode" if multinode(item) else Path(item.fspath).relative_to(ROOT).as_posix()
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_runtest_setup(item):
    """Tests marked needs_mpirun / needs_horovod / needs_mlflow skip without it, and fail under CI=true."""
    for marker, (available, reason) in MISSING.items():
        if item.get_closest_marker(marker) and not available():
            if IN_CI:
                pytest.fail(f"{reason}, and CI=true expects it", pytrace=False)
            pytest.skip(reason)


class OddImages:
    """``add(data)``: one image of each kind that is not an 8-bit square grayscale PNG (and its CSV
    row) added to a generated data set; ``expected``: the ``converted`` entries the manifest must
    list for them, sorted by image."""

    @staticmethod
    def add(data: Path) -> None:
        _add_odd_images(data)

    expected = [
        {"image": "99990006_000.png", "kind": "mode", "from": "RGBA", "action": "converted to 8-bit gray"},
        {"image": "99990007_000.png", "kind": "bit depth", "from": "I;16",
         "action": "16-bit values scaled to 8 bit by their own min..max"},
        {"image": "99990009_000.png", "kind": "format", "from": "JPEG content", "action": "decoded by content"},
        {"image": "99990010_000.png", "kind": "aspect", "from": "256x128", "action": "resized, aspect 2.00 -> 1.00"},
    ]


@pytest.fixture(scope="session")
def odd_images():
    return OddImages


def _add_odd_images(data: Path) -> None:
    import numpy as np
    from PIL import Image

    g = np.asarray(Image.open(FIXTURES / "00000001_000.png").convert("L"))
    img, rest = data / "images", ",0.143,0.143"
    Image.fromarray(np.dstack([g, g, g, np.full_like(g, 255)]), "RGBA").save(img / "99990006_000.png")
    Image.fromarray((g.astype(np.uint16) * 200 + 1000)).save(img / "99990007_000.png")  # 16-bit gray
    Image.fromarray(g).save(img / "99990009_000.png", format="JPEG", quality=90)  # JPEG under a .png name
    Image.fromarray(g).resize((256, 128)).save(img / "99990010_000.png")  # 2:1
    h, w = g.shape
    csv = data / "Data_Entry_2017.csv"
    csv.write_text(csv.read_text().rstrip("\n") + "\n" + "\n".join([
        f"99990006_000.png,Infiltration,0,99990006,33,F,PA,{w},{h}" + rest,
        f"99990007_000.png,No Finding,0,99990007,33,F,PA,{w},{h}" + rest,
        f"99990009_000.png,Infiltration,0,99990009,51,M,AP,{w},{h}" + rest,
        "99990010_000.png,No Finding,0,99990010,62,F,PA,256,128" + rest]) + "\n")


def _write_fake_sysfs(root: Path, sockets: int, cores: int, threads: int, numa: int) -> Path:
    """A /sys tree of ``sockets`` x ``cores`` cores x ``threads`` hardware threads and ``numa`` NUMA nodes;
    CPU ``t * sockets * cores + i`` is hardware thread ``t`` of core ``i`` (Linux's numbering of siblings)."""
    cpu_root = root / "devices/system/cpu"
    n = sockets * cores
    cpu_root.mkdir(parents=True)
    (cpu_root / "online").write_text(f"0-{n * threads - 1}\n")
    for t in range(threads):
        for i in range(n):
            topo = cpu_root / f"cpu{t * n + i}/topology"
            topo.mkdir(parents=True)
            (topo / "physical_package_id").write_text(f"{i // cores}\n")
            (topo / "core_id").write_text(f"{i % cores}\n")
    for k in range(numa):
        (root / f"devices/system/node/node{k}").mkdir(parents=True)
    return root


@pytest.fixture(scope="session")
def fake_sysfs():
    """Writes a fabricated /sys tree (stands for a node this machine is not): ``fake_sysfs(root, sockets,
    cores, threads, numa)``."""
    return _write_fake_sysfs


@pytest.fixture()
def cxr_log():
    """Messages of the project's logger from a level on: ``got = cxr_log(logging.WARNING)`` fills ``got``
    until the test ends."""
    import logging

    from data_prep.log import get_logger

    logger, handlers = get_logger(), []

    def capture(level: int) -> list[str]:
        got: list[str] = []

        class Handler(logging.Handler):
            def emit(self, record):
                got.append(record.getMessage())

        handlers.append(Handler(level))
        logger.addHandler(handlers[-1])
        return got

    yield capture
    for h in handlers:
        logger.removeHandler(h)
