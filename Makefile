# glare-nat: the README's two commands are `make demo` and `make test`; both set everything up first.
# Install order (encoded only here): torch -> basicsr without build isolation -> this project.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.glare-nat-installed
export OMP_NUM_THREADS ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast lint format clean-demo

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt --no-build-isolation basicsr==1.4.2
	$(PIP) install -q -c constraints.txt --no-build-isolation -e '.[dev]'
	@touch $(STAMP)

demo: install
	$(PY) scripts/run_demo.py

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean-demo:
	rm -rf datasets/demo_lol experiments/demo_* results/demo*
