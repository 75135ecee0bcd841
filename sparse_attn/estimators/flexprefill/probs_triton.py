"""Fused Triton scoring of pooled query blocks against pooled key blocks: one launch computes, for a band of
query blocks, the scaled dot products with every key block, the causal (bottom-right) block mask and the
softmax over the visible key blocks, and stores the normalized probabilities. No logits tensor is written.

Two passes over the key blocks per program (they are small: Sk / block_size rows of D): the running max and
sum, then the probabilities. Scores are in the log2 domain (exp2); accumulation is float32. GQA: each
query head reads its kv head's pooled keys through `kv_of` (nothing is repeated).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton import LOG2E

__all__ = ["pooled_probs_triton"]

_BM = 16  # query blocks per program
_BN = 64  # key blocks per tile


@triton.jit
def _pooled_probs_kernel(QP, KP, KV_OF, OUT, row0, rows, nk, block_size, seqlen_q, offset, scale_log2,
                         s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_ob, s_oh, s_om,
                         num_heads, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    hk = tl.load(KV_OF + h).to(tl.int64)
    r = pid_m * BM + tl.arange(0, BM)  # rows of this band
    qb = row0 + r  # global query blocks
    d = tl.arange(0, D)
    q = tl.load(QP + b * s_qb + h * s_qh + qb[:, None].to(tl.int64) * s_qm + d[None, :], mask=(r < rows)[:, None],
                other=0.0)
    # the last key each block's rows see (bottom-right causal); key block j is visible when j * bs <= last
    last = tl.minimum(qb * block_size + block_size, seqlen_q) - 1 + offset
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    for j0 in range(0, nk, BN):
        j = j0 + tl.arange(0, BN)
        k = tl.load(KP + b * s_kb + hk * s_kh + j[:, None].to(tl.int64) * s_kn + d[None, :], mask=(j < nk)[:, None],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        ok = (j[None, :] < nk) & (j[None, :] * block_size <= last[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - safe) + tl.sum(tl.exp2(s - safe[:, None]), 1)
        m_i = m_new
    safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv = tl.where(l_i > 0, 1.0 / l_i, 0.0)
    for j0 in range(0, nk, BN):
        j = j0 + tl.arange(0, BN)
        k = tl.load(KP + b * s_kb + hk * s_kh + j[:, None].to(tl.int64) * s_kn + d[None, :], mask=(j < nk)[:, None],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        ok = (j[None, :] < nk) & (j[None, :] * block_size <= last[:, None])
        p = tl.where(ok, tl.exp2(s - safe[:, None]) * inv[:, None], 0.0)
        tl.store(OUT + b * s_ob + h * s_oh + r[:, None].to(tl.int64) * s_om + j[None, :], p,
                 mask=(r < rows)[:, None] & (j[None, :] < nk))


def pooled_probs_triton(qp: torch.Tensor, kp: torch.Tensor, kv_of: torch.Tensor, row0: int, row1: int, *,
                        block_size: int, seqlen_q: int, seqlen_k: int, scale: float) -> torch.Tensor:
    """float32 [B, H, row1 - row0, nk]: softmax over the visible key blocks of pooled query blocks
    [row0, row1) (qp [B, H, nq, D]) against pooled key blocks (kp [B, Hkv, nk, D]); query head h reads kv
    head kv_of[h]. A query block that sees no key gets a row of zeros."""
    b, h, _, d = qp.shape
    nk = kp.shape[2]
    rows = row1 - row0
    qp, kp = qp.contiguous(), kp.contiguous()
    dp = max(16, triton.next_power_of_2(d))
    if dp != d:  # tl.dot needs a power-of-two width: zero columns change no dot product
        qp = torch.nn.functional.pad(qp, (0, dp - d))
        kp = torch.nn.functional.pad(kp, (0, dp - d))
    out = torch.empty(b, h, rows, nk, dtype=torch.float32, device=qp.device)
    grid = (triton.cdiv(rows, _BM), b * h)
    _pooled_probs_kernel[grid](
        qp, kp, kv_of.to(device=qp.device, dtype=torch.int32).contiguous(), out, row0, rows, nk, block_size,
        seqlen_q, seqlen_k - seqlen_q, scale * LOG2E,
        qp.stride(0), qp.stride(1), qp.stride(2), kp.stride(0), kp.stride(1), kp.stride(2),
        out.stride(0), out.stride(1), out.stride(2), h, BM=_BM, BN=_BN, D=dp)
    return out
