#!/usr/bin/env bash
# Creates .venv with torch and ultraloop with its extras. A second run only checks (nothing is installed when
# pyproject.toml and the extra are those of the last set-up).
# Usage: bash scripts/setup.sh [extra] [vision]  extra: all | test (default test)
#        bash scripts/setup.sh --plan [vision]  print which torch build set-up would install, install nothing
# vision (or ULTRALOOP_EXTRAS=vision): also torchvision, from the same source as torch (the CPU index for a CPU torch:
# PyPI's torchvision is CUDA-built, and on a CPU torch it breaks `import torchmetrics` with "operator torchvision::nms
# does not exist"), then timm, which finds torchvision already there and leaves it.
# torch, when .venv has none: ULTRALOOP_TORCH=auto (default) installs the CPU build from torch's CPU package index
# unless an NVIDIA GPU answers `nvidia-smi -L` (then the default build from PyPI, which on Linux is the CUDA one);
# on macOS always the default build (it has no CUDA). ULTRALOOP_TORCH=cpu or cuda forces one, skip installs none
# (bring your own, e.g. a ROCm build).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu

# the arguments: --plan, vision, and the pip extra (test unless given)
plan_only=0 vision=0 extra=test
extras=${ULTRALOOP_EXTRAS:-}
for extra_name in ${extras//,/ }; do
  case "$extra_name" in
    vision) vision=1 ;;
    *) echo "setup.sh: ULTRALOOP_EXTRAS=$extras: $extra_name is not a choice; the one there is: vision" >&2; exit 2 ;;
  esac
done
for arg in "$@"; do
  case "$arg" in
    --plan) plan_only=1 ;;
    vision) vision=1 ;;
    *) extra=$arg ;;
  esac
done

# torchvision's version for torch 2.N.x is 0.(N+15).x, its release made with it (2.13.0 -> 0.28.0)
torchvision_for() {
  local v=${1%%+*} major minor patch
  IFS=. read -r major minor patch <<< "$v"
  echo "0.$((minor + 15)).${patch:-0}"
}

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
if [ $plan_only = 1 ]; then
  echo "torch: $plan${torch_cmd:+: $torch_cmd}"
  if [ $vision = 1 ]; then
    tv=$(torchvision_for $TORCH_VERSION)
    case "$build" in
      cpu) echo "torchvision: pip install torchvision==$tv --index-url $CPU_INDEX (the CPU build, as torch's: PyPI's is" \
                "CUDA-built), then pip install timm" ;;
      default) echo "torchvision: pip install torchvision==$tv (PyPI's, as torch's), then pip install timm" ;;
      skip) echo "torchvision: the build matching the torch in .venv (the CPU index for a CPU torch), then pip install timm" ;;
    esac
  fi
  exit 0
fi

stamp=".venv/.ultraloop-setup-$extra"
want="$(cksum < pyproject.toml)"
if [ $vision = 1 ]; then want="$want vision"; fi
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
if [ $vision = 1 ]; then
  # the torch in .venv says which torchvision fits: its version, and the CPU build where torch has no CUDA
  read -r torch_version torch_cuda <<< "$($py -c 'import torch; print(torch.__version__, torch.version.cuda or "cpu")')"
  tv=$(torchvision_for "$torch_version")
  if [ "$torch_cuda" = cpu ] && [ "$(uname -s)" != Darwin ]; then
    if $py -c "import urllib.request as u; u.urlopen(u.Request('$CPU_INDEX/torchvision/', method='HEAD'), timeout=10)" 2>/dev/null
    then $py -m pip install -q "torchvision==$tv" --index-url "$CPU_INDEX"
    elif ! $py -m pip install -q "torchvision==$tv+cpu"; then
      echo "torchvision: neither $CPU_INDEX nor pip's configured sources have torchvision==$tv+cpu for this CPU torch;" \
           "PyPI's torchvision is CUDA-built and would break torchmetrics, so none is installed (timm needs one)" >&2
      exit 1
    fi
  else $py -m pip install -q "torchvision==$tv"
  fi
  $py -m pip install -q timm  # torchvision is there already, so pip keeps it
  echo "torchvision: $($py -c 'import torchvision; print(torchvision.__version__)'), timm: $($py -c 'import timm; print(timm.__version__)')"
fi
echo "$want" > "$stamp"
