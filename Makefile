# Two commands for a fresh machine with Python 3.11+: `make demo` and `make test`.
# Both create .venv and install what is missing first.
#
# CPU-only machine: the default torch spec takes the CPU wheel where one is on the pip index
# path; elsewhere point pip at PyTorch's CPU index:
#     make test TORCH_INDEX=https://download.pytorch.org/whl/cpu

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch the tests and the recorded timings ran with (the current release); any torch>=2.3
# works: make test TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_DIR ?= outputs/demo
STAMP := $(VENV)/.installed

.PHONY: install test test-fast check-extra demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || \
	  $(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# One pytest worker per core (the tests are mostly single-threaded: process starts, tiny
# models); a module's tests stay on one worker, which builds its fixtures once.
PYTEST := $(PY) -m pytest -q -n auto --dist loadscope

test: install
	$(PYTEST) -m "not extra" --durations=15

# Everything but the tests marked slow.
test-fast: install
	$(PYTEST) -m "not extra and not slow"

# Benchmark smoke runs, the wheel build, DDP through the command line and the SLURM cluster's
# sweeps (skipped without scripts/local_slurm.sh's cluster); CI runs it after `make test`.
check-extra: install
	$(PYTEST) -m extra --durations=5

demo: install
	$(PY) -m prostate_seg synthetic output_dir=$(DEMO_DIR)/phantoms num_patients=16 size=96 \
	  overwrite=true
	$(PY) -m prostate_seg prepare input_dir=$(DEMO_DIR)/phantoms output_dir=$(DEMO_DIR)/prepared \
	  image_size=64 overwrite=true
	$(PY) train.py -m experiment=demo data.dir=$(DEMO_DIR)/prepared loss.alpha=0.25,0.5,0.75

clean:
	rm -rf $(VENV) outputs .pytest_cache
