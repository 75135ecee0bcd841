"""Block-sparse prefill attention over a BlockLayout: the checked entries over the Triton kernels in kernel.py.

    p = plan(q, k, v, layout, causal=True)                  # optional: once per layout, reused across calls
    out = block_sparse_attention(q, k, v, layout, plan=p)

The kernel runs on CUDA tensors, or on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1
set before import, as CI does). Anything else it cannot run falls back to `reference_attention`,
warning once with the reason (`not_supported_reasons` lists them).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..._checks import warn_once
from ...layouts import BlockLayout
from ..reference import check_attention_inputs, reference_attention

try:
    from . import kernel as _kernel
    _IMPORT_ERROR = None
except ImportError as e:  # no triton: every call takes the reference
    _kernel = None
    _IMPORT_ERROR = str(e)

__all__ = ["block_sparse_attention", "attention", "plan", "not_supported_reasons", "LAYOUT"]

LAYOUT = BlockLayout
KERNEL_BLOCK_SIZES = (16, 32, 64, 128)
MAX_HEAD_DIM = 256


def not_supported_reasons(q, k, v, layout: BlockLayout, *, causal: bool = True, scale: Optional[float] = None,
                          cu_seqlens_q=None, cu_seqlens_k=None, return_lse: bool = False) -> List[str]:
    """Why the Triton kernel cannot run these (valid) inputs; empty when it can."""
    reasons = []
    if _kernel is None:
        reasons.append(f"triton is not importable ({_IMPORT_ERROR})")
    interpreted = _kernel is not None and _kernel.INTERPRETED
    if not q.is_cuda and not interpreted:
        reasons.append(f"q is on {q.device}: the kernel needs CUDA, or TRITON_INTERPRET=1 set before import")
    if interpreted and q.dtype == torch.bfloat16:
        reasons.append("bfloat16 under the Triton interpreter (its tl.dot gives wrong bf16 results)")
    for name in ("block_size_q", "block_size_k"):
        if getattr(layout, name) not in KERNEL_BLOCK_SIZES:
            reasons.append(f"layout.{name} = {getattr(layout, name)}, the kernel takes {KERNEL_BLOCK_SIZES}")
    d = q.shape[-1]
    if d > MAX_HEAD_DIM or d % 8:
        reasons.append(f"head_dim {d}: the kernel takes multiples of 8 up to {MAX_HEAD_DIM}")
    if scale is not None and not float(scale) > 0:
        reasons.append(f"scale {scale}: the kernel's max-shift assumes a positive scale")
    return reasons


def _check_layout(layout, q: torch.Tensor) -> None:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout: expected a BlockLayout, got {type(layout).__name__}")
    if layout.device != q.device:
        raise ValueError(f"layout: expected its tensors on q's device {q.device}, got {layout.device}")


def plan(q, k, v, layout: BlockLayout, *, causal: bool = True, cu_seqlens_q=None, cu_seqlens_k=None):
    """The launch plan of `layout` for inputs shaped like q, k, v (their data is not read), or None where
    the kernel will not run them (the reference needs no plan). Reuse it for every call with this layout,
    these shapes and lengths: such a call is one launch instead of two."""
    _check_layout(layout, q)
    shapes = check_attention_inputs(q, k, v, layout, cu_seqlens_q, cu_seqlens_k)
    if not_supported_reasons(q, k, v, layout, causal=causal, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k):
        return None
    packed = shapes.packed
    dummy = layout.counts
    signature = _kernel.plan_signature(layout, causal, packed, shapes.batch, shapes.num_heads, shapes.max_seqlen_q,
                                       0 if packed else q.shape[2], 0 if packed else k.shape[2],
                                       cu_seqlens_q, cu_seqlens_k)
    return _kernel.make_plan(layout, signature, cu_seqlens_q if packed else dummy,
                             cu_seqlens_k if packed else dummy)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    plan=None,
):
    """Attention of each query block to the key blocks `layout` lists (and the causal band if `causal`).

    q: [B, Hq, Sq, D] (strided views welcome) or packed [Tq, Hq, D] with int32 cu_seqlens_q;
    k, v: [B, Hkv, Sk, D] or packed [Tk, Hkv, D] with cu_seqlens_k; Hq % Hkv == 0 (GQA, k/v not repeated).
    Causal is bottom-right aligned; rows that see no key give 0 (lse -inf). Returns out in q's dtype,
    and with return_lse the float32 natural log-sum-exp of shape q.shape[:-1].
    plan: from `plan(...)` for this layout and these shapes (None: planned in this call).
    """
    if plan is not None and not (_kernel is not None and isinstance(plan, _kernel.Plan)):
        raise TypeError(f"plan: expected what block_sparse.plan(...) returns, got {type(plan).__name__}")
    key = None
    if (_kernel is not None and cu_seqlens_q is None and cu_seqlens_k is None and isinstance(layout, BlockLayout)
            and all(isinstance(t, torch.Tensor) for t in (q, k, v)) and q.dim() == 4):
        # A signature checked and launched before: skip the checks and the JIT (kernel.fast_forward).
        key = _kernel.signature_key(q, k, v, layout, causal, scale, return_lse)
        done = _kernel.fast_forward(q, k, v, layout, causal, scale, return_lse, key=key, plan=plan)
        if done is not None:
            return done
    _check_layout(layout, q)
    shapes = check_attention_inputs(q, k, v, layout, cu_seqlens_q, cu_seqlens_k)
    kwargs = dict(causal=causal, scale=scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                  return_lse=return_lse)
    reasons = not_supported_reasons(q, k, v, layout, **kwargs)
    if reasons:
        warn_once("block_sparse:" + reasons[0],
                  f"block_sparse_attention: using the reference (slow): {'; '.join(reasons)}")
        return reference_attention(q, k, v, layout, **kwargs)
    return _kernel.forward(
        q, k, v, layout, causal=causal, scale=shapes.head_dim ** -0.5 if scale is None else float(scale),
        packed=shapes.packed, batch=shapes.batch, max_seqlen_q=shapes.max_seqlen_q,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, return_lse=return_lse, plan=plan, remember=key,
    )


attention = block_sparse_attention
