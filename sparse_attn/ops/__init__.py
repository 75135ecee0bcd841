"""Attention operators: one folder per kernel family (its Triton kernels and its thin checked entry), the
fp32 references, and one entry that picks the family from the layout:

    p = sparse_attn.ops.plan(q, k, v, layout)              # optional, reusable for this layout and shapes
    out = sparse_attn.ops.attention(q, k, v, layout, plan=p)

A Layout class names its family's entry module (`Layout.kernels`); that module names the Layout type it
runs (`LAYOUT`) and provides `attention(q, k, v, layout, *, causal, scale, cu_seqlens_q, cu_seqlens_k,
return_lse, plan)` and `plan(q, k, v, layout, *, causal, cu_seqlens_q, cu_seqlens_k)`.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, Optional

import torch

from ..layouts import Layout
from .reference import reference_attention, sdpa_layout_attention

__all__ = ["attention", "plan", "register_kernel_family", "kernel_family", "reference_attention",
           "sdpa_layout_attention"]

_FAMILIES: Dict[type, ModuleType] = {}


def register_kernel_family(module: ModuleType) -> None:
    """Route layouts of type module.LAYOUT (and its subclasses) to the module's attention / plan."""
    if not (isinstance(getattr(module, "LAYOUT", None), type) and issubclass(module.LAYOUT, Layout)):
        raise TypeError(f"module: expected a LAYOUT attribute naming a Layout subclass, in {module.__name__}")
    _FAMILIES[module.LAYOUT] = module


def kernel_family(layout) -> ModuleType:
    """The entry module of the kernel family that runs `layout`."""
    for cls in type(layout).__mro__:
        if cls in _FAMILIES:
            return _FAMILIES[cls]
    path = getattr(type(layout), "kernels", None)
    if isinstance(layout, Layout) and path:
        # Imported on first use, so a missing dependency reaches only its own layouts.
        register_kernel_family(importlib.import_module(path))
        return kernel_family(layout)
    raise TypeError(f"layout: no kernel family runs {type(layout).__name__} "
                    f"(known: {sorted(c.__name__ for c in _FAMILIES)})")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, *, causal: bool = True,
              scale: Optional[float] = None, cu_seqlens_q=None, cu_seqlens_k=None, return_lse: bool = False,
              plan=None):
    """softmax(q k^T * scale) @ v over the keys `layout` lists (and the causal band), on the layout's kernel
    family. q [B, Hq, Sq, D] / k, v [B, Hkv, Sk, D], or packed [T, H, D] with cu_seqlens; see the family's
    attention for the details. plan: from `plan(...)` for this layout and these shapes, or None."""
    return kernel_family(layout).attention(q, k, v, layout, causal=causal, scale=scale, cu_seqlens_q=cu_seqlens_q,
                                           cu_seqlens_k=cu_seqlens_k, return_lse=return_lse, plan=plan)


def plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout, *, causal: bool = True,
         cu_seqlens_q=None, cu_seqlens_k=None):
    """The launch plan of `layout` for inputs shaped like q, k, v, made by its family (None where the family
    runs these inputs on the reference). Held by the caller and passed to `attention(..., plan=)`."""
    return kernel_family(layout).plan(q, k, v, layout, causal=causal, cu_seqlens_q=cu_seqlens_q,
                                      cu_seqlens_k=cu_seqlens_k)
