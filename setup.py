"""Builds llama_fast._C, the C++/CUDA extension holding every llama_fast op.

CUDA sources are compiled whenever the installed torch is a CUDA build and nvcc is found,
whether or not a GPU is visible. Environment:
  LLAMA_FAST_CUDA=0/1     force the CUDA kernels off / on (1 fails loudly without nvcc)
  TORCH_CUDA_ARCH_LIST    GPU architectures; default: the visible GPUs', else "8.0;9.0"
  MAX_JOBS                parallel compile jobs (ninja)
"""

import glob
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()


def _default_cuda_home():
    # A CUDA toolkit in the standard place wins over torch's guess from the nvcc on PATH,
    # which can be a wrapper script outside the toolkit.
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
        if Path("/usr/local/cuda/bin/nvcc").exists():
            os.environ["CUDA_HOME"] = "/usr/local/cuda"


_default_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def want_cuda() -> bool:
    forced = os.environ.get("LLAMA_FAST_CUDA")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if forced is None:
        return available
    if forced not in ("0", "1"):
        sys.exit(f"LLAMA_FAST_CUDA must be 0 or 1, got {forced!r}")
    if forced == "1" and not available:
        sys.exit(
            "LLAMA_FAST_CUDA=1 but CUDA cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r} (nvcc not found)"
        )
    return forced == "1"


def pip_cuda_includes():
    # PyPI's CUDA builds of torch ship the cuBLAS/cuSPARSE/cuSOLVER headers that ATen's CUDA
    # headers include in nvidia-* wheels beside torch; a bare toolkit may lack them, and
    # torch adds them to the include path only for some environments (not a venv's).
    site_packages = Path(torch.__file__).resolve().parent.parent
    return sorted(str(p) for p in site_packages.glob("nvidia/*/include") if p.is_dir())


def write_build_info(with_cuda: bool):
    (ROOT / "llama_fast" / "_build_info.py").write_text(
        "# Written by setup.py at build time; compared with the running torch at import.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
    )


def extension():
    with_cuda = want_cuda()
    write_build_info(with_cuda)
    sources = (sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/autograd/*.cpp"))
               + sorted(glob.glob("csrc/cpu/*.cpp")))
    # -fopenmp: ATen's at::parallel_for is inline OpenMP (ATen/ParallelOpenMP.h); without the
    # flag its `omp parallel` is ignored and every CPU kernel runs on one thread. The extension
    # then needs libgomp.so.1, the runtime torch itself loads (one OpenMP runtime per process).
    # -fno-math-errno: sqrt/log without errno, so the CPU loops vectorise.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", *openmp, "-fno-math-errno", "-fdiagnostics-color=always"]
    link_flags = openmp
    if not with_cuda:
        return CppExtension("llama_fast._C", sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=link_flags)
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    return CUDAExtension(
        "llama_fast._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=pip_cuda_includes(),
        define_macros=[("LLAMA_FAST_WITH_CUDA", "1")],
        # -Xptxas -v prints each kernel's registers, shared memory and spills into the build
        # log, which scripts/check_ptxas.py reads: the guard against spills and launch
        # configurations that cannot fit an SM, checked without a GPU.
        extra_compile_args={"cxx": cxx_flags,
                            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-Xptxas", "-v"]},
        extra_link_args=link_flags,
    )


setup(
    packages=find_packages(include=["llama_fast", "llama_fast.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
