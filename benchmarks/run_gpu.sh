#!/usr/bin/env bash
# The one command for a lent CUDA machine (torch, no network): build the extension with its CUDA
# part, run the CUDA tests, run every CUDA operator under compute-sanitizer's memcheck, racecheck,
# initcheck and synccheck, then the GPU benchmarks, within BUDGET seconds (470: 8 minutes of
# device time with the machine's start) whatever each phase does.
#
#   bash benchmarks/run_gpu.sh [PHASE ...]   (default: all = test sanitize bench demo, in that order)
#
#   test:     environment report, build, the CUDA tests (pytest-xdist when installed)
#   sanitize: benchmarks/cuda_smoke.py (every CUDA operator, forward and backward, every dtype, odd
#             shapes) under each compute-sanitizer tool, PyTorch's caching allocator off so that
#             every overrun and uninitialized read is seen
#   bench:    every suite with --device cuda (needs the build of a `test` run in the same tree)
#   demo:     the regression demo (bnn_fast.examples.regression) with --device cuda
#
# Logs go to $LOG_DIR (default: $OUT when set, else benchmarks/results), written as the run goes,
# so a run killed at a time limit still leaves them; each phase has its own timeout, capped by
# what is left of BUDGET. gpu_summary.md names the card, the driver, torch and the commit, with
# one line per phase (also copied to benchmarks/results/). The benchmark results
# (results/<suite>_cuda.{md,json,png}) are also packed into $LOG_DIR/gpu_results.tgz.
#
# Knobs: PYTHON, BUDGET (470 s), MAX_JOBS (16), BNN_FAST_CUDA_ARCH (9.0), TEST_ARGS (pytest
# selection, default: -k "cuda and not emulation"; "" runs the whole suite), TEST_WORKERS (8),
# TEST_TIMEOUT (150 s), SANITIZE_TOOLS ("memcheck racecheck initcheck synccheck"),
# SANITIZE_TIMEOUT (60 s per tool), BENCH_TIMEOUT (per suite, 75 s), MIN_RUN_TIME (0.2 s of timed
# runs per case: a GPU's timings are steady), ROUNDS (2 interleaved rounds), BENCH_ARGS (extra
# suite arguments, e.g. "--train-steps 200"), SUITES ("bench_linear bench_predictive bench_kl
# bench_estimators bench_distributed"), COMMIT (the commit to name when the tree has no .git; exported to the
# benchmarks' results as BNN_FAST_COMMIT).
#
# The anchors (torchbnn, bayesian-torch, blitz) are pure Python: where pip cannot reach PyPI,
# carry their wheels in .whl/ (pip download --no-deps -d .whl torchbnn==1.2 bayesian-torch==0.5.0
# blitz-bayesian-pytorch==0.2.8) and they are installed from there.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PHASES=" ${*:-all} "
want() { [[ $PHASES == *" all "* || $PHASES == *" $1 "* ]]; }
RESULTS=benchmarks/results
LOG_DIR=${LOG_DIR:-${OUT:-$RESULTS}}
mkdir -p "$RESULTS" "$LOG_DIR"
export PYTHONUNBUFFERED=1
BUDGET=${BUDGET:-470}
SUMMARY=$LOG_DIR/gpu_summary.md
# cap T: T seconds, or what is left of the budget if less (at least 1).
cap() { local t=$1 left=$((BUDGET - SECONDS)); ((left < t)) && t=$left; ((t < 1)) && t=1; echo "$t"; }
# A phase starts only with at least $1 seconds of the budget left.
time_for() { (( BUDGET - SECONDS >= $1 )) || { note "$2: skipped, $((BUDGET - SECONDS)) s of the budget left"; false; }; }
note() { echo "$*" | tee -a "$SUMMARY"; }

commit=${COMMIT:-${BNN_FAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}}
export BNN_FAST_COMMIT=$commit
{
  echo "# GPU run $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "card, driver, memory: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
  echo "torch: $($PY -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>&1 | tail -1)"
  echo "commit: $commit"
  echo
} >"$SUMMARY"
cat "$SUMMARY"

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/bnn-site .whl/*.whl
  export PYTHONPATH=/tmp/bnn-site${PYTHONPATH:+:$PYTHONPATH}
fi

if want test; then
  {
    date -u
    nvidia-smi
    $PY -V
    $PY -c "import torch, setuptools; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'setuptools', setuptools.__version__)"
    nproc
  } >"$LOG_DIR/gpu_env.txt" 2>&1
  tail -4 "$LOG_DIR/gpu_env.txt"

  # setuptools < 77 cannot read pyproject.toml's `license = "MIT"`; setup.py itself needs none of
  # pyproject.toml, so such a build runs with the file set aside (restored right after).
  moved=0
  if ! $PY -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)"; then
    mv pyproject.toml pyproject.toml.aside && moved=1
  fi
  start=$SECONDS
  BNN_FAST_FORCE_CUDA=1 BNN_FAST_CUDA_ARCH=${BNN_FAST_CUDA_ARCH:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    $PY setup.py -q build_ext --inplace >"$LOG_DIR/gpu_build.txt" 2>&1
  build_rc=$?
  [[ $moved == 1 ]] && mv pyproject.toml.aside pyproject.toml
  note "build: rc $build_rc in $((SECONDS - start)) s"
  if [[ $build_rc != 0 ]]; then
    grep -B2 -A12 -m3 "error" "$LOG_DIR/gpu_build.txt" | head -80
    exit 2
  fi
  $PY -c "import bnn_fast, sys; b = bnn_fast.backend(); print(b); sys.exit(0 if b.cuda_compiled and b.cuda_available else 1)" || exit 3

  xdist=()
  $PY -c "import xdist" 2>/dev/null && xdist=(-n "${TEST_WORKERS:-8}")
  selection=(-k "cuda and not emulation")
  [[ -v TEST_ARGS ]] && eval "selection=($TEST_ARGS)"  # shell words, quotes kept
  start=$SECONDS
  timeout "$(cap "${TEST_TIMEOUT:-150}")" $PY -m pytest -q -rs --tb=short -p no:cacheprovider "${xdist[@]}" \
    "${selection[@]}" tests >"$LOG_DIR/gpu_tests.txt" 2>&1
  tests_rc=$?
  note "tests: rc $tests_rc in $((SECONDS - start)) s: $(grep -E "(passed|failed|error)" "$LOG_DIR/gpu_tests.txt" | tail -1)"
  grep -E "^(FAILED|ERROR)" "$LOG_DIR/gpu_tests.txt" | head -40 | tee -a "$SUMMARY"
fi

if want sanitize; then
  if command -v compute-sanitizer >/dev/null; then
    for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}; do
      time_for 20 "sanitizer $tool" || continue
      start=$SECONDS
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(cap "${SANITIZE_TIMEOUT:-60}")" compute-sanitizer \
        --tool "$tool" --error-exitcode 9 $PY -m benchmarks.cuda_smoke >"$LOG_DIR/gpu_sanitizer_$tool.txt" 2>&1
      rc=$?
      note "sanitizer $tool: rc $rc in $((SECONDS - start)) s: $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|cuda_smoke:" "$LOG_DIR/gpu_sanitizer_$tool.txt" | tr '\n' ' ')"
    done
  else
    note "compute-sanitizer not found: the sanitizer tools skipped"
  fi
fi

if want bench; then
  for suite in ${SUITES:-bench_linear bench_predictive bench_kl bench_estimators bench_distributed}; do
    time_for 30 "$suite" || continue
    start=$SECONDS
    echo "===== $suite =====" >>"$LOG_DIR/gpu_bench.txt"
    timeout "$(cap "${BENCH_TIMEOUT:-75}")" $PY -m benchmarks.$suite --device cuda \
      --min-run-time "${MIN_RUN_TIME:-0.2}" --rounds "${ROUNDS:-2}" ${BENCH_ARGS:-} >>"$LOG_DIR/gpu_bench.txt" 2>&1
    note "$suite: rc $? in $((SECONDS - start)) s"
    tar czf "$LOG_DIR/gpu_results.tgz" "$RESULTS"/*_cuda.* 2>/dev/null
  done
  grep -A40 "^## Targets" "$RESULTS"/*_cuda.md 2>/dev/null | grep -E "\| (yes|NO) \|" | cut -c1-200
fi

if want demo && time_for 30 demo; then
  start=$SECONDS
  timeout "$(cap 120)" $PY -m bnn_fast.examples.regression --device cuda --no-progress --out /tmp/regression_cuda.png \
    >"$LOG_DIR/gpu_demo.txt" 2>&1
  note "demo: rc $? in $((SECONDS - start)) s"
  tail -8 "$LOG_DIR/gpu_demo.txt"
fi

note "total: $SECONDS s of the $BUDGET s budget"
[[ $LOG_DIR != "$RESULTS" ]] && cp "$SUMMARY" "$RESULTS/"
exit "${tests_rc:-0}"
