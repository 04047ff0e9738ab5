"""Builds torchrec_tt._C from csrc/: the CPU kernels always, the CUDA kernels where torch has CUDA.

Set TORCHREC_TT_FORCE_CUDA=1 to build CUDA without a visible GPU (then TORCH_CUDA_ARCH_LIST picks the
architectures, e.g. "8.0;9.0"), or TORCHREC_TT_NO_CUDA=1 to skip it.
"""
import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _want_cuda() -> bool:
    if os.environ.get("TORCHREC_TT_NO_CUDA") == "1" or torch.version.cuda is None or CUDA_HOME is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TORCHREC_TT_FORCE_CUDA") == "1"


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is an inline OpenMP region; without it the loops run serially.
    # -fno-math-errno: sqrt in the Adagrad loops vectorises (the kernels never read errno)
    cxx = ["-O3", "-fopenmp", "-std=c++20", "-fno-math-errno"]
    if _want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        nvcc = ["-O3", "--use_fast_math", "-std=c++20", "--expt-relaxed-constexpr"]
        return CUDAExtension("torchrec_tt._C", sources, extra_compile_args={"cxx": cxx + ["-DTORCHREC_TT_CUDA"], "nvcc": nvcc},
                             extra_link_args=["-fopenmp"])
    return CppExtension("torchrec_tt._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(
    name="torchrec_tt",
    version="0.1.0",
    description="Tensor-Train compressed embedding tables for TorchRec",
    packages=["torchrec_tt", "torchrec_tt.modules", "torchrec_tt.distributed", "torchrec_tt.planner"],
    package_dir={"torchrec_tt.planner": "planner"},
    package_data={"torchrec_tt.planner": ["*.yaml", "*.json"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
)
