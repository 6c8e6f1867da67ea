#!/usr/bin/env bash
# Creates .venv with torch and ultraloop with its extras. A second run only checks (nothing is installed when
# pyproject.toml and the extra are those of the last set-up).
# Usage: bash scripts/setup.sh [extra]          extra: all | test (default test)
#        bash scripts/setup.sh --plan           print which torch build set-up would install, install nothing
# torch, when .venv has none: ULTRALOOP_TORCH=auto (default) installs the CPU build from torch's CPU package index
# unless an NVIDIA GPU answers `nvidia-smi -L` (then the default build from PyPI, which on Linux is the CUDA one);
# on macOS always the default build (it has no CUDA). ULTRALOOP_TORCH=cpu or cuda forces one, skip installs none
# (bring your own, e.g. a ROCm build).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu

# prints "<build> <why>"; the build is cpu, default or skip
torch_build() {
  local choice="${ULTRALOOP_TORCH:-auto}"
  case "$choice" in
    cpu) echo "cpu (ULTRALOOP_TORCH=cpu)" ;;
    cuda) echo "default (ULTRALOOP_TORCH=cuda)" ;;
    skip) echo "skip (ULTRALOOP_TORCH=skip)" ;;
    auto)
      if [ "$(uname -s)" = Darwin ]; then echo "default (macOS: torch's macOS build has no CUDA)"
      elif gpu=$(nvidia-smi -L 2>/dev/null) && [ -n "$gpu" ]; then echo "default (NVIDIA GPU found: ${gpu%%$'\n'*})"
      else echo "cpu (no NVIDIA GPU found by nvidia-smi -L)"; fi ;;
    *) echo "setup.sh: ULTRALOOP_TORCH=$choice is not a choice; use auto, cpu, cuda or skip" >&2; return 2 ;;
  esac
}

plan=$(torch_build) || exit 2
build=${plan%% *}
case "$build" in
  cpu) torch_cmd="pip install torch==$TORCH_VERSION --index-url $CPU_INDEX" ;;
  default) torch_cmd="pip install torch==$TORCH_VERSION" ;;
  skip) torch_cmd="" ;;
esac
if [ "${1:-}" = --plan ]; then
  echo "torch: $plan${torch_cmd:+: $torch_cmd}"
  exit 0
fi

extra="${1:-test}"
stamp=".venv/.ultraloop-setup-$extra"
want="$(cksum < pyproject.toml)"
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] \
   && .venv/bin/python -c 'import torch, ultraloop' 2>/dev/null; then
  exit 0  # set up already, for this pyproject.toml and extra
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip >/dev/null
if ! $py -c 'import torch' 2>/dev/null; then
  echo "torch: $plan"
  case "$build" in
    cpu)
      # the CPU index cannot be reached (offline, a mirror only): ask the configured sources for the +cpu build by
      # name, which never resolves to a CUDA build
      if $py -c "import urllib.request as u; u.urlopen(u.Request('$CPU_INDEX/torch/', method='HEAD'), timeout=10)" 2>/dev/null
      then $py -m pip install -q "torch==$TORCH_VERSION" --index-url "$CPU_INDEX"
      else echo "torch: $CPU_INDEX cannot be reached; asking pip's configured sources for torch==$TORCH_VERSION+cpu"
           $py -m pip install -q "torch==$TORCH_VERSION+cpu"
      fi ;;
    default) $py -m pip install -q "torch==$TORCH_VERSION" ;;
    skip) echo "torch: ULTRALOOP_TORCH=skip, but .venv has no torch: install one into .venv, then run this again" >&2
          exit 1 ;;
  esac
fi
$py -m pip install -q -e ".[${extra}]"
echo "$want" > "$stamp"
