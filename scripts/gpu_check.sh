#!/usr/bin/env bash
# One-shot check on a GPU machine: build the CUDA kernels in place, run the CUDA tests, the CUDA
# benchmark and a kernel profile. Run from the repository root with $OUT set; everything of interest
# lands in $OUT (build.log, tests.log, bench.md (every round), bench_cuda.json (round 1), profile.log,
# summary.txt; extra.txt with NCU / SANITIZE).
# BASELINE=dir (a source tree of an earlier commit, e.g. `git archive HEAD csrc torchrec_tt planner
# setup.py examples tests | tar -x -C .ab/old`, carried): built in parallel, benchmarked right after ours
# on the same machine (in bench.md) and profiled (profile_baseline.log; scripts/compare_profiles.py's
# kernel-by-kernel table, slower kernels flagged, goes to the output and the end of summary.txt); with
# BASELINE_TESTS=1 its CUDA tests run too (appended to tests.log; session 11: over their 90 s box on an
# H100, so off by default).
# NCU=1: Nsight Compute counters of one fused step's kernels; SANITIZE=1: compute-sanitizer memcheck
# (both plan paths) and racecheck on one step (both into extra.txt; session 11: 8 + 8 + 20 s).
# BASELINE_ENV="VAR=value ..." (instead of BASELINE): the baseline is this same build run with those
# environment variables (e.g. TORCHREC_TT_CUDA_SMALL_PLAN=0: the general plan path). ROUNDS=k runs
# the two benchmarks k times, alternating (all rounds in bench.md).
# Each step is time-boxed and a failing step does not stop the next one, so one run gives as much
# information as possible. Seen in session 11: 291 s on an H100 with BASELINE, ROUNDS=2, SANITIZE=1 and
# the baseline's tests (90 s of it); 175 s on an H200 with ROUNDS=2 SANITIZE=1 (build 50 s, tests 32 s,
# sanitizers 35 s). A machine's start adds about 30 s.
set -x
set -o pipefail
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
status=()
step() {  # step NAME TIMEOUT_S COMMAND... : run, record the exit status, never abort
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  status+=("$name rc=$rc $((SECONDS - t0))s")
  echo "=== step $name: rc=$rc in $((SECONDS - t0))s"
  return 0
}

# ---- environment ----
nvidia-smi || true
"$PY" - <<'EOF' || true
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
from torch.utils.cpp_extension import CUDA_HOME
print("CUDA_HOME", CUDA_HOME)
EOF
command -v nvcc && nvcc --version || echo "no nvcc on PATH"
command -v ninja || echo "no ninja (setuptools falls back to a serial build)"

# ---- build (in place) ----
# Some images put a compiler first (seen: /opt/gcc on our H100/H200 image) whose C++ runtime ends up
# inside the extension: c10::str then crashes formatting a number in an error message. Build with
# the system gcc/g++ that matches the libstdc++ torch loads.
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
export TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 TORCHREC_TT_FORCE_CUDA=1
if [ -n "${BASELINE:-}" ]; then  # its own build directory; its log is only summarised
  (cd "$BASELINE" && timeout 300 "$PY" setup.py build_ext --inplace > /tmp/build_baseline.log 2>&1; echo "baseline build rc=$?" >> /tmp/build_baseline.log) &
fi
step build 240 bash -c "$PY setup.py build_ext --inplace > '$OUT/build.log' 2>&1"
grep -nE "error|warning: .*tt_" "$OUT/build.log" | head -n 40
tail -n 25 "$OUT/build.log"
"$PY" - <<'EOF' 2>&1
import torch, torchrec_tt
for op in ("tt_embedding_bag", "tt_embedding_bag_fused", "tt_embedding_bag_backward", "tt_embedding_bag_backward_fused_"):
    print(op, "CUDA kernel registered:", torch._C._dispatch_has_kernel_for_dispatch_key(f"torchrec_tt::{op}", "CUDA"))
EOF

# ---- tests ----
# --maxfail (not -x): a first failure still leaves room for a few more data points.
step tests_cuda 140 bash -c "set -o pipefail; $PY -m pytest -q --maxfail=10 -rfE --durations=8 -p no:cacheprovider tests/test_cuda.py tests/test_cuda_errors.py tests/test_ops.py tests/test_cuda_graphs.py 2>&1 | tee '$OUT/tests.log'"

# ---- benchmark (ours, then the baseline on the same machine) and profile ----
[ -n "${BASELINE:-}" ] && { wait; tail -n 3 /tmp/build_baseline.log; }  # no build running while we time
ROUNDS="${ROUNDS:-1}"
BENCH="$PY examples/benchmark_tt_embedding_cuda.py --iters 30 --warmup 5"
note() { printf '\n## %s\n\n' "$1" >> "$OUT/bench.md"; cat /tmp/bench_round.md >> "$OUT/bench.md" 2>/dev/null; rm -f /tmp/bench_round.md; }
# The baseline's environment (`env` arguments): another tree's package, or this build with other variables.
BASE="" BASE_NAME=""
if [ -n "${BASELINE:-}" ]; then
  BASE="PYTHONPATH='$BASELINE'" BASE_NAME="baseline tree $BASELINE"
elif [ -n "${BASELINE_ENV:-}" ]; then
  BASE="$BASELINE_ENV" BASE_NAME="this tree with $BASELINE_ENV"
fi
for i in $(seq 1 "$ROUNDS"); do
  json=$([ "$i" = 1 ] && echo "--json $OUT/bench_cuda.json" || true)
  step "bench_$i" 150 bash -c "set -o pipefail; $BENCH $json --markdown /tmp/bench_round.md"
  note "round $i: this tree"
  if [ "$i" = 1 ] && [ -n "${BASELINE:-}" ] && [ -n "${BASELINE_TESTS:-}" ] && [ -d "$BASELINE/tests" ]; then
    # (not test_cuda_emulated.py: the CPU emulator's tests would take the whole time box)
    step tests_baseline 90 bash -c "cd '$BASELINE' && PYTHONPATH='$BASELINE' $PY -m pytest -q -p no:cacheprovider tests/test_cuda*.py --ignore=tests/test_cuda_emulated.py 2>&1 | tail -n 15 > /tmp/tests_baseline.log"
    { printf '\n==== baseline tree %s: tests/test_cuda*.py (last lines)\n' "$BASELINE"; cat /tmp/tests_baseline.log; } >> "$OUT/tests.log"
  fi
  if [ -n "$BASE" ]; then
    step "bench_baseline_$i" 150 bash -c "env $BASE $BENCH --markdown /tmp/bench_round.md > /dev/null"
    note "round $i: $BASE_NAME"
  fi
done
cat "$OUT/bench.md"
step profile 90 bash -c "$PY examples/profile_tt_embedding_cuda.py > '$OUT/profile.log' 2>&1"
[ -n "$BASE" ] && step profile_baseline 90 bash -c "env $BASE $PY examples/profile_tt_embedding_cuda.py > '$OUT/profile_baseline.log' 2>&1"
rm -f /tmp/compare.md
if [ -n "$BASE" ]; then  # kernel by kernel, slower kernels flagged (also at the end of summary.txt)
  "$PY" scripts/compare_profiles.py "$OUT/profile.log" "$OUT/profile_baseline.log" > /tmp/compare.md 2>&1
  cat /tmp/compare.md
fi
sed -n "/one step/,/^===/p" "$OUT/profile.log" | head -n 120

# ---- optional: hardware counters and memory / race checks of one step's kernels (extra.txt) ----
# NCU=1: Nsight Compute on one fused step of config (b) (speed of light, occupancy, warp stalls,
# memory), clocks left alone. SANITIZE=1: compute-sanitizer memcheck and racecheck (shared memory)
# on one step of (b) on each plan path. Each is time-boxed; seen working on Firecracker hosts only.
KSTEP="$PY examples/cuda_kernel_step.py --config b"
if [ -n "${NCU:-}" ] && command -v ncu > /dev/null; then
  step ncu 240 bash -c "ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis $KSTEP > /tmp/ncu.txt 2>&1"
  { echo "==== ncu, one fused step of (b)"; cat /tmp/ncu.txt; } >> "$OUT/extra.txt"
fi
if [ -n "${SANITIZE:-}" ] && command -v compute-sanitizer > /dev/null; then
  for run in "memcheck" "memcheck --general-plan" "racecheck"; do  # racecheck: the one-block kernels' shared memory
    tool=${run%% *}
    path=${run#"$tool"}
    step "sanitize_${tool}${path:+_general}" 150 bash -c "compute-sanitizer --tool $tool --print-limit 20 $KSTEP --warmup 1 $path > /tmp/san.txt 2>&1"
    { echo "==== compute-sanitizer $run"; tail -n 40 /tmp/san.txt; } >> "$OUT/extra.txt"
  done
fi

printf '%s\n' "${status[@]}" | tee "$OUT/summary.txt"
[ -f /tmp/compare.md ] && cat /tmp/compare.md >> "$OUT/summary.txt"
exit 0
