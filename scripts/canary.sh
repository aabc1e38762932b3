#!/usr/bin/env bash
# Canary: run the test suite against the newest releases that pyproject.toml's ranges allow, in a
# fresh virtual environment, to find dependency drift on purpose rather than from a user's report.
#
#   bash scripts/canary.sh                 # whole suite
#   bash scripts/canary.sh -x tests/test_methods_model_level.py   # pytest arguments pass through
#
# torch stays at the lock's version unless CANARY_TORCH names another (a newer torch from the
# default index is the multi-GB CUDA build). CANARY_VENV reuses a folder for the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${CANARY_VENV:-$(mktemp -d)/venv}
python -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q)
"${pip[@]}" "torch==${CANARY_TORCH:-2.13.0}"
"${pip[@]}" --upgrade --upgrade-strategy eager -e ".[app,test]"
"${pip[@]}" --no-deps -r requirements-nodeps.txt
echo "canary versions:"
"$venv/bin/python" -m pip freeze | grep -iE '^(torch|transformers|peft|gradio|datasets|huggingface.hub|plotly|safetensors|numpy|pandas|accelerate)==' | sed 's/^/  /'
"$venv/bin/python" -m pytest -q "$@"
