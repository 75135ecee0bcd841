"""Install sparse_attn. The CUDA extension in csrc/ is built only where a CUDA build of torch and
nvcc are both present (install with --no-build-isolation so the build sees that torch); everywhere
else the package installs pure-Python and runs its Triton / PyTorch paths."""
import glob
import os
import shutil

from setuptools import find_packages, setup


def cuda_extensions():
    if os.environ.get("SPARSE_ATTN_NO_CUDA") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        return [], {}
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources:
        return [], {}
    ext = CUDAExtension(
        "sparse_attn._C",
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=sm_80"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="sparse_attn",
    version="0.1.0",
    description="Sparse attention kernels, estimators and model adapters for long-context LLM inference",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sparse_attn", "sparse_attn.*"]),
    package_data={"sparse_attn": ["py.typed"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "triton>=3.0", "einops", "numpy"],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6"],
        "hf": ["transformers>=4.48", "accelerate", "gguf", "tqdm"],
        "bench": ["matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["sparse-attn=sparse_attn.cli:main"],
                  "vllm.general_plugins": ["sparse_attn = sparse_attn.integrations.vllm:register"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
