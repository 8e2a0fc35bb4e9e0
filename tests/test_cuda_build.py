"""The GPUs the built library runs on: the default CUDA build carries sm_80 and sm_90 code and
sm_90 PTX, which the driver compiles for any newer GPU (without PTX a B200 or an RTX 50xx gets
"no kernel image is available for execution on the device").

Reads the library with cuobjdump: the toolkit's, else the one a CUDA torch's triton ships
(triton/backends/nvidia/bin), else the nvidia-cuda-cuobjdump package's; skips without one.
"""
import ast
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

import bnn_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_arch():
    """setup.py's DEFAULT_ARCH, read without running setup.py."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEFAULT_ARCH" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no DEFAULT_ARCH")


def find_cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    for entry in sys.path:
        candidates += glob.glob(os.path.join(entry, "nvidia", "*", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def test_the_default_architectures_end_in_ptx():
    arch = default_arch()
    assert arch.endswith("+PTX") and {"8.0", "9.0"} <= set(arch.replace("+PTX", "").split(";"))


def test_the_default_build_carries_sm80_and_sm90_code_and_ptx():
    if not bnn_fast.backend().cuda_compiled:
        pytest.skip("the CUDA kernels are not compiled")
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (toolkit, triton or nvidia-cuda-cuobjdump)")
    lib = bnn_fast._ops._c_module.__file__
    elf = subprocess.run([tool, "--list-elf", lib], capture_output=True, text=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", lib], capture_output=True, text=True)
    archs = sorted(set(re.findall(r"\.sm_(\d+)\.cubin", elf)))
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or os.environ.get("BNN_FAST_CUDA_ARCH") or archs != ["80", "90"]:
        pytest.skip(f"not a default build (ELF for sm_{archs}; the default is {default_arch()})")
    assert re.search(r"sm_90\.ptx", ptx.stdout), ptx.stdout + ptx.stderr
