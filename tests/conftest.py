import functools
import os
import shutil
import subprocess
import sys
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


MISSING = {
    "needs_mpirun": (have_mpirun, "mpirun (Open MPI) not installed"),
    "needs_horovod": (have_horovod, "Horovod with TensorFlow and MPI not built (make setup)"),
}


def pytest_runtest_setup(item):
    """Tests marked needs_mpirun / needs_horovod skip without it, and fail under CI=true."""
    for marker, (available, reason) in MISSING.items():
        if item.get_closest_marker(marker) and not available():
            if IN_CI:
                pytest.fail(f"{reason}, and CI=true expects it", pytrace=False)
            pytest.skip(reason)
