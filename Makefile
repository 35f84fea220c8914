# Two commands set up a fresh Debian machine: `make demo` and `make test`.
# Every target is idempotent: a second run reinstalls nothing and never rebuilds Horovod.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
HOROVOD_VERSION := 0.28.1
# Tests and demo use every local core by default; override e.g. `make test PYTEST_ARGS=-x`.
PYTEST_ARGS ?=
# pytest-xdist workers (0: one process): while one test waits on a launcher, a sleep-slowed step or
# Slurm, the other worker computes. tests/conftest.py keeps a module, and all of tests/multinode, on one worker.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder
DEMO_DIR ?= demo-output

NODES ?= 2

.PHONY: setup mpi vcluster-deps vcluster-up vcluster-down slurm-deps venv deps horovod check-build lint test test-unit test-parallel test-e2e demo bench clean

setup: check-build vcluster-deps

# Open MPI from Debian, only when mpirun is missing (root on these machines; sudo elsewhere), and
# hwloc's lstopo-no-graphics: `launch plan` and the mapper tests describe simulated nodes with it.
mpi:
	@if ! command -v mpirun >/dev/null 2>&1 || ! command -v mpicc >/dev/null 2>&1 || ! command -v lstopo-no-graphics >/dev/null 2>&1; then \
	  echo ">> installing Open MPI and hwloc (openmpi-bin libopenmpi-dev hwloc)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq openmpi-bin libopenmpi-dev hwloc >/dev/null; \
	else echo ">> Open MPI present: $$(mpirun --version 2>&1 | head -1); $$(lstopo-no-graphics --version)"; fi

# sshd (Debian's openssh-server) and ip for the virtual cluster of the multi-node tests, only when
# missing and only as root (the tests need root for network namespaces and skip without it).
vcluster-deps:
	@if [ "$$(id -u)" != 0 ]; then echo ">> not root: the multi-node tests will be skipped (no sshd installed)"; \
	elif [ ! -x /usr/sbin/sshd ] || ! command -v ip >/dev/null 2>&1; then \
	  echo ">> installing openssh-server iproute2 (virtual cluster of tests/multinode)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server iproute2 >/dev/null; \
	else echo ">> sshd present: $$(/usr/sbin/sshd -V 2>&1 | head -1)"; fi

# A virtual cluster of $(NODES) network-namespace nodes on this machine (root) to rehearse a
# multi-node run: cluster file /run/cxr-vcluster-0/cluster.yaml (docs/cluster-guide.md: "Rehearse a multi-node run").
vcluster-up: setup
	$(PY) -m launch vcluster up --nodes $(NODES)

vcluster-down:
	$(PY) -m launch vcluster down

# Slurm and munge from Debian for the real-Slurm tests (tests/multinode/test_slurm.py, launch/vslurm.py),
# only where they are missing and only as root (the tests need root for their namespace nodes anyway).
# Debian's package scripts do not start the daemons in containers (policy-rc.d); the tests start their own.
slurm-deps:
	@if command -v sbatch >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then \
	  echo ">> Slurm present: $$(slurmd -V 2>&1 | head -1)"; \
	elif [ "$$(id -u)" != 0 ]; then echo ">> Slurm missing and not root: the real-Slurm tests will be skipped"; \
	else echo ">> installing Slurm (slurmctld slurmd slurm-client munge)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    slurmctld slurmd slurm-client munge >/dev/null; fi

$(PY):
	$(PYTHON) -m venv $(VENV)

venv: $(PY)

# Re-run pip only when requirements.txt changed (the stamp is newer otherwise).
$(VENV)/.deps-stamp: requirements.txt | $(PY)
	$(PIP) install -q -r requirements.txt
	touch $@

# ONNX export and its check (requirements-onnx.txt says why --no-deps).
$(VENV)/.onnx-stamp: requirements-onnx.txt $(VENV)/.deps-stamp
	$(PIP) install -q --no-deps -r requirements-onnx.txt
	touch $@

# Experiment tracking with MLflow (tracking.backend: mlflow; requirements-tracking.txt says why its pins).
$(VENV)/.tracking-stamp: requirements-tracking.txt requirements.txt $(VENV)/.deps-stamp
	$(PIP) install -q -r requirements-tracking.txt
	touch $@

deps: mpi $(VENV)/.deps-stamp $(VENV)/.onnx-stamp $(VENV)/.tracking-stamp

# Horovod 0.28.1 from source against the installed TensorFlow, with MPI and Gloo (about 4 minutes on 2 cores).
$(VENV)/.horovod-stamp: $(VENV)/.deps-stamp $(VENV)/.onnx-stamp
	@if $(PY) -c "import horovod, horovod.tensorflow as h; assert horovod.__version__ == '$(HOROVOD_VERSION)'; assert h.mpi_built() and h.gloo_built()" 2>/dev/null; then \
	  echo ">> horovod $(HOROVOD_VERSION) already built"; \
	else \
	  echo ">> building horovod $(HOROVOD_VERSION) (TensorFlow, MPI, Gloo)"; \
	  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
	  HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS=-j$$(nproc) \
	  $(PIP) install -q --no-build-isolation --no-cache-dir horovod==$(HOROVOD_VERSION) || exit 1; \
	fi
	touch $@

horovod: mpi $(VENV)/.horovod-stamp

$(VENV)/.project-stamp: setup.py requirements.txt $(VENV)/.horovod-stamp $(VENV)/.tracking-stamp
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

# Fails loudly unless horovodrun reports TensorFlow, MPI and Gloo.
check-build: mpi $(VENV)/.project-stamp
	@out=$$(PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/horovodrun --check-build 2>&1); echo "$$out" | sed -n '/Available Frameworks/,$$p'; \
	for want in TensorFlow MPI Gloo; do \
	  echo "$$out" | grep -qE "\[X\] $$want" || { echo "!! horovod build lacks $$want: see above" >&2; exit 1; }; \
	done
	@$(PY) -c "import tensorflow as tf, numpy, horovod; print('>> ok: tensorflow', tf.__version__, 'numpy', numpy.__version__, 'horovod', horovod.__version__)"

# ruff with the project's rules (ruff.toml): make test runs it before the tests.
lint: setup
	$(VENV)/bin/ruff check .

test: setup slurm-deps lint
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-unit: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest tests/unit $(XDIST) $(PYTEST_ARGS)

test-parallel: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest tests/parallel $(XDIST) $(PYTEST_ARGS)

test-e2e: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest tests/e2e $(XDIST) $(PYTEST_ARGS)

# The whole pipeline on a generated (synthetic, not medical) data set with 2 local ranks.
# Rerunning skips what is already complete for the same config.
demo: setup
	@if [ ! -f $(DEMO_DIR)/data/Data_Entry_2017.csv ]; then \
	  $(PY) -m data_prep.synthetic --out $(DEMO_DIR)/data --patients 240 --image-size 128 --seed 0; \
	else echo ">> $(DEMO_DIR)/data exists: reusing the generated data set"; fi
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m launch pipeline --config configs/demo.yaml --np 2
	@echo ">> report: $(CURDIR)/$(DEMO_DIR)/run/report.md"

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build *.egg-info
