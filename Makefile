# Quick start: `make demo` (train + test on a synthetic federation) and `make test` (pytest suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo
DEMO_FLAGS ?=  # extra runner flags, e.g. DEMO_FLAGS="--port 9097" when 8097 is taken

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

# Synthetic FAZ-like federation (5 sites), FedICRA on the CPU, then every client's test.
demo: $(STAMP)
	$(PY) -m dataloaders.synthetic --task faz --out $(DEMO_DIR)/data_faz --size 96 \
		--train-per-site 40 --test-per-site 10 --seed 2022
	$(PY) flower_runner.py --config configs/synthetic_faz.toml --mode deployment --overwrite $(DEMO_FLAGS)
	$(PY) test_client.py --client all --exp synthetic_faz/FedICRA --out_root $(DEMO_DIR)/model --no_images
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir $(DEMO_DIR)/model/synthetic_faz/FedICRA/tb"

clean:
	rm -rf $(VENV) $(DEMO_DIR)
