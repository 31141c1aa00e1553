# gemmalab: every target runs inside .venv, which `make setup` (./setup.sh) creates and keeps current.
VENV   ?= .venv
PY     := $(VENV)/bin/python
GL     := $(VENV)/bin/gemmalab
PYTEST_ARGS ?=

.PHONY: setup install test check lint demo benchmark experiments clean

setup:  ## create .venv with every backend this platform runs (idempotent)
	./setup.sh

install: setup  ## (re)install gemmalab itself into .venv, editable
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .

test: setup  ## the whole test suite: conformance on every installed backend, core, CLI
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup  ## ruff over the code
	$(VENV)/bin/ruff check gemmalab backends tests benchmarks experiments

check: lint  ## lint, then gemmalab's own platform and exactness check
	$(GL) check

demo: setup  ## the main job for now: platform and backend check with an exactness self-test, a model's shape
	$(GL) check
	$(GL) info gemma-3-270m

benchmark: setup  ## quick gemmalab bench on every installed backend: a random 270M, prompt 128, generate 32 (full run: gemmalab bench --backend all)
	$(GL) bench --backend all --quick

experiments: setup  ## the interactive menu over the experiment registry (non-interactive: gemmalab experiments list / run NAME)
	$(GL) experiments menu

clean:  ## remove caches and build artefacts (keeps .venv; `rm -rf .venv` for a full reset)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
