# Entry points. Every target installs what it needs (virtualenv and test-bed binaries are
# cached under ~/.cache/lmmr1, so only the first run on a machine is slow).
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV = $(shell bash scripts/venv.sh $(EXTRAS) | tail -n1)
EXTRAS ?= dev,operator,verifier,trainer
PY = $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)/testbed

.PHONY: help venv testbed cluster-up cluster-down test test-unit test-integration lint format demo bench crds generate lock

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

venv: ## create/update the cached virtualenv
	@echo $(VENV)

testbed: ## build (or reuse) the test-bed binaries from pinned Go modules
	bash testbed/build.sh

cluster-up: ## start the test bed in the background (kubeconfig: .testbed/kubeconfig)
	$(PY) -m lmmr1_testbed up

cluster-down: ## stop the test bed
	$(PY) -m lmmr1_testbed down

test: ## every test: unit, then integration on the real test bed
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: ## unit tests only (no test bed)
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

test-integration: ## integration tests only
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

lint: ## ruff (lint + format check) and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile trainer_image/Dockerfile trainer_image/Dockerfile.cpu

format: ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: ## the whole product end to end on this machine (FRE then MGT); KEEP=1 keeps the test bed
	DS_ACCELERATOR=cpu $(PY) -m lmmr1_testbed.demo

# The trainer bench's baseline, TRL, comes with the `bench` extra (not in CI's extras).
# The benchmarks (bench/lmmr1_bench) ship in no image: they run from the clone.
bench: EXTRAS = dev,operator,verifier,trainer,bench
bench: PYTHONPATH := $(CURDIR)/testbed:$(CURDIR)/bench
bench: ## test bed (warm start, memory), operator at 50/200/1,000 runs and beside a hanging S3 endpoint, verifier, trainer vs TRL; into docs/benchmarks.md
	$(PY) -m lmmr1_testbed.bench
	$(PY) -m lmmr1_testbed.bench_operator 50 200 --idle 1000
	$(PY) -m lmmr1_testbed.bench_bad_input 20
	$(PY) -m lmmr1_bench.verifier
	$(PY) -m lmmr1_bench.logprob_memory
	DS_ACCELERATOR=cpu $(PY) -m lmmr1_bench.trainer

crds: ## generate the LMMR1Run CRD (manifests/ and the chart) and docs/api.md from the pydantic models
	$(PY) -m lmmr1_operator.api.crd

generate: crds ## every generated file: CRD, manifests/ rendered from the chart
	bash scripts/render_manifests.sh "$$(bash testbed/build.sh | tail -n1)/helm"

# No virtualenv needed: scripts/lock.py finds uv (or installs it into the cache).
lock: ## re-pin every image's dependencies from pyproject.toml: requirements/{operator,trainer-gpu,trainer-cpu}.txt
	python3 scripts/lock.py $(if $(UPGRADE),--upgrade)
