#!/usr/bin/env bash
# The one script for a CUDA machine that has torch but no network: build the extension with its
# CUDA part, run the whole test suite (the CUDA cases included), then the GPU benchmarks.
#
#   bash benchmarks/run_gpu.sh [PHASE ...]      (default: all = test bench demo sanitize, in that order)
#
#   test:  environment report, build, the test suite (pytest-xdist when installed)
#   bench: every suite with --device cuda (needs the build of a `test` run in the same tree)
#   demo:  the regression demo (bnn_fast.examples.regression) with --device cuda
#   sanitize: benchmarks/cuda_smoke.py (every CUDA operator on odd shapes) under compute-sanitizer's
#          memcheck, with PyTorch's caching allocator off so that every overrun is seen
#
# Logs go to $LOG_DIR (default: $OUT when set, else benchmarks/results), written as the run goes,
# so a run killed at a time limit still leaves them; each phase has its own timeout. The
# benchmark results (results/<suite>_cuda.{md,json,png}) are also packed into
# $LOG_DIR/gpu_results.tgz. The card is named in every results file (machine.gpu).
#
# Knobs: PYTHON, MAX_JOBS (16), BNN_FAST_CUDA_ARCH (9.0), TEST_ARGS (extra pytest arguments,
# e.g. "-k cuda"), TEST_WORKERS (8), TEST_TIMEOUT (300 s), BENCH_TIMEOUT (per suite, 240 s),
# MIN_RUN_TIME (0.2 s of timed runs per case: a GPU's timings are steady), ROUNDS (2 interleaved
# rounds), BENCH_ARGS (extra suite arguments, e.g. "--train-steps 200"), SANITIZE_TIMEOUT (150 s),
# SUITES ("bench_linear bench_predictive bench_kl bench_estimators bench_distributed").
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
  echo "build: rc $build_rc in $((SECONDS - start)) s"
  if [[ $build_rc != 0 ]]; then
    grep -B2 -A12 -m3 "error" "$LOG_DIR/gpu_build.txt" | head -80
    exit 2
  fi
  $PY -c "import bnn_fast, sys; b = bnn_fast.backend(); print(b); sys.exit(0 if b.cuda_compiled and b.cuda_available else 1)" || exit 3

  xdist=()
  $PY -c "import xdist" 2>/dev/null && xdist=(-n "${TEST_WORKERS:-8}")
  start=$SECONDS
  timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -q -rs --tb=short -p no:cacheprovider "${xdist[@]}" ${TEST_ARGS:-} tests \
    >"$LOG_DIR/gpu_tests.txt" 2>&1
  tests_rc=$?
  echo "tests: rc $tests_rc in $((SECONDS - start)) s"
  grep -E "^(FAILED|ERROR)|passed|failed" "$LOG_DIR/gpu_tests.txt" | tail -40
fi

if want bench; then
  for suite in ${SUITES:-bench_linear bench_predictive bench_kl bench_estimators bench_distributed}; do
    start=$SECONDS
    echo "===== $suite =====" >>"$LOG_DIR/gpu_bench.txt"
    timeout "${BENCH_TIMEOUT:-240}" $PY -m benchmarks.$suite --device cuda \
      --min-run-time "${MIN_RUN_TIME:-0.2}" --rounds "${ROUNDS:-2}" ${BENCH_ARGS:-} >>"$LOG_DIR/gpu_bench.txt" 2>&1
    echo "$suite: rc $? in $((SECONDS - start)) s" | tee -a "$LOG_DIR/gpu_bench.txt"
    tar czf "$LOG_DIR/gpu_results.tgz" "$RESULTS"/*_cuda.* 2>/dev/null
  done
  grep -A40 "^## Targets" "$RESULTS"/*_cuda.md 2>/dev/null | grep -E "\| (yes|NO) \|" | cut -c1-200
fi

if want demo; then
  start=$SECONDS
  timeout 120 $PY -m bnn_fast.examples.regression --device cuda --no-progress --out /tmp/regression_cuda.png \
    >"$LOG_DIR/gpu_demo.txt" 2>&1
  echo "demo: rc $? in $((SECONDS - start)) s"
  tail -8 "$LOG_DIR/gpu_demo.txt"
fi

if want sanitize; then
  if command -v compute-sanitizer >/dev/null; then
    start=$SECONDS
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANITIZE_TIMEOUT:-150}" compute-sanitizer --tool memcheck \
      --error-exitcode 9 $PY -m benchmarks.cuda_smoke >"$LOG_DIR/gpu_sanitizer.txt" 2>&1
    echo "sanitizer: rc $? in $((SECONDS - start)) s"
    tail -3 "$LOG_DIR/gpu_sanitizer.txt"
  else
    echo "compute-sanitizer not found: memcheck skipped"
  fi
fi
exit "${tests_rc:-0}"
