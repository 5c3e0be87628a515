#!/usr/bin/env bash
# The GPU check in one command, on a bare GPU machine or here:  bash tools/gpu_check.sh [--dry-run] [--out DIR] ...
# (arguments go to `python -m codetr.bench.gpu_check`; PYTHON picks the interpreter, default python3).
#
# 1. codetr is imported from this checkout without installing it: a temporary package folder links every entry of
#    src/codetr/ and maps conf/ to codetr.conf (what setup.py's package_dir does for an installed copy).
# 2. Packages the interpreter lacks (tools/gpu_wheels.txt) are installed offline from the carried .whl/ folder
#    (`make gpu-wheels`) into a temporary folder on PYTHONPATH; nothing is installed into the interpreter itself.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/codetr-gpu-check.XXXXXX")"
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/path/codetr"
for entry in "$repo"/src/codetr/*; do
  ln -s "$entry" "$work/path/codetr/"
done
ln -s "$repo/conf" "$work/path/codetr/conf"
export PYTHONPATH="$work/path${PYTHONPATH:+:$PYTHONPATH}"

missing="$("$python" -c '
import importlib.util
modules = {"hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime",
           "pycocotools": "pycocotools", "faster_coco_eval": "faster-coco-eval"}
print(" ".join(name for module, name in modules.items() if importlib.util.find_spec(module) is None))')"
if [ -n "$missing" ]; then
  if ! ls "$repo"/.whl/*.whl >/dev/null 2>&1; then
    echo "error: $python lacks $missing and there is no .whl/ folder: run 'make gpu-wheels' on a machine with" \
         "network access and carry .whl along" >&2
    exit 2
  fi
  echo "installing the carried wheels for: $missing"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" "$repo"/.whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$work/site"
fi

cd "$repo"
status=0
PYTHONUNBUFFERED=1 "$python" -m codetr.bench.gpu_check "$@" || status=$?
exit "$status"
