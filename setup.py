"""Builds eefast and its C++/CUDA extension eefast._C.

The extension is a CUDAExtension whenever a CUDA toolkit is found and the installed torch is
a CUDA build (no GPU is needed to compile), else a CppExtension. Knobs (environment):

    EEFAST_NO_EXT=1       pure-Python install (eefast then uses its PyTorch fallbacks)
    EEFAST_NO_CUDA=1      CPU-only extension even where CUDA could be compiled
    EEFAST_FORCE_CUDA=1   fail unless the CUDA extension can be built
    TORCH_CUDA_ARCH_LIST  CUDA architectures; with none set and no GPU visible, DEFAULT_CUDA_ARCHS

Install with ``pip install --no-build-isolation -e .`` so the build uses the installed torch.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def find_cuda_home() -> str | None:
    """A CUDA toolkit directory holding bin/nvcc, looked for as torch does, plus /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").exists():
            return home
    return None


def read_sources() -> tuple[list[str], list[str]]:
    """(C++ sources, CUDA sources) from csrc/SOURCES, relative to the project root."""
    cpp, cuda, section = [], [], "cpp"
    for line in (CSRC / "SOURCES").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line == "[cuda]":
            section = "cuda"
            continue
        (cuda if section == "cuda" else cpp).append(f"csrc/{line}")
    return cpp, cuda


def extension_modules():
    if env_flag("EEFAST_NO_EXT"):
        print("eefast build: EEFAST_NO_EXT=1, pure-Python install (no eefast._C)", file=sys.stderr)
        return [], {}

    cuda_home = find_cuda_home()
    if cuda_home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    torch_has_cuda = torch.version.cuda is not None
    with_cuda = bool(cuda_home) and torch_has_cuda and not env_flag("EEFAST_NO_CUDA")
    if env_flag("EEFAST_FORCE_CUDA") and not with_cuda:
        raise RuntimeError(
            "EEFAST_FORCE_CUDA=1 but the CUDA extension cannot be built: expected a CUDA toolkit "
            f"(found: {cuda_home or 'none'}), a CUDA build of torch (found torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}) and EEFAST_NO_CUDA unset (it is {os.environ.get('EEFAST_NO_CUDA')!r})"
        )

    cpp_sources, cuda_sources = read_sources()
    # at::parallel_for is an OpenMP pragma in torch's headers: without -fopenmp it runs serially.
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    link_flags = ["-fopenmp"]
    define_macros = []
    archs = None
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "the visible GPUs'")
        define_macros += [("EEFAST_WITH_CUDA", None), ("EEFAST_CUDA_ARCHS", f'"{archs}"')]
        # csrc/cuda includes only c10/cuda headers: ATen/cuda/CUDAContext.h would need the
        # cuBLAS/cuSPARSE headers that a bare toolkit may lack.
        ext = CUDAExtension(
            "eefast._C",
            cpp_sources + cuda_sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension("eefast._C", cpp_sources, define_macros=define_macros,
                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

    print(
        f"eefast build: torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"CUDA toolkit {cuda_home or 'not found'}, extension: {'CUDA + CPU' if with_cuda else 'CPU only'}"
        + (f", archs {archs}" if with_cuda else ""),
        file=sys.stderr,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=["eefast", "eefast.models", "eefast.kernels", "eefast.kernels.exit_head"],
    package_dir={"eefast": "eefast", "eefast.kernels": "kernels", "eefast.kernels.exit_head": "kernels/exit_head"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
