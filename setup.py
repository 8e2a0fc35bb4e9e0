"""Build bnn_fast._C: the C++ (CPU) operators always, the CUDA operators when possible.

Environment flags
-----------------
BNN_FAST_NO_EXTENSION=1   build nothing; the package runs on its pure-PyTorch path.
BNN_FAST_NO_CUDA=1        build only the C++ part even where CUDA could be built.
BNN_FAST_FORCE_CUDA=1     fail unless the CUDA part is built.
BNN_FAST_CUDA_ARCH=...    the CUDA architectures, e.g. "8.0;9.0+PTX" (else TORCH_CUDA_ARCH_LIST,
                          else the visible GPU, else "8.0;9.0+PTX" when no GPU is visible).
CUDA_HOME                 the CUDA toolkit (else the nvcc on PATH, else /usr/local/cuda).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# A100 and H100/H200 code, and sm_90 PTX that the driver compiles for any newer GPU (B200,
# RTX 50xx): without it they get "no kernel image is available for execution on the device".
DEFAULT_ARCH = "8.0;9.0+PTX"


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """The CUDA toolkit: CUDA_HOME/CUDA_PATH, else the toolkit of the nvcc on PATH, else
    /usr/local/cuda. A candidate counts only if it has bin/nvcc and include/cuda_runtime.h (an nvcc
    wrapper in /usr/local/bin must not make /usr/local the toolkit)."""

    def is_toolkit(home):
        return bool(home) and all(
            os.path.exists(os.path.join(home, *p)) for p in (("bin", "nvcc"), ("include", "cuda_runtime.h"))
        )

    nvcc = shutil.which("nvcc")
    candidates = [
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None,
        "/usr/local/cuda",
    ]
    return next((c for c in candidates if is_toolkit(c)), None)


def _pip_cuda_includes():
    """Headers of the pip-installed CUDA libraries (site-packages/nvidia/cu13/include: cuBLAS,
    cuSPARSE, ...) that torch's CUDA headers include but a bare toolkit may lack. They go *after*
    the toolkit's own include directory (-idirafter): that folder also holds a partial copy of
    cuda_runtime.h which must not shadow nvcc's."""
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "cu[0-9]*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _cuda_plan(torch):
    """Decide whether to build CUDA; returns (build_cuda, reason)."""
    if _flag("BNN_FAST_NO_CUDA"):
        return False, "BNN_FAST_NO_CUDA is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    home = _find_cuda_home()
    if home is None:
        return False, "nvcc not found (set CUDA_HOME)"
    # cpp_extension reads CUDA_HOME once, when it is imported: set it first.
    os.environ["CUDA_HOME"] = home
    arch = os.environ.get("BNN_FAST_CUDA_ARCH") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch and not torch.cuda.is_available():
        arch = DEFAULT_ARCH  # no GPU to detect: torch would raise IndexError
    if arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    return True, f"CUDA {torch.version.cuda}, nvcc at {home}, arch {arch or 'detected'}"


def _extensions():
    if _flag("BNN_FAST_NO_EXTENSION"):
        print("bnn_fast: BNN_FAST_NO_EXTENSION is set, building no extension")
        return [], {}
    import torch

    build_cuda, reason = _cuda_plan(torch)
    if _flag("BNN_FAST_FORCE_CUDA") and not build_cuda:
        raise RuntimeError(f"BNN_FAST_FORCE_CUDA is set but CUDA cannot be built: {reason}")
    print(f"bnn_fast: CUDA part {'on' if build_cuda else 'off'} ({reason})")

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    csrc = os.path.join("csrc")
    sources = [os.path.join(csrc, "ops.cpp"), os.path.join(csrc, "autograd.cpp")] + sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    # -fopenmp: at::parallel_for is a header template that runs serially unless the translation
    # unit itself is compiled with OpenMP (ATen/ParallelOpenMP.h tests _OPENMP).
    cxx = ["-O3", "-std=c++20", "-fno-fast-math", "-ffp-contract=off", "-Wno-psabi", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, csrc)]
    define_macros = []
    # An explicit -lstdc++ after the objects: the extension then always uses the process's
    # libstdc++ (the one PyTorch loaded). A compiler wrapper that links -static-libstdc++ (the
    # GPU machine's /opt/gcc/bin/g++ does) otherwise put a private copy of the library into _C,
    # whose stream code used the other copy's locale: every error message with a number in it
    # segfaulted there (here, built the same way, the numbers were silently missing).
    link = ["-fopenmp"] + (["-lstdc++"] if sys.platform.startswith("linux") else [])
    if build_cuda:
        sources += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
        cxx = cxx + [flag for d in _pip_cuda_includes() for flag in ("-idirafter", d)]
        define_macros.append(("BNN_FAST_WITH_CUDA", None))
        nvcc = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
        ext = CUDAExtension(
            "bnn_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
            py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "bnn_fast._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
            py_limited_api=True,
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["bnn_fast", "bnn_fast.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
