# Quick start: `make demo` (train + test on a synthetic federation) and `make test` (pytest suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo

.PHONY: install test demo clean

install: $(STAMP)

# torch==2.13.0 is tried first: on machines that keep a CPU wheel on local disk this avoids
# pulling a multi-GB CUDA build. Elsewhere the plain dependency in pyproject.toml applies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	-$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest test -q

demo: $(STAMP)
	$(PY) -m dataloaders.demo --out $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR)
