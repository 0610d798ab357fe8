# paploss: the two commands a new user needs are `make run` and `make test`.
# Everything installs itself into .venv/ at the repo root on first use.

SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?= demo
TEST_JOBS ?= 2
IMAGE ?= paploss:latest
HOST ?=
MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
export MLFLOW_TRACKING_URI

.PHONY: install run test test-fast ui compile submit bench bench-controller bench-search bench-table1 docs-figure image lock clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev,mmdet]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install paploss with its test tools

run: install  ## the main job: a real search on the bundled dataset through kfp.local (PRESET=demo|smoke|quick|paper)
	$(BIN)/paploss run --preset $(PRESET)

test: install  ## the whole test suite, slow end-to-end tests included (TEST_JOBS=2 worker processes)
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist worksteal

test-fast: install  ## the test suite without the slow end-to-end tests
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist worksteal -m "not slow"

ui: install  ## MLflow UI on the local store
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --port 5000

compile: install  ## write build/search_pipeline.yaml (IMAGE=... sets the components' image)
	$(BIN)/paploss compile --image $(IMAGE) --out build/search_pipeline.yaml

submit: compile  ## submit the compiled pipeline to HOST (a Kubeflow Pipelines endpoint)
	$(BIN)/paploss submit --host $(HOST) --package build/search_pipeline.yaml

bench: install  ## micro-benchmarks (loss, training step); results go to BENCHMARKS.md by hand (`python -m bench` lists every tool)
	$(BIN)/python -m bench.loss
	$(BIN)/python -m bench.train_step

bench-controller: install  ## the PPO controller on a toy reward (how close it gets to the optimum)
	$(BIN)/python -m bench.toy_search

bench-search: install  ## the search-quality benchmark of BENCHMARKS.md (long: about 2 hours on 2 CPU cores)
	$(BIN)/python -m bench.search --out runs/bench-search

bench-table1: install  ## Table 1 and Figure 1 on shapes for the three detectors (BENCHMARKS.md; about an hour on 2 idle CPU cores)
	$(BIN)/python -m bench.table1 --preset medium --work runs/table1-medium --out runs/table1

docs-figure: install  ## redraw docs/pipeline.png from the compiled pipeline (after changing the pipeline)
	$(BIN)/python docs/pipeline_figure.py

lock: install  ## refresh the images' pinned requirements from pyproject.toml (run after changing dependencies)
	$(BIN)/python docker/make_lock.py

image:  ## build the CPU and CUDA images (needs Docker with BuildKit, the default since 23)
	docker build -f docker/Dockerfile.cpu -t $(IMAGE) .
	docker build -f docker/Dockerfile.cuda -t $(IMAGE:latest=cuda) .

clean:  ## remove local runs (keeps .venv)
	rm -rf build runs local_outputs mlflow.db mlartifacts
