"""Vertical-slash attention: one Triton kernel that attends each query block to its layout's key ranges
(read BLOCK_N keys at a time, contiguous) and then to its gathered key columns (BLOCK_N ids at a
time), in one online softmax.

Per program: one (batch, query head, query block). Causal masking is paid only by the tiles that can
cross the diagonal (a range's tail past the first row's last visible key, and the columns); the
other range tiles run unmasked. GQA: query head h reads kv head h // (Hq / Hkv), k and v are never
repeated. Padded [B, H, S, D] inputs (any strides, e.g. HF's transposed views) and packed varlen
[T, H, D] inputs with cu_seqlens are both read through strides; a sequence shorter than the layout
uses the layout's first blocks, its own causal offset, and keys clipped to its length (as the
reference does). Scores are kept in the log2 domain (exp2), accumulation is float32.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ..._checks import warn_once
from ...layouts import VerticalSlashLayout
from ..reference import check_attention_inputs, reference_attention

__all__ = ["vertical_slash_attention", "not_supported_reasons"]

_LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
# Launch configuration for 16-bit inputs (fp32 takes half the key tile and fewer stages).
CONFIG = {"BN": 64, "num_warps": 4, "num_stages": 3}
BLOCK_SIZES_Q = (16, 32, 64, 128)


@triton.jit
def _tile(acc, m_i, l_i, q, K, V, keys, key_ok, rows, off, qk_scale, s_kn, s_kd, s_vn, s_vd,
          D: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """One BLOCK_N tile of keys (any ids) folded into the running softmax state."""
    d = tl.arange(0, D)
    kn = keys.to(tl.int64)
    if MASK:
        k = tl.load(K + kn[:, None] * s_kn + d[None, :] * s_kd, mask=key_ok[:, None], other=0.0)
    else:
        k = tl.load(K + kn[:, None] * s_kn + d[None, :] * s_kd)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASK:
        ok = key_ok[None, :]
        if CAUSAL:
            ok = ok & (keys[None, :] <= rows[:, None] + off)
        qk = tl.where(ok, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = m_new
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASK:
        v = tl.load(V + kn[:, None] * s_vn + d[None, :] * s_vd, mask=key_ok[:, None], other=0.0)
    else:
        v = tl.load(V + kn[:, None] * s_vn + d[None, :] * s_vd)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _vs_attn_kernel(
    Q, K, V, O, LSE, R_COUNT, R_START, R_END, C_COUNT, C_IDX, CU_Q, CU_K,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od, s_lb, s_lh, s_lm,
    num_heads, group, nqb, max_ranges, max_columns, seqlen_q, seqlen_k, qk_scale,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
    RETURN_LSE: tl.constexpr, WHILE_LOOPS: tl.constexpr, PREC: tl.constexpr,
):
    qb = nqb - 1 - tl.program_id(0)  # the longest blocks (last rows) start first
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    hk = h // group
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        sq = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        sk = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = 0
        sq = seqlen_q
        k_start = 0
        sk = seqlen_k
    q0 = qb * BM
    if q0 < sq:
        off = sk - sq
        rows = q0 + tl.arange(0, BM)
        row_ok = rows < sq
        d = tl.arange(0, D)
        b64 = b.to(tl.int64)
        q_rows = (q_start + rows).to(tl.int64)
        q = tl.load(Q + b64 * s_qb + h.to(tl.int64) * s_qh + q_rows[:, None] * s_qm + d[None, :] * s_qd,
                    mask=row_ok[:, None], other=0.0)
        Kb = K + b64 * s_kb + hk.to(tl.int64) * s_kh + k_start.to(tl.int64) * s_kn
        Vb = V + b64 * s_vb + hk.to(tl.int64) * s_vh + k_start.to(tl.int64) * s_vn
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        lane = tl.arange(0, BN)
        block = bh.to(tl.int64) * nqb + qb

        # Keys past the last row's reach (or past this sequence) are never needed.
        reach = sk
        first_reach = sk
        if CAUSAL:
            reach = tl.minimum(sk, tl.minimum(q0 + BM, sq) + off)
            first_reach = tl.minimum(sk, q0 + off + 1)  # keys every row of the block sees
        n_ranges = tl.load(R_COUNT + block)
        r = 0
        while r < n_ranges:
            start = tl.load(R_START + block * max_ranges + r)
            end = tl.minimum(tl.load(R_END + block * max_ranges + r), reach)
            # Whole tiles before `first_reach` need no mask; the rest of the range does.
            split = start + tl.maximum(tl.minimum(end, first_reach) - start, 0) // BN * BN
            if WHILE_LOOPS:  # the interpreter (NumPy 2) takes no runtime scalar as a range() bound
                k0 = start
                while k0 < split:
                    acc, m_i, l_i = _tile(acc, m_i, l_i, q, Kb, Vb, k0 + lane, lane < BN, rows, off, qk_scale,
                                          s_kn, s_kd, s_vn, s_vd, D, False, CAUSAL, PREC)
                    k0 += BN
                while k0 < end:
                    keys = k0 + lane
                    acc, m_i, l_i = _tile(acc, m_i, l_i, q, Kb, Vb, keys, keys < end, rows, off, qk_scale,
                                          s_kn, s_kd, s_vn, s_vd, D, True, CAUSAL, PREC)
                    k0 += BN
            else:
                for k0 in tl.range(start, split, BN):
                    acc, m_i, l_i = _tile(acc, m_i, l_i, q, Kb, Vb, k0 + lane, lane < BN, rows, off, qk_scale,
                                          s_kn, s_kd, s_vn, s_vd, D, False, CAUSAL, PREC)
                for k0 in tl.range(split, end, BN):
                    keys = k0 + lane
                    acc, m_i, l_i = _tile(acc, m_i, l_i, q, Kb, Vb, keys, keys < end, rows, off, qk_scale,
                                          s_kn, s_kd, s_vn, s_vd, D, True, CAUSAL, PREC)
            r += 1

        n_cols = tl.load(C_COUNT + block)
        cols = C_IDX + block * max_columns
        if WHILE_LOOPS:
            c0 = 0
            while c0 < n_cols:
                listed = c0 + lane < n_cols
                keys = tl.load(cols + c0 + lane, mask=listed, other=0)
                acc, m_i, l_i = _tile(acc, m_i, l_i, q, Kb, Vb, keys, listed & (keys < reach), rows, off,
                                      qk_scale, s_kn, s_kd, s_vn, s_vd, D, True, CAUSAL, PREC)
                c0 += BN
        else:
            for c0 in tl.range(0, n_cols, BN):
                listed = c0 + lane < n_cols
                keys = tl.load(cols + c0 + lane, mask=listed, other=0)
                acc, m_i, l_i = _tile(acc, m_i, l_i, q, Kb, Vb, keys, listed & (keys < reach), rows, off,
                                      qk_scale, s_kn, s_kd, s_vn, s_vd, D, True, CAUSAL, PREC)

        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]  # rows that saw no key: acc is 0, so 0
        tl.store(O + b64 * s_ob + h.to(tl.int64) * s_oh + q_rows[:, None] * s_om + d[None, :] * s_od,
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])
        if RETURN_LSE:
            lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                           float("-inf"))
            tl.store(LSE + b64 * s_lb + h.to(tl.int64) * s_lh + q_rows * s_lm, lse, mask=row_ok)


def _on_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def not_supported_reasons(q, k, v, layout, *, causal: bool = True, cu_seqlens_q=None, cu_seqlens_k=None) -> List[str]:
    """Why the Triton kernel cannot take these (already valid) inputs; empty when it can."""
    reasons = []
    if not (q.is_cuda or (q.device.type == "cpu" and _on_interpreter())):
        reasons.append(f"device {q.device}: the Triton kernel needs CUDA (or TRITON_INTERPRET=1 on CPU)")
    if q.shape[-1] not in HEAD_DIMS:
        reasons.append(f"head_dim {q.shape[-1]}: the kernel supports {HEAD_DIMS}")
    if layout.block_size_q not in BLOCK_SIZES_Q:
        reasons.append(f"layout.block_size_q {layout.block_size_q}: the kernel supports {BLOCK_SIZES_Q}")
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        reasons.append("bfloat16 on the Triton interpreter (its bf16 dot is unreliable)")
    return reasons


def _alloc_outputs(q: torch.Tensor, return_lse: bool):
    """Output (q's shape and strides) and lse; a separate function so tests can poison them."""
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device) if return_lse else None
    return torch.empty_like(q), lse


def _check_scale(scale) -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive finite float or None, got {scale!r}")
    return float(scale)


def _strides4(t: torch.Tensor, packed: bool):
    """(batch, head, row, dim) strides; packed [T, H, D] tensors have no batch stride."""
    if packed:
        return 0, t.stride(1), t.stride(0), t.stride(2)
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


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
):
    """softmax(q k^T * scale) @ v over the layout's key ranges and columns (and the causal band).

    q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] (any strides), or packed q [Tq, Hq, D], k/v [Tk, Hkv, D] with
    int32 cu_seqlens_q / cu_seqlens_k (layout batch = sequence). Hq a multiple of Hkv. Causal is
    bottom-right aligned. Rows that see no key give 0 (lse -inf). Returns out, or (out, lse float32
    of shape q.shape[:-1]). Inputs the kernel does not support run on the reference, with one warning.
    """
    if not isinstance(layout, VerticalSlashLayout):
        raise TypeError(f"layout: expected a VerticalSlashLayout, got {type(layout).__name__}")
    shapes = check_attention_inputs(q, k, v, layout, cu_seqlens_q, cu_seqlens_k)
    if layout.device != q.device:
        raise ValueError(f"layout: expected tensors on {q.device} (that of q), got {layout.device}")
    scale = _check_scale(scale)
    reasons = not_supported_reasons(q, k, v, layout, causal=causal, cu_seqlens_q=cu_seqlens_q,
                                    cu_seqlens_k=cu_seqlens_k)
    if reasons:
        warn_once("vertical_slash_attention:" + "; ".join(reasons),
                  "vertical_slash_attention: using the reference (slow): " + "; ".join(reasons))
        return reference_attention(q, k, v, layout, causal=causal, scale=scale, cu_seqlens_q=cu_seqlens_q,
                                   cu_seqlens_k=cu_seqlens_k, return_lse=return_lse)
    out, lse = _alloc_outputs(q, return_lse)
    if q.numel() == 0:
        return (out, lse) if return_lse else out
    packed = shapes.packed
    head_dim = shapes.head_dim
    scale = head_dim ** -0.5 if scale is None else scale
    lse_strides = (0, 0, 0)
    if lse is not None:
        lse_strides = (0, lse.stride(1), lse.stride(0)) if packed else lse.stride()
    dummy = layout.range_counts  # stands in for cu_seqlens when not packed (never read)
    grid = (layout.num_query_blocks, shapes.batch * shapes.num_heads)
    fp32 = q.dtype == torch.float32
    _vs_attn_kernel[grid](
        q, k, v, out, lse if lse is not None else out, layout.range_counts, layout.range_starts,
        layout.range_ends, layout.column_counts, layout.column_indices,
        cu_seqlens_q if packed else dummy, cu_seqlens_k if packed else dummy,
        *_strides4(q, packed), *_strides4(k, packed), *_strides4(v, packed), *_strides4(out, packed),
        *lse_strides,
        shapes.num_heads, shapes.num_heads // shapes.num_kv_heads, layout.num_query_blocks,
        layout.max_ranges, layout.max_columns, shapes.max_seqlen_q, shapes.max_seqlen_k, scale * _LOG2E,
        BM=layout.block_size_q, BN=CONFIG["BN"] // 2 if fp32 else CONFIG["BN"], D=head_dim, CAUSAL=bool(causal),
        VARLEN=packed, RETURN_LSE=lse is not None, WHILE_LOOPS=_on_interpreter(),
        PREC="ieee" if fp32 else None, num_warps=CONFIG["num_warps"], num_stages=2 if fp32 else CONFIG["num_stages"],
    )
    return (out, lse) if return_lse else out
