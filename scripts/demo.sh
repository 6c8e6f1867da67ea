#!/usr/bin/env bash
# Quick start, step 1: set up .venv and run the demo (trains a CNN on the bundled digits with callbacks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh all
exec .venv/bin/ultraloop demo "$@"
