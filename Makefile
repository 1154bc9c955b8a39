# Two commands for a fresh machine:
#   make demo   set up, then run the whole pipeline on generated data (local Ray, local disk)
#   make test   set up, then run the test suite
# and for the inner loop:
#   make test-fast   the suite without the multi-process, multi-node, kill and long tests (README: Tests)
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export DS_ACCELERATOR := cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup lint test test-fast demo bench clean
setup:
	VENV=$(VENV) bash launch/setup_env.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# pytest-xdist: PYTEST_WORKERS processes, each given whole test files (a module's fixtures are made once), the
# heaviest files first (tests/conftest.py);
# PYTEST_WORKERS=0 runs the suite in this one process
PYTEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),-p no:xdist,-n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder)
test: lint
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

# the fast tier: the markers are described in setup.cfg; a fixture can mark its users (tests/support/tiers.py)
FAST_TESTS := not slow and not ray and not deepspeed and not ranks and not gpu
test-fast: lint
	$(PY) -m pytest -q $(XDIST) -m "$(FAST_TESTS)" $(PYTEST_ARGS)

demo: setup
	$(PY) -m launch.demo --out demo_out $(DEMO_ARGS)

bench: setup
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	$(PY) bench/storage.py
	$(PY) bench/attention.py --quick
	$(PY) bench/preprocess.py --quick
	$(PY) bench/loader.py

clean:
	rm -rf demo_out runs .cache
