#!/usr/bin/env bash
# Quick start, step 2: set up .venv with the test extras and run the whole test suite, one worker per core
# (pytest-xdist; each test module stays on one worker, so a module's shared set-up runs once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q -n auto --dist loadscope "$@"
