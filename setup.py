"""Builds hybridpar_ext and its compiled module hybridpar_ext._C.

- CUDAExtension (C++ and .cu sources) when torch is a CUDA build and nvcc is found, or
  when HYBRIDPAR_FORCE_CUDA=1; CppExtension (C++ sources only) otherwise.
- Honours TORCH_CUDA_ARCH_LIST (default "8.0;9.0": A100 and H100/H200), MAX_JOBS and
  CUDA_HOME, as torch.utils.cpp_extension does.
- HYBRIDPAR_BUILD_DIR puts the intermediate files elsewhere than build/, so builds against
  two torch installs (CPU and CUDA) can live side by side.

Install with `pip install --no-build-isolation .`: _C must be compiled against the torch
that will import it, not against one pip downloads into a throwaway build environment.
"""

import glob
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build import build

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def want_cuda() -> bool:
    if os.environ.get("HYBRIDPAR_FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def nccl_include_dirs():
    """Where nccl.h is: the CUDA toolkit, or the nvidia-nccl wheel that CUDA torch brings."""
    candidates = []
    if cpp_extension.CUDA_HOME:
        candidates.append(os.path.join(cpp_extension.CUDA_HOME, "include"))
    for site in sys.path:
        candidates += glob.glob(os.path.join(site, "nvidia", "nccl*", "include"))
        candidates += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
    return [d for d in candidates if os.path.isfile(os.path.join(d, "nccl.h"))][:1]


def extension():
    defines = [("HYBRIDPAR_TORCH_VERSION", torch.__version__)]
    cxx_flags = ["-O3"]  # the C++ standard is the one torch asks for (C++17 or C++20)
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/comm/*.cpp"))
    if not want_cuda():
        return cpp_extension.CppExtension(
            "hybridpar_ext._C", sources, define_macros=defines,
            extra_compile_args={"cxx": cxx_flags})

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    defines.append(("HYBRIDPAR_WITH_CUDA", None))
    include_dirs = nccl_include_dirs()
    if include_dirs:
        defines.append(("HYBRIDPAR_WITH_NCCL", None))
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/comm/*.cu"))
    return cpp_extension.CUDAExtension(
        "hybridpar_ext._C", sources, define_macros=defines, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]})


class Build(build):
    def initialize_options(self):
        super().initialize_options()
        self.build_base = os.environ.get("HYBRIDPAR_BUILD_DIR", "build")


setup(
    # kernels/ sits at the top of the repository and ships as hybridpar_ext.kernels.
    packages=find_packages(include=["hybridpar_ext", "hybridpar_ext.*"]) + ["hybridpar_ext.kernels"],
    package_dir={"hybridpar_ext.kernels": "kernels"},
    # The trainer's default text (byte-level): the opening of Shakespeare's Coriolanus.
    package_data={"hybridpar_ext": ["data/*.txt"]},
    ext_modules=[extension()],
    cmdclass={"build": Build, "build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
