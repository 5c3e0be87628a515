VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: install test test-fast demo demo-inst claim notebook bench gpu-wheels gpu-check gpu-check-dry lint clean

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

# the instance-segmentation demo: tiny Co-DINO-Inst on the same shapes, box and mask AP (CPU, ~10 min)
demo-inst:
	$(PY) -m codetr.train experiment=demo_inst

# The paper's claim in miniature: each detector with and without its auxiliary branches, 3 seeds, AP per epoch ->
# outputs/claim/<budget>/claim.{md,json,png} (README "Demo"). Options: CLAIM_ARGS="select=[co_dino] epochs=3 ...".
claim:
	$(PY) -m codetr.claim $(CLAIM_ARGS)

# Execute a copy of notebooks/demo.ipynb into outputs/notebooks/ (needs a finished `make demo` run under
# outputs/demo/); the tracked notebook is not rewritten.
NOTEBOOK_OUT ?= outputs/notebooks
notebook:
	mkdir -p $(NOTEBOOK_OUT)
	$(PY) -c "import nbformat, nbclient; nb = nbformat.read('notebooks/demo.ipynb', 4); \
	nbclient.NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': 'notebooks'}}).execute(); \
	nbformat.write(nb, '$(NOTEBOOK_OUT)/demo.ipynb')"
	@echo "executed copy: $(NOTEBOOK_OUT)/demo.ipynb"

bench:
	$(PY) -m codetr.bench

# GPU evidence (docs/performance.md, "GPU check"). gpu-wheels: the wheels the GPU machine lacks, into .whl/ (carry it along);
# gpu-check: the check (one GPU, under 8 minutes); gpu-check-dry: its CPU rehearsal at tiny sizes (what CI runs).
# The interpreter: this venv's where it exists, else python3 (the GPU machine's). Extra flags: GPU_CHECK_ARGS=...
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)

gpu-wheels:
	PYTHON=$(GPU_PY) bash tools/gpu_wheels.sh

gpu-check:
	PYTHON=$(GPU_PY) bash tools/gpu_check.sh $(GPU_CHECK_ARGS)

gpu-check-dry:
	PYTHON=$(GPU_PY) bash tools/gpu_check.sh --dry-run $(GPU_CHECK_ARGS)

lint:
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf outputs multirun .pytest_cache bench/results
