#!/usr/bin/env bash
# Creates .venv with a CPU build of torch (unless a torch is already there) and ultraloop with its extras.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh [extra]   (extra: all | test; default test)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-test}"
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip >/dev/null
if ! $py -c 'import torch' 2>/dev/null; then
  # a plain `pip install torch` can pull a multi-GB CUDA build: ask for the CPU build first
  $py -m pip install -q torch==2.13.0 \
    || $py -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
$py -m pip install -q -e ".[${extra}]"
