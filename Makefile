# The two commands a user needs: `make demo` and `make test`. Both create or refresh .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-fast lint format bench gpu-wheels lock clean

# -qq: pip's errors only (its warnings about index locations, and setuptools' notice about
# editable installs, are not this project's business on every `make`).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip setuptools wheel
	$(PY) -m pip install -qq -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) -m launch.demo

test: venv
	$(PY) -m pytest

test-fast: venv  ## everything except tests marked slow
	$(PY) -m pytest -m "not slow"

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: venv
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: venv  ## every benchmark script; JSON under benchmarks/results/ (see benchmarks/README.md)
	$(PY) benchmarks/cdgc_module.py --json benchmarks/results/cdgc_module.json
	$(PY) benchmarks/cdgc_scaling.py --json benchmarks/results/cdgc_scaling.json
	$(PY) benchmarks/train_step.py --json benchmarks/results/train_step.json
	$(PY) benchmarks/inference.py --json benchmarks/results/inference.json
	$(PY) benchmarks/ohem_loss.py --json benchmarks/results/ohem_loss.json
	$(PY) benchmarks/deepspeed_stages.py --json benchmarks/results/deepspeed_stages.json
	$(PY) benchmarks/data_pipeline.py --json benchmarks/results/data_pipeline.json

gpu-wheels: venv  ## DeepSpeed, WebDataset and their needs as Python 3.12 manylinux wheels in .whl/ (the GPU lease carries them; benchmarks/README.md)
	$(PY) -m lease --build-wheels .whl

lock: venv  ## re-pin constraints.txt from the current .venv
	$(PY) -m pip freeze --exclude-editable | sed -E 's/^(torch==[0-9.]+)\+[a-z0-9]+/\1/' > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
