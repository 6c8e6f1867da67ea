#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one call: the tests that skip without CUDA, the GPU benchmark (every case, bs 64
# and 512, the peers where a peer harness is found, a profile of a few steps of each side), time to accuracy
# (bench/speedrun.py: FashionMNIST from data/ where its IDX files are there, MNIST-1D made locally), and the whole suite.
#
#   bash bench/gpu_check.sh OUT [STAGES] [N]
#     OUT     folder for the logs, the benchmark's JSON lines, profiles.txt and the Chrome traces (traces.tgz)
#     STAGES  any of: tests bench speedrun suite dist (default: tests bench speedrun suite)
#     N       train samples for the benchmark (default 60000; valid is N / 5)
# Uses $PYTHON (default python3); puts the project root on PYTHONPATH. $BENCH_ARGS: more options for bench/gpu.py;
# $SPEEDRUN_ARGS: more options for bench/speedrun.py. $T_TESTS, $T_BENCH, $T_SPEEDRUN, $T_SUITE: each stage's time
# limit in seconds (180, 420, 150, 300).
set -u
out=${1:?usage: bash bench/gpu_check.sh OUT [STAGES] [N]}; stages=${2:-tests bench speedrun suite}; n=${3:-60000}
py=${PYTHON:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"; cd "$root"
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  $py -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  nproc; } | tee "$out/env.txt"
for stage in $stages; do
  case $stage in
    tests)  # the cases that skip on a machine without CUDA (and the CPU ones whose names say cuda or gpu)
      stamp "GPU tests"
      timeout "${T_TESTS:-180}" "$py" -m pytest -q -p no:cacheprovider -rs -k 'cuda or gpu or host_sync' tests 2>&1 | tee "$out/gpu_tests.log" | tail -25 ;;
    bench)
      stamp "bench/gpu.py"
      rm -rf "$out/prof"
      timeout "${T_BENCH:-420}" "$py" bench/gpu.py --n "$n" --profile "$out/prof" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.jsonl" | grep -v '^USDT'
      [ -f "$out/prof/profiles.txt" ] && mv "$out/prof/profiles.txt" "$out/" && (cd "$out/prof" && tar czf ../traces.tgz ./*.json) && rm -rf "$out/prof" ;;
    speedrun)  # seconds to a fixed test accuracy, hand-written loop against ultraloop's fastest recipe
      stamp "bench/speedrun.py"
      timeout "${T_SPEEDRUN:-150}" "$py" bench/speedrun.py --device cuda ${SPEEDRUN_ARGS:-} 2>&1 | tee "$out/speedrun.log" | tail -12 ;;
    dist)
      stamp "bench/distributed.py"
      timeout 180 "$py" bench/distributed.py 2>&1 | tee "$out/distributed.jsonl" | tail -8 ;;
    suite)  # the whole suite, with the GPU visible, spread over the cores (pytest-xdist) where it is installed
      stamp "whole suite"
      x=(); "$py" -c 'import xdist' 2>/dev/null && x=(-n 8)
      timeout "${T_SUITE:-300}" "$py" -m pytest -q -p no:cacheprovider -rfEs "${x[@]}" tests 2>&1 | tee "$out/suite.log" | tail -30 ;;
    *) echo "gpu_check.sh: unknown stage '$stage'; use tests, bench, speedrun, suite or dist"; exit 2 ;;
  esac
done
stamp done
