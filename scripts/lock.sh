#!/usr/bin/env bash
# Regenerate the locks from the ranges in pyproject.toml: `pip install uv && bash scripts/lock.sh`.
#
#   requirements.txt       the app (core + [app]): what `python app.py` and a Hugging Face Space install
#   requirements-test.txt  the app and the test tools (core + [app,test]): what CI installs
#
# Both are fully pinned for Python 3.11 on Linux, without hashes. torch is pinned as `torch==2.13.0`
# with no local label: where PIP_FIND_LINKS offers a CPU wheel (+cpu), the lock is resolved against
# it and the label is dropped, so the same line installs the CPU build there and the default build
# elsewhere; torch's CUDA wheels (nvidia-*, triton) are left to torch itself, which pins them exactly.
set -euo pipefail
cd "$(dirname "$0")/.."
links=()
[ -n "${PIP_FIND_LINKS:-}" ] && links=(--find-links "$PIP_FIND_LINKS")

compile() {  # compile OUT EXTRA...
  local out=$1; shift
  local extras=()
  for e in "$@"; do extras+=(--extra "$e"); done
  uv pip compile pyproject.toml "${extras[@]}" "${links[@]}" --constraint scripts/lock-constraints.txt \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-annotate --quiet \
    --custom-compile-command "bash scripts/lock.sh" -o "$out"
  # torch's CUDA runtime is torch's own business; drop the +cpu label (see above)
  sed -i -E -e '/^(nvidia-|triton==|cuda-)/d' -e 's/^torch==([0-9.]+)\+cpu$/torch==\1/' "$out"
}

compile requirements.txt app
compile requirements-test.txt app test
echo "wrote requirements.txt ($(grep -c '==' requirements.txt) pins), requirements-test.txt ($(grep -c '==' requirements-test.txt) pins)"
