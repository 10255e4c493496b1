# Two commands matter: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
TEST_STACK := .devenv/test

.PHONY: help install stack lint unit test demo up down status crds clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv with the package and its dev tools
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

stack: install  ## obtain Postgres, Kafka, etcd, kube-apiserver, Prometheus and Helm into the cache
	$(BIN)/python -m devenv install

lint: install  ## ruff, strict mypy and the import-linter layer contracts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: install  ## unit tests only (no services)
	$(BIN)/python -m pytest tests/unit

test: lint stack  ## the whole suite on a local stack of its own, torn down afterwards
	SOMABRAIN_TEST_STACK=$(TEST_STACK) $(BIN)/python -m pytest --junitxml=.devenv/test-results.xml

demo: stack  ## the main job end to end: 3 Tenants, operator, publishers, 10,000 events
	$(BIN)/python -m devenv.demo

up: stack  ## start a stack for development and print its environment
	$(BIN)/python -m devenv up

down: install  ## stop the development stack and delete its data
	$(BIN)/python -m devenv down

status: install  ## show what the development stack runs
	$(BIN)/python -m devenv status

crds: install  ## regenerate crds/, the chart's copy, and the chart's Kopf peering CRD
	$(BIN)/python -m somabrain_operator.crds crds charts/somabrain-operator/files/crds \
	  --peering-dir charts/somabrain-operator/files/peering-crds

clean:  ## remove the virtualenv and local stacks (the cache stays)
	-$(BIN)/python -m devenv down --state-dir $(TEST_STACK) 2>/dev/null
	-$(BIN)/python -m devenv down --state-dir $(TEST_STACK)-chart 2>/dev/null
	-$(BIN)/python -m devenv down 2>/dev/null
	rm -rf $(VENV) .devenv .mypy_cache .ruff_cache .pytest_cache
