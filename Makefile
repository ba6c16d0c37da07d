# `make test` and `make demo` create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo bench clean

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

setup: $(VENV)/.test

test: $(VENV)/.test
	$(PY) -m pytest -q tests

demo: $(VENV)/.runtime
	$(PY) -m research.train --config configs/decoder.py:tiny --workdir workdirs/demo

bench: $(VENV)/.runtime
	$(PY) -m research.bench train --config configs/decoder.py:nanogpt_cpu

clean:
	rm -rf $(VENV) workdirs
