# The two commands of the README:  make demo  and  make test.  Both set up everything they need.
# make test-fast: the tests that need neither the SLURM cluster nor several processes nor subprocess training.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.hpckd-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYS_PKGS := openmpi-bin libopenmpi-dev slurm-wlm munge slurmdbd mariadb-server mariadb-client
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint venv sysdeps clean-demo help

help:
	@echo "make demo   - install into $(VENV) and run the embedded demo: a mini attention study on scikit-learn's digits, ending in report.html"
	@echo "make test   - install, ruff check, start a local SLURM cluster, run the test suite, stop the cluster"
	@echo "make test-fast - install, ruff check, run the tests not marked slurm/dist/slow (no cluster, no apt)"

venv: $(STAMP)

# torch/torchvision first from the registry (their CUDA builds also run on CPU; the CPU-only torch wheel
# breaks torchvision), then hpckd and its extras, then DeepSpeed (which builds against the installed torch).
$(STAMP): setup.py constraints.txt
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt -e ".[dali,mpi,test]"
	$(PIP) install -q -c constraints.txt --no-build-isolation deepspeed
	touch $(STAMP)

# System parts the tests need: OpenMPI for the mpirun path, SLURM + munge + slurmdbd + MariaDB for the cluster.
sysdeps:
	@missing=$$(for p in $(SYS_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages: $$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: $(STAMP)
	$(VENV)/bin/hpckd demo --out $(DEMO_OUT)

# ruff reads its settings from pyproject.toml ([tool.ruff]).
lint: $(STAMP)
	$(VENV)/bin/ruff check hpckd tests benchmarks launchers

# with_cluster.sh starts slurmctld/slurmd/slurmdbd/munged/mariadb, runs pytest, and stops every daemon it
# started (by PID) whatever pytest's outcome.
test: lint sysdeps
	PATH="$(abspath $(VENV))/bin:$$PATH" bash slurm/with_cluster.sh $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests

# The markers are declared in pyproject.toml. No cluster is started and no system package is installed.
test-fast: lint
	$(PY) -m pytest -q -p no:cacheprovider -m "not slurm and not dist and not slow" $(PYTEST_ARGS) tests

clean-demo:
	rm -rf $(DEMO_OUT)
