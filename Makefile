# The two commands of README.md: `make repro` and `make test`. Both create or refresh .venv first.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup repro test test-fast lint format bench clean-data

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q 'torch==2.13.0'
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

repro: setup
	dvc repro

test: setup
	REFFACE_PROGRESS=0 pytest -q

test-fast: setup
	REFFACE_PROGRESS=0 pytest -q -m "not slow"

lint: setup
	ruff check . && ruff format --check .

format: setup
	ruff check --fix . && ruff format .

bench: setup
	python benchmarks/bench_synthetic.py && python benchmarks/bench_shards.py && python benchmarks/bench_degradations.py && python benchmarks/bench_model.py && python benchmarks/bench_train.py && python benchmarks/bench_annotation.py

clean-data:
	rm -rf data metrics plots
