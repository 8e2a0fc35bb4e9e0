"""Builds the host emulation of the CUDA kernels (see tests/test_cuda_emulation.py).

The unmodified csrc/cuda/*_kernel.cu sources are copied with one mechanical change, each launch
``k<<<grid, block, shmem, stream>>>(args)`` rewritten to
``::emu::launch("k", ::emu::Config{grid, block, shmem, stream}, k, args)``, and compiled by g++
against the shim in this folder (cuda_runtime.h, emu.h) with AddressSanitizer and UBSan, together
with runtime.cpp, cases.cpp (the cases and their references) and selftest_kernel.cu (kernels
that break a rule on purpose, rewritten the same way). Objects and binary are
cached under build/cuda_emu/ by the hash of what they are built from, so a test run compiles
only what changed (a clean clone: everything, once).

    python tests/cuda_emu/build.py   # prints the binary's path (or why it cannot be built)
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")

FLAGS = [
    "-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer", "-fno-fast-math", "-ffp-contract=off",
    "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-Wall", "-Wno-unknown-pragmas",
    "-Wno-unused-function", "-Wno-sign-compare",
]

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)


class Unavailable(Exception):
    """g++ or the CUDA headers are missing: the emulation cannot be built here."""


def rewrite_launches(source: str) -> str:
    """`k<<<cfg>>>(args)` -> `::emu::launch("k", ::emu::Config{cfg}, k, args)`."""
    def sub(m):
        kernel, cfg = m.group(1), " ".join(m.group(2).split())
        return f'::emu::launch("{kernel}", ::emu::Config{{{cfg}}}, {kernel}, '
    out = _LAUNCH.sub(sub, source)
    if "<<<" in out:
        raise RuntimeError("a kernel launch the rewrite does not understand is left")
    return out


def cuda_include_dir() -> str:
    """A directory with the toolkit's cuda_runtime.h, cuda_fp16.h and cuda_bf16.h (the toolkit,
    as setup.py finds it; else a pip-installed nvidia/cu* include folder)."""
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None, "/usr/local/cuda"]
    dirs = [os.path.join(h, "include") for h in homes if h]
    for entry in sys.path:
        dirs += sorted(glob.glob(os.path.join(entry, "nvidia", "cu[0-9]*", "include")))
    needed = ("cuda_runtime.h", "cuda_runtime_api.h", "cuda_fp16.h", "cuda_bf16.h")
    for d in dirs:
        if all(os.path.exists(os.path.join(d, h)) for h in needed):
            return d
    raise Unavailable("no CUDA headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h) found: set CUDA_HOME")


def compiler() -> str:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if cxx is None:
        raise Unavailable("no g++ on PATH")
    return cxx


def _headers() -> list[str]:
    """The headers the emulation can include: csrc's torch-free ones (a header that includes
    ATen or torch is the glue's, and changing it needs no rebuild here) and the shim's."""
    files = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cuh")) + glob.glob(os.path.join(CSRC, "cuda", "*.h")))
    files += sorted(glob.glob(os.path.join(CSRC, "*.h")))
    torch_free = []
    for path in files:
        with open(path) as f:
            if not re.search(r"#include\s*[<\"](ATen|torch|c10)/", f.read()):
                torch_free.append(path)
    return torch_free + sorted(glob.glob(os.path.join(HERE, "*.h"))) + [os.path.abspath(__file__)]


def _check_sanitizers(cxx: str, out_root: str) -> None:
    """Raises Unavailable where g++ cannot build and run an ASan + UBSan program (no libasan, or
    a kernel whose address-space layout the sanitizer runtime cannot use)."""
    src = os.path.join(out_root, f"probe{os.getpid()}.cpp")
    with open(src, "w") as f:
        f.write("int main() { return 0; }\n")
    try:
        r = subprocess.run([cxx, *FLAGS, src, "-o", src + ".bin"], capture_output=True, text=True)
        if r.returncode != 0:
            raise Unavailable(f"g++ cannot build a sanitized program: {r.stderr.strip()[-300:]}")
        r = subprocess.run([src + ".bin"], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise Unavailable(f"a sanitized program does not run here: {r.stderr.strip()[-300:]}")
    finally:
        for path in (src, src + ".bin"):
            if os.path.exists(path):
                os.remove(path)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def build(out_root: str | None = None, jobs: int = 2) -> str:
    """The path of the emulation binary. Each object is cached under its own hash (its source,
    every header, the compiler and the flags) and the binary under the hash of its objects, so
    a test run compiles only what changed."""
    cxx, include = compiler(), cuda_include_dir()
    out_root = out_root or os.path.join(ROOT, "build", "cuda_emu")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    common = [version.encode(), include.encode(), " ".join(FLAGS).encode()]
    for path in _headers():
        with open(path, "rb") as f:
            common += [os.path.relpath(path, ROOT).encode(), f.read()]
    # (name, text) of every translation unit; the .cu files with their launches rewritten.
    units = []
    kernels = sorted(glob.glob(os.path.join(CSRC, "cuda", "*_kernel.cu")))
    for path in kernels + [os.path.join(HERE, "selftest_kernel.cu")]:
        with open(path) as f:
            text = f'#line 1 "{os.path.relpath(path, ROOT)}"\n' + rewrite_launches(f.read())
        units.append((os.path.basename(path)[: -len(".cu")] + ".cpp", text))
    for name in ("runtime.cpp", "cases.cpp"):
        with open(os.path.join(HERE, name)) as f:
            units.append((name, f'#line 1 "tests/cuda_emu/{name}"\n' + f.read()))
    obj_dir = os.path.join(out_root, "obj")
    os.makedirs(obj_dir, exist_ok=True)
    objects = [os.path.join(obj_dir, f"{name[:-4]}-{_digest(*common, text.encode())}.o") for name, text in units]
    binary = os.path.join(out_root, "emu-" + _digest(*(o.encode() for o in objects)))
    if os.path.exists(binary):
        return binary
    _check_sanitizers(cxx, out_root)
    # The shim first, so that <cuda_runtime.h> is ours; the toolkit's headers after csrc's.
    includes = ["-I", HERE, "-I", CSRC, "-idirafter", include]

    def compile_one(unit):
        (name, text), obj = unit
        if os.path.exists(obj):
            return
        src = f"{obj}.{os.getpid()}.cpp"
        with open(src, "w") as f:
            f.write(text)
        r = subprocess.run([cxx, *FLAGS, *includes, "-c", src, "-o", src + ".o"], capture_output=True, text=True)
        os.remove(src)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {name} for the emulation failed:\n{r.stderr[-6000:]}")
        os.replace(src + ".o", obj)

    # The largest translation units first, so that the jobs finish together.
    todo = sorted(zip(units, objects), key=lambda u: -len(u[0][1]))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(compile_one, todo))
    tmp = f"{binary}.{os.getpid()}"
    r = subprocess.run([cxx, *FLAGS, *objects, "-o", tmp], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"linking the emulation failed:\n{r.stderr[-6000:]}")
    os.replace(tmp, binary)
    return binary


if __name__ == "__main__":
    try:
        print(build())
    except Unavailable as exc:
        print(f"cannot build the CUDA emulation: {exc}")
        sys.exit(1)
