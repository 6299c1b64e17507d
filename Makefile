# The two commands of README.md: `make repro` and `make test`. Both create or refresh .venv first.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup repro test test-fast lint format bench clean-data serve ui label-studio label-studio-stop

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
