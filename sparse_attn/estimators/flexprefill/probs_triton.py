"""Triton kernels of the query-aware side, for a band of query blocks at a time:

- `pooled_probs_triton`: the scaled dot products of pooled query blocks with every pooled key block, the
  causal (bottom-right) block mask and the softmax over the visible key blocks, in one launch (no logits
  tensor is written). Two passes over the key blocks per program (they are small: Sk / block_size rows of
  D): the running max and sum, then the probabilities, in the log2 domain (exp2), float32 accumulation.
  GQA: each query head reads its kv head's pooled keys through `kv_of` (nothing is repeated).
- `keep_mask_triton`: the selection rule on those probabilities without sorting, one row per program held
  in registers. The number of blocks the gamma rule takes is found by bisection over the float bits of a
  threshold t (the largest t whose blocks with P >= t reach the mass still needed; ties at t taken by the
  fewest that reach it), raised to the minimum budget, and that many blocks (the K largest, ties to the
  lower id) are found by a second bisection on counts. 31 steps each; probabilities lie in [0, 1].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton import LOG2E

__all__ = ["pooled_probs_triton", "keep_mask_triton"]

_BM = 16  # query blocks per program
_BN = 64  # key blocks per tile


@triton.jit
def _pooled_probs_kernel(QP, KP, KV_OF, OUT, row0, rows, nk, block_size, seqlen_q, offset, scale_log2,
                         s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_ob, s_oh, s_om,
                         num_heads, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
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
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        ok = (j[None, :] < nk) & (j[None, :] * block_size <= last[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - safe) + tl.sum(tl.exp2(s - safe[:, None]), 1)
        m_i = m_new
    safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    for j0 in range(0, nk, BN):
        j = j0 + tl.arange(0, BN)
        k = tl.load(KP + b * s_kb + hk * s_kh + j[:, None].to(tl.int64) * s_kn + d[None, :], mask=(j < nk)[:, None],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
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
        out.stride(0), out.stride(1), out.stride(2), h, BM=_BM, BN=_BN, D=dp,
        PREC="ieee" if qp.dtype == torch.float32 else "tf32")  # fp32: exact products (the tests' torch twin)
    return out


@triton.jit
def _keep_kernel(P, KEEP, GAMMA, row0, nk, block_size, seqlen_q, offset, min_blocks,
                 s_pb, s_ph, s_pm, s_kb, s_kh, s_km, num_heads, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    j = tl.arange(0, BLOCK)
    last = tl.minimum((row0 + r) * block_size + block_size, seqlen_q) - 1 + offset
    vis = (j < nk) & (j * block_size <= last)
    diag = tl.minimum(tl.maximum(last, 0) // block_size, nk - 1)
    forced = vis & ((j == 0) | (j == diag))
    p = tl.load(P + b * s_pb + h * s_ph + r.to(tl.int64) * s_pm + j, mask=vis, other=0.0)
    gamma = tl.load(GAMMA + h)
    need = gamma - tl.sum(tl.where(forced, p, 0.0), 0)
    cand = vis & (forced == 0)
    c = tl.where(cand, p, -1.0)
    n_cand = tl.sum(cand.to(tl.int32), 0)
    n_forced = tl.sum(forced.to(tl.int32), 0)
    # t: the largest threshold whose candidates at or above it still reach `need`
    lo = tl.zeros((), tl.int32)
    hi = tl.full((), 0x3F800001, tl.int32)  # just above the bits of 1.0
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        v = mid.to(tl.float32, bitcast=True)
        ok = tl.sum(tl.where(c >= v, c, 0.0), 0) >= need
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    t = lo.to(tl.float32, bitcast=True)
    above = c > t
    mass_above = tl.sum(tl.where(above, c, 0.0), 0)
    n_above = tl.sum(above.to(tl.int32), 0)
    n_tie = tl.sum((cand & (c == t)).to(tl.int32), 0)
    # ties at t are taken one by one while the kept mass is below `need`
    ties = tl.where(t > 0, (need - mass_above) / tl.where(t > 0, t, 1.0), 1.0)
    by_gamma = n_above + tl.minimum(tl.maximum(tl.ceil(ties).to(tl.int32), 1), n_tie)
    reached = tl.sum(tl.where(cand, c, 0.0), 0) >= need
    by_gamma = tl.where(need <= 0, 0, tl.where((gamma >= 1) | (reached == 0), n_cand, by_gamma))
    k = tl.minimum(tl.maximum(by_gamma, min_blocks - n_forced), n_cand)
    # the k largest candidates: the largest v with at least k candidates >= v, then ties to the lower id
    lo = tl.zeros((), tl.int32)
    hi = tl.full((), 0x3F800001, tl.int32)
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        v = mid.to(tl.float32, bitcast=True)
        ok = tl.sum((c >= v).to(tl.int32), 0) >= k
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    t = lo.to(tl.float32, bitcast=True)
    above = c > t
    tie = cand & (c == t)
    rank = tl.cumsum(tie.to(tl.int32), 0) - tie.to(tl.int32)  # ties before this one, in id order
    keep = forced | above | (tie & (rank < k - tl.sum(above.to(tl.int32), 0)))
    tl.store(KEEP + b * s_kb + h * s_kh + r.to(tl.int64) * s_km + j, keep.to(tl.int8), mask=j < nk)


def keep_mask_triton(p: torch.Tensor, gamma: torch.Tensor, row0: int, *, block_size: int, seqlen_q: int,
                     seqlen_k: int, min_blocks: int) -> torch.Tensor:
    """bool [B, H, rows, nk]: the key blocks query blocks [row0, row0 + rows) keep, from their probabilities
    p [B, H, rows, nk] (pooled_probs_triton's) and gamma [H] (float32)."""
    b, h, rows, nk = p.shape
    keep = torch.empty(b, h, rows, nk, dtype=torch.int8, device=p.device)
    block = max(16, triton.next_power_of_2(nk))
    _keep_kernel[(rows, b * h)](
        p, keep, gamma.to(device=p.device, dtype=torch.float32).contiguous(), row0, nk, block_size, seqlen_q,
        seqlen_k - seqlen_q, min_blocks, p.stride(0), p.stride(1), p.stride(2), keep.stride(0), keep.stride(1),
        keep.stride(2), h, BLOCK=block, num_warps=4 if block <= 4096 else 8)
    return keep.view(torch.bool)
