# The two commands of README.md: `make repro` and `make test`. Both create or refresh .venv first.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup setup-dev repro test test-fast lint format bench clean-data serve ui label-studio label-studio-stop

# pip byte-compiles one file at a time; compileall -j 0 does the same on every core (half the time on
# two). Like pip, it leaves the few files it cannot compile (py3.12-only sources in torch's tests).
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-compile 'torch==2.13.0'
	$(PY) -m pip install -q --no-compile -e .
	$(PY) -m compileall -qq -j 0 $(VENV)/lib || true
	@touch $(STAMP)

# the test tools (pytest, ruff, moto, scikit-image): only `make test` and the linters need them
$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-compile -e '.[dev]'
	$(PY) -m compileall -qq -j 0 $(VENV)/lib || true
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
