"""Vertical-slash attention over a VerticalSlashLayout (contiguous key ranges plus gathered key columns):
the checked entries over the Triton kernel (kernel.py) and the Hopper Gluon kernel (hopper.py).

    p = plan(q, k, v, layout, causal=True)                  # optional: once per layout, reused across calls
    out = vertical_slash_attention(q, k, v, layout, plan=p)

Inputs the kernels cannot take run on `reference_attention`, with one warning (`not_supported_reasons`).
"""
from __future__ import annotations

import math
import os
from typing import List, Optional

import torch

from ..._checks import warn_once
from ...layouts import VerticalSlashLayout
from ..reference import check_attention_inputs, reference_attention
from . import kernel as _kernel

__all__ = ["vertical_slash_attention", "attention", "plan", "not_supported_reasons", "LAYOUT"]

LAYOUT = VerticalSlashLayout


def not_supported_reasons(q, k, v, layout, *, causal: bool = True, cu_seqlens_q=None, cu_seqlens_k=None) -> List[str]:
    """Why the Triton kernel cannot take these (already valid) inputs; empty when it can."""
    reasons = []
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not (q.is_cuda or (q.device.type == "cpu" and interpreted)):
        reasons.append(f"device {q.device}: the Triton kernel needs CUDA (or TRITON_INTERPRET=1 on CPU)")
    if q.shape[-1] not in _kernel.HEAD_DIMS:
        reasons.append(f"head_dim {q.shape[-1]}: the kernel supports {_kernel.HEAD_DIMS}")
    if layout.block_size_q not in _kernel.BLOCK_SIZES_Q:
        reasons.append(f"layout.block_size_q {layout.block_size_q}: the kernel supports {_kernel.BLOCK_SIZES_Q}")
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        reasons.append("bfloat16 on the Triton interpreter (its bf16 dot is unreliable)")
    return reasons


def _check(q, k, v, layout, cu_seqlens_q, cu_seqlens_k):
    if not isinstance(layout, VerticalSlashLayout):
        raise TypeError(f"layout: expected a VerticalSlashLayout, got {type(layout).__name__}")
    shapes = check_attention_inputs(q, k, v, layout, cu_seqlens_q, cu_seqlens_k)
    if layout.device != q.device:
        raise ValueError(f"layout: expected tensors on {q.device} (that of q), got {layout.device}")
    return shapes


def _check_scale(scale) -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive finite float or None, got {scale!r}")
    return float(scale)


def plan(q, k, v, layout: VerticalSlashLayout, *, causal: bool = True, cu_seqlens_q=None, cu_seqlens_k=None,
         **choices):
    """The launch plan of `layout` for inputs shaped like q, k, v (their data is not read): the kernel
    chosen and the layout cut into its tile list (one device sync sizes the list). None where the kernels
    will not run these inputs. Reuse it for every call with this layout and these shapes. choices: the
    kernel overrides of kernel.make_plan (config, heads, tma, backend), for benchmarks."""
    shapes = _check(q, k, v, layout, cu_seqlens_q, cu_seqlens_k)
    if not_supported_reasons(q, k, v, layout, causal=causal, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k):
        return None
    return _kernel.make_plan(q, k, v, layout, shapes, causal=bool(causal), cu_seqlens_q=cu_seqlens_q,
                             cu_seqlens_k=cu_seqlens_k, **choices)


def _alloc_outputs(q: torch.Tensor, return_lse: bool):
    """Output (q's shape and strides) and lse; a separate function so tests can poison them."""
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device) if return_lse else None
    return torch.empty_like(q), lse


def vertical_slash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: VerticalSlashLayout,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    plan=None,
):
    """softmax(q k^T * scale) @ v over the layout's key ranges and columns (and the causal band).

    q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] (any strides), or packed q [Tq, Hq, D], k/v [Tk, Hkv, D] with
    int32 cu_seqlens_q / cu_seqlens_k (layout batch = sequence). Hq a multiple of Hkv. Causal is
    bottom-right aligned. Rows that see no key give 0 (lse -inf). Returns out, or (out, lse float32
    of shape q.shape[:-1]). plan: from `plan(...)` for this layout and these shapes (None: planned here).
    Inputs the kernel does not support run on the reference, with one warning.
    """
    shapes = _check(q, k, v, layout, cu_seqlens_q, cu_seqlens_k)
    scale = _check_scale(scale)
    reasons = not_supported_reasons(q, k, v, layout, causal=causal, cu_seqlens_q=cu_seqlens_q,
                                    cu_seqlens_k=cu_seqlens_k)
    if reasons:
        warn_once("vertical_slash_attention:" + "; ".join(reasons),
                  "vertical_slash_attention: using the reference (slow): " + "; ".join(reasons))
        return reference_attention(q, k, v, layout, causal=causal, scale=scale, cu_seqlens_q=cu_seqlens_q,
                                   cu_seqlens_k=cu_seqlens_k, return_lse=return_lse)
    if plan is not None and not isinstance(plan, _kernel.Plan):
        raise TypeError(f"plan: expected what vertical_slash.plan(...) returns, got {type(plan).__name__}")
    out, lse = _alloc_outputs(q, return_lse)
    if q.numel() == 0:
        return (out, lse) if return_lse else out
    _kernel.forward(q, k, v, layout, out, lse, shapes, causal=bool(causal), scale=scale, cu_seqlens_q=cu_seqlens_q,
                    cu_seqlens_k=cu_seqlens_k, plan=plan)
    return (out, lse) if return_lse else out

attention = vertical_slash_attention
