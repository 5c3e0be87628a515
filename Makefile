VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: install test test-fast demo notebook bench lint clean

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

# Execute notebooks/demo.ipynb in place (needs a finished `make demo` run under outputs/demo/).
notebook:
	cd notebooks && ../$(PY) -c "import nbformat, nbclient; nb = nbformat.read('demo.ipynb', 4); \
	nbclient.NotebookClient(nb, timeout=600, kernel_name='python3').execute(); nbformat.write(nb, 'demo.ipynb')"

bench:
	$(PY) -m codetr.bench

lint:
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf outputs multirun .pytest_cache bench/results
