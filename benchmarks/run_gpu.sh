#!/usr/bin/env bash
# One call on a CUDA machine that has torch but no network: build the extension with its CUDA
# part, run the whole test suite (the CUDA cases included), then the GPU benchmarks. Results go to
# benchmarks/results/ (and $OUT when set), named after the card.
#
# The anchors (torchbnn, bayesian-torch, blitz) are pure Python: where pip cannot reach PyPI,
# carry their wheels in .whl/ (pip download --no-deps -d .whl torchbnn==1.2 bayesian-torch
# blitz-bayesian-pytorch) and they are installed from there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/bnn-site .whl/*.whl
  export PYTHONPATH=/tmp/bnn-site${PYTHONPATH:+:$PYTHONPATH}
fi

card=$($PY -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
nvidia-smi | tee "$RESULTS/gpu_${card}_nvidia-smi.txt"

BNN_FAST_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py -q build_ext --inplace
$PY -c "import bnn_fast, sys; b = bnn_fast.backend(); print(b); sys.exit(0 if b.cuda_compiled and b.cuda_available else 1)"

set +e
$PY -m pytest -q -rs 2>&1 | tee "$RESULTS/gpu_${card}_tests.txt"
tests_rc=${PIPESTATUS[0]}
set -e

$PY -m benchmarks.run_all --device cuda 2>&1 | tee "$RESULTS/gpu_${card}_benchmarks.txt"

if [ -n "${OUT:-}" ]; then
  cp "$RESULTS"/gpu_"${card}"_* "$RESULTS"/*_cuda.* "$OUT"/ 2>/dev/null || true
fi
exit "$tests_rc"
