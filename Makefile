# The two commands of README.md: `make repro` and `make test`. Both create or refresh .venv first.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Python writes each module's bytecode on first import, even where the machine sets
# PYTHONDONTWRITEBYTECODE: otherwise every stage compiles its imports again (importing stages.train and
# stages.evaluate: 28 s the first time, 12 s once the bytecode is written).
export PYTHONDONTWRITEBYTECODE :=

.PHONY: setup setup-dev repro test test-fast lint format bench clean-data serve ui label-studio label-studio-stop

# Installs: pip for torch (it honours the machine's pip configuration: find-links to a local wheel),
# uv for the rest (the same 298 packages at the same versions as pip's resolution, fetched and unpacked
# in parallel). Nothing is byte-compiled here: Python writes each module's bytecode when it is first
# imported (above), so only what the stages use is compiled. benchmarks/bench_setup.sh, 2 cores: a fresh
# venv 138 s with pip and `compileall -j 0` -> 34 s (a cold uv cache); the 16 stages' first imports
# 43 s -> 56 s; the two together 181 s -> 90 s.
UV := $(VENV)/bin/uv pip install -q --python $(PY)
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-compile 'uv==0.13.9' 'torch==2.13.0'
	$(UV) -e .
	@touch $(STAMP)

# the test tools (pytest, ruff, moto, scikit-image): only `make test` and the linters need them
$(DEV_STAMP): $(STAMP)
	$(UV) -e '.[dev]'
	@touch $(DEV_STAMP)

setup: $(STAMP)

setup-dev: $(DEV_STAMP)

repro: setup
	dvc repro

test: setup-dev
	REFFACE_PROGRESS=0 pytest -q

test-fast: setup-dev
	REFFACE_PROGRESS=0 pytest -q -m "not slow"

lint: setup-dev
	ruff check . && ruff format --check .

format: setup-dev
	ruff check --fix . && ruff format .

bench: setup
	python benchmarks/bench_synthetic.py && python benchmarks/bench_shards.py && python benchmarks/bench_degradations.py && python benchmarks/bench_model.py && python benchmarks/bench_train.py && python benchmarks/bench_annotation.py

clean-data:
	rm -rf data metrics plots

# Servers, with .venv/bin on PATH (exported above): `mlflow models serve` execs `uvicorn` from PATH,
# and the stages and annotation.server run `python`. Override e.g. `make serve MODEL=... PORT=...`.
MODEL      ?= models:/refface@champion
SERVE_HOST ?= 127.0.0.1
PORT       ?= 5001
UI_PORT    ?= 5000
LS_PORT    ?= 8080

serve: setup
	mlflow models serve -m "$(MODEL)" --env-manager local -h $(SERVE_HOST) -p $(PORT)

ui: setup
	mlflow ui --backend-store-uri sqlite:///mlflow.db -h $(SERVE_HOST) -p $(UI_PORT)

label-studio: setup
	python -m annotation.server start --port $(LS_PORT)

label-studio-stop: setup
	python -m annotation.server stop
