# `make test` and `make demo` create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-fast demo bench clean

# The project itself is installed editable (pyproject.toml), so that tests and every worker of
# a multi-host job import the same package without path edits.
$(VENV)/.runtime: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt requirements-bench.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

setup: $(VENV)/.test

# Both tiers: the fast one first (a few minutes), then the end-to-end `slow` runs. Test files run
# in parallel (pytest-xdist), each file on one worker so that its fixtures are built once.
WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(WORKERS) --dist loadfile --durations=15

test: $(VENV)/.test
	$(PYTEST) -m "not slow" tests
	$(PYTEST) -m slow tests

test-fast: $(VENV)/.test
	$(PYTEST) -m "not slow" tests

demo: $(VENV)/.runtime
	$(PY) -m research.train --config configs/decoder.py:tiny --workdir workdirs/demo

bench: $(VENV)/.runtime
	$(PY) -m research.bench train --config configs/decoder.py:nanogpt_cpu

clean:
	rm -rf $(VENV) workdirs
