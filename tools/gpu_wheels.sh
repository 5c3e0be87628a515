#!/usr/bin/env bash
# Saves the wheels listed in tools/gpu_wheels.txt into DEST (default .whl/, git-ignored) for the GPU machine:
# CPython ${GPU_PYTHON_VERSION:-3.12} on manylinux x86_64, no dependencies (the list names each one).
# A package published only as source (antlr4-python3-runtime 4.9.3) is built here, and accepted only when the
# result is a pure-Python wheel, which runs on any Python 3.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$repo/.whl}"
python="${PYTHON:-python3}"
version="${GPU_PYTHON_VERSION:-3.12}"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
mkdir -p "$dest"
rm -f "$dest"/*.whl  # one version of each package: two would stop the offline install
grep -v '^[[:space:]]*\(#\|$\)' "$repo/tools/gpu_wheels.txt" | while read -r requirement; do
  if ! "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
      "${platforms[@]}" -d "$dest" "$requirement" 2>/dev/null; then
    echo "no wheel of $requirement for CPython $version: building it here (must be pure Python)"
    "$python" -m pip wheel -q --no-deps -w "$dest" "$requirement"
  fi
done
tag="cp${version/./}"
for wheel in "$dest"/*.whl; do
  case "$(basename "$wheel")" in
    *-none-any.whl | *-"$tag"-*manylinux*x86_64*.whl) ;;
    *) echo "error: $wheel is not a pure-Python or $tag manylinux x86_64 wheel" >&2; exit 1 ;;
  esac
done
ls -l "$dest"
du -sh "$dest"
