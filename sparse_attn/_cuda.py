"""The compiled CUDA extension `sparse_attn._C`, loaded on first use.

Order: the module setup.py built (pip install -e . on a machine with CUDA torch and nvcc); else a
just-in-time build of csrc/ with torch.utils.cpp_extension.load, when torch has CUDA, nvcc is on the
PATH and SPARSE_ATTN_JIT is not "0". A failure is remembered, so callers pay for it once, and
`load()` returns None; `load_error()` says why.
"""
from __future__ import annotations

import glob
import os
import shutil
from typing import Optional

import torch

__all__ = ["load", "load_error"]

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
_state: dict = {}


def _jit_build():
    if os.environ.get("SPARSE_ATTN_JIT") == "0":
        raise RuntimeError("not built, and SPARSE_ATTN_JIT=0 forbids a just-in-time build")
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        raise RuntimeError("not built, and no CUDA torch + nvcc for a just-in-time build")
    sources = sorted(glob.glob(os.path.join(_CSRC, "*.cu")) + glob.glob(os.path.join(_CSRC, "*.cpp")))
    if not sources:
        raise RuntimeError(f"no CUDA sources under {_CSRC}")
    from torch.utils.cpp_extension import load as cpp_load

    return cpp_load("sparse_attn_C", sources, extra_cflags=["-O3"], extra_cuda_cflags=["-O3"], verbose=False)


def load():
    """The extension module, or None when it cannot be had (see load_error)."""
    if "module" not in _state:
        try:
            from . import _C as module  # type: ignore[attr-defined]
        except ImportError:
            try:
                module = _jit_build()
            except Exception as e:  # any build failure means "no extension", said once
                module = None
                _state["error"] = f"{type(e).__name__}: {e}"
        _state["module"] = module
    return _state["module"]


def load_error() -> Optional[str]:
    load()
    return _state.get("error")
