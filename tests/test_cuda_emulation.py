"""The CUDA kernels executed on the CPU, on every test run, without a GPU.

tests/cuda_emu/build.py compiles the unmodified csrc/cuda/*_kernel.cu sources with g++ against a
small shim of the CUDA execution model (tests/cuda_emu/emu.h: threadIdx, blockIdx, blockDim,
gridDim, __syncthreads, __shfl_xor_sync, the launch) under AddressSanitizer and UBSan, together
with tests/cuda_emu/cases.cpp, which calls every ``launch_*`` entry point of
csrc/cuda/launchers.h and compares the results with references built from the same
``__host__ __device__`` element functions, bit for bit (the references follow the kernels' order
of operations). Blocks run one after another; a block's threads run as fibers, so barriers and
warp shuffles work and are checked; grid-stride kernels also run with the grid capped to 1 and 3
blocks, so that every stride loop takes several turns.

What a clean run proves:
  - index arithmetic: every element of every output is written, with the value of its own index
    (noise indices included: the mapping of (seed, stream, index) to Philox blocks and lanes, past
    Philox block 2^32 too); no signed overflow (UBSan);
  - bounds and tails: buffers have exactly the size a launch needs (AddressSanitizer stops any
    read or write past either end), numel % 4 = 0..3, partial quads at both ends of a row, empty
    tensors, in = 0 and hidden = 0;
  - alignment preconditions: buffers that start one element into their allocation (not 16-byte
    aligned) take the scalar paths; a float4 access at such an address is a UBSan error;
  - barrier and shuffle participation: a full-mask __shfl_xor_sync must be reached by all 32 lanes
    of the warp, a __syncthreads by every live thread of the block, at the same source line;
  - launch configurations the runtime would reject (a zero or oversized grid or block).
What it cannot prove:
  - device floating point: the emulation runs the host branches of the shared headers (no
    __CUDA_ARCH__: libm's exp, no FMA contraction), so CUDA's expf and nvcc's contraction of the
    sampled weights are not what is checked here (the noise itself is the same on both: see
    box_muller.h);
  - the memory model: blocks never run concurrently, threads interleave only at barriers and
    shuffles, so races between blocks or missing __syncthreads between shared-memory phases of one
    warp go unseen (compute-sanitizer racecheck on a GPU covers that: benchmarks/run_gpu.sh);
  - timing, occupancy, register pressure and launch limits of a real device;
  - AddressSanitizer's stack redzones of a thread's locals that live across a barrier or shuffle
    (the fiber switch clears them; UBSan's bounds check still covers indexing of local arrays).

Skips (with the reason) where g++ or the CUDA headers are missing. The case count and the time
are printed in the test summary.
"""
import importlib.util
import os
import re
import subprocess
import time

import pytest

from conftest import EMULATION

_spec = importlib.util.spec_from_file_location(
    "cuda_emu_build", os.path.join(os.path.dirname(__file__), "cuda_emu", "build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

GROUPS = ["fill_normal", "sample", "weight_grads", "fused_small_batch", "local", "flipout",
          "mlp_inference", "gaussian_kl"]

# Sanitizer settings: stop at the first report; ASan's one-time notice that it does not model
# swapcontext (the fibers) is not a report.
ENV = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:abort_on_error=0",
           UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
REPORT = re.compile(r"ERROR: AddressSanitizer|runtime error:|EMULATION ERROR|ERROR: LeakSanitizer")


@pytest.fixture(scope="module")
def emulator():
    start = time.perf_counter()
    try:
        path = build.build()
    except build.Unavailable as exc:
        pytest.skip(f"CUDA emulation not built: {exc}")
    EMULATION["build_s"] = time.perf_counter() - start
    return path


def run(emulator, *args):
    return subprocess.run([emulator, *args], capture_output=True, text=True, env=ENV, timeout=600)


@pytest.mark.parametrize("group", GROUPS)
def test_kernels_match_reference_under_sanitizers(emulator, group):
    start = time.perf_counter()
    r = run(emulator, group)
    EMULATION["run_s"] = EMULATION.get("run_s", 0.0) + time.perf_counter() - start
    output = r.stdout + r.stderr
    assert r.returncode == 0 and not REPORT.search(output), output[-8000:]
    cases = re.search(r"^cases (\d+) launches (\d+) blocks (\d+) failures 0$", r.stdout, re.M)
    assert cases, output[-8000:]
    EMULATION["cases"] = EMULATION.get("cases", 0) + int(cases.group(1))
    EMULATION["launches"] = EMULATION.get("launches", 0) + int(cases.group(2))


@pytest.mark.parametrize("name, report", [
    ("shuffle_after_early_return", "a full-mask __shfl_xor_sync not reached by every lane"),
    ("barriers_in_branches", "threads of a block wait at different __syncthreads"),
    ("misaligned_float4", "runtime error: .*misaligned address"),
    ("write_past_end", "ERROR: AddressSanitizer: heap-buffer-overflow"),
])
def test_emulation_stops_a_kernel_that_breaks_a_rule(emulator, name, report):
    r = run(emulator, "--selftest", name)
    assert r.returncode not in (0, 2, 3), r.stdout + r.stderr
    assert re.search(report, r.stderr), r.stderr[-4000:]


def test_launch_rewrite_keeps_template_arguments_and_configuration():
    src = "k<T, R><<<unsigned(blocks), kThreads, 0, stream>>>(a, f(b, c));"
    assert build.rewrite_launches(src) == (
        '::emu::launch("k<T, R>", ::emu::Config{unsigned(blocks), kThreads, 0, stream}, k<T, R>, a, f(b, c));')
