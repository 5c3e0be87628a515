VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: install test test-fast demo bench lint clean

install:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"

test:
	$(PY) -m pytest -q tests

test-fast:
	$(PY) -m pytest -q -m "not slow" tests

demo:
	$(PY) -m codetr.train experiment=demo

bench:
	$(PY) -m codetr.bench

lint:
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf outputs multirun .pytest_cache bench/results
