#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one call: the tests that skip without CUDA, fit_one_cycle under CudaGraphCB, the
# GPU-bound case (a ResNet-18-like net fed from a host DataLoader against the data already on the GPU, with a profile),
# time to accuracy (bench/speedrun.py: FashionMNIST from data/ where its IDX files are there, MNIST-1D made locally),
# DistributedCB on nccl, the GPU benchmark (every case, bs 64 and 512, the peers where a harness is found, profiles) and
# the whole suite.
#
#   bash bench/gpu_check.sh OUT [STAGES] [N]
#     OUT     folder for the logs, the benchmarks' JSON lines, profiles*.txt and the Chrome traces (traces*.tgz)
#     STAGES  any of: tests onecycle bound speedrun dist bench suite (default: tests onecycle bound speedrun dist
#             suite; onecycle: fit_one_cycle under CudaGraphCB, its GPU tests, its timing against a constant lr and a
#             probe; dist: nccl only, one process per GPU against a hand-written DDP loop)
#     N       train samples for the benchmark (default 30000; valid is N / 5)
# Uses $PYTHON (default python3); puts the project root on PYTHONPATH. $BENCH_ARGS, $BOUND_ARGS, $SPEEDRUN_ARGS: more
# options for bench/gpu.py, bench/gpu.py --bound and bench/speedrun.py; $T_TESTS, $T_ONECYCLE, $T_BOUND, $T_SPEEDRUN,
# $T_DIST, $T_BENCH, $T_SUITE: each stage's time limit in seconds (180, 240, 150, 150, 120, 420, 300). $T_TOTAL
# (default 480): the whole script's; each stage gets at most what is left of it, and a stage that would get under 30 s
# is skipped, saying so. On an H200 the default stages should take about 8 minutes (estimated: tests 1.5, onecycle 1,
# bound 1, speedrun 2.5, dist 0.5, suite 1.5, the last to be cut short); bench (about 3) is for a second call.
set -u
out=${1:?usage: bash bench/gpu_check.sh OUT [STAGES] [N]}; stages=${2:-tests onecycle bound speedrun dist suite}; n=${3:-30000}
py=${PYTHON:-python3}
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"; cd "$root"
start=$SECONDS
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }
# limit CAP: the stage's time limit, CAP or what is left of $T_TOTAL (at least 1 s), whichever is less
limit() { local left=$(( ${T_TOTAL:-480} - (SECONDS - start) )); left=$(( left < 1 ? 1 : left )); echo $(( $1 < left ? $1 : left )); }
# gpu_bench NAME LIMIT ARGS...: bench/gpu.py --profile ARGS; its lines in OUT/NAME.jsonl, the tables in
# OUT/profiles[_NAME].txt, the Chrome traces in OUT/traces[_NAME].tgz (no suffix for NAME bench)
gpu_bench() {
  local name=$1 t=$2 prof="$out/prof_$1" sfx; shift 2
  sfx=$([ "$name" = bench ] || echo "_$name")
  rm -rf "$prof"
  timeout "$t" "$py" bench/gpu.py --profile "$prof" "$@" 2>&1 | tee "$out/$name.jsonl" | grep -v '^USDT'
  [ -f "$prof/profiles.txt" ] && mv "$prof/profiles.txt" "$out/profiles$sfx.txt" && (cd "$prof" && tar czf "../traces$sfx.tgz" ./*.json) && rm -rf "$prof"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  $py -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  nproc; } | tee "$out/env.txt"
for stage in $stages; do
  case $stage in
    tests) cap=${T_TESTS:-180} ;; bound) cap=${T_BOUND:-150} ;; bench) cap=${T_BENCH:-420} ;; dist) cap=${T_DIST:-120} ;;
    suite) cap=${T_SUITE:-300} ;; onecycle) cap=${T_ONECYCLE:-240} ;; speedrun) cap=${T_SPEEDRUN:-150} ;;
    *) echo "gpu_check.sh: unknown stage '$stage'; use tests, onecycle, bound, speedrun, bench, suite or dist"; exit 2 ;;
  esac
  t=$(limit "$cap")
  if [ "$t" -lt 30 ]; then stamp "skipped $stage: ${t} s left of T_TOTAL=${T_TOTAL:-480}"; continue; fi
  case $stage in
    tests)  # the cases that skip on a machine without CUDA (and the CPU ones whose names say cuda or gpu)
      stamp "GPU tests"
      timeout "$t" "$py" -m pytest -q -p no:cacheprovider -rs -k 'cuda or gpu or host_sync' tests 2>&1 | tee "$out/gpu_tests.log" | tail -25 ;;
    bound)  # ResNet-18-like, 3 x 64 x 64, bs 256: ultraloop fed from a host DataLoader against the data on the GPU
      stamp "bench/gpu.py --bound"
      gpu_bench bound "$t" --bound --epochs 5 ${BOUND_ARGS:-} ;;
    bench)
      stamp "bench/gpu.py"
      gpu_bench bench "$t" --n "$n" ${BENCH_ARGS:-} ;;
    onecycle)  # one graph for a whole fit_one_cycle: the tests (GPU, and the CPU stand-ins), then Adam's timing
      stamp "fit_one_cycle under CudaGraphCB"
      timeout "$t" "$py" -m pytest -q -p no:cacheprovider -rs -k 'one_cycle and (cuda or gpu)' tests/test_speed.py 2>&1 | tee "$out/onecycle_tests.log" | tail -8
      timeout "$(limit "$cap")" "$py" bench/gpu.py --n "$n" --cases cudagraph_onecycle --peers none 2>&1 | tee "$out/onecycle.jsonl" | grep -v '^USDT'
      timeout "$(limit 60)" "$py" bench/gpu.py --probe 2>&1 | tee -a "$out/onecycle.jsonl" | grep -v '^USDT' ;;  # why foreach=False
    speedrun)  # seconds to a fixed test accuracy, hand-written loop against ultraloop's fastest recipe
      stamp "bench/speedrun.py"
      timeout "$t" "$py" bench/speedrun.py --device cuda ${SPEEDRUN_ARGS:-} 2>&1 | tee "$out/speedrun.log" | tail -12 ;;
    dist)
      stamp "bench/distributed.py"
      timeout "$t" "$py" bench/distributed.py --cuda-only 2>&1 | tee "$out/distributed.jsonl" | tail -8 ;;
    suite)  # the whole suite, with the GPU visible, spread over the cores (pytest-xdist) where it is installed
      stamp "whole suite"
      x=(); "$py" -c 'import xdist' 2>/dev/null && x=(-n 8)
      timeout "$t" "$py" -m pytest -q -p no:cacheprovider -rfEs "${x[@]}" tests 2>&1 | tee "$out/suite.log" | tail -30 ;;
  esac
done
stamp done
