# glare-nat: the README's two commands are `make demo` and `make test`; both set everything up first.
# Install order (encoded only here): torch -> basicsr without build isolation -> this project.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.glare-nat-installed
# One thread: on a 2-core box OpenMP spin contention with any other busy process makes tiny-op training
# erratically 10x slower with 2 threads (measured: 0.67 s/step with 1 thread vs 1-8.6 s with 2 for the stage-III demo).
export OMP_NUM_THREADS ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: install demo study test test-fast lint format clean-demo clean-study

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt --no-build-isolation basicsr==1.4.2
	$(PIP) install -q -c constraints.txt --no-build-isolation -e '.[dev]'
	@touch $(STAMP)

demo: install
	$(PY) scripts/run_demo.py

# The proxy study (README "Does the NAT help?"): every stage at a CPU-sized proxy, about an hour on 2 cores.
study: install
	$(PY) scripts/run_study.py

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean-demo:
	rm -rf datasets/demo_lol experiments/demo_* results/demo*

clean-study:
	rm -rf datasets/study_lol experiments/study_* results/study*
