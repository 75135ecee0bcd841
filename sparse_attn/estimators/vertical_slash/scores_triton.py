"""Fused Triton scoring for the vertical-slash estimator: the last queries' softmax against every key,
summed per key column (vertical) and per diagonal (slash), without writing the last_q x seqlen_k matrix.

Two passes over the keys, both reading each key tile once for all query heads of a kv head:
1. `_lse_kernel`: per query row, the running max and sum over a range of keys (the keys split in ranges so
   that the grid fills the GPU);
2. `_scores_kernel`: combine the ranges' max / sum into each row's log-sum-exp (`_combined_lse`), recompute
   each tile's probabilities, store its column sums, and sum its diagonals.
   Diagonals run across the tile: `tl.gather` skews it in registers (through shared memory), row t of
   local diagonal c sitting at column t + BN - 1 - c. Each program walks a run of consecutive key tiles
   downwards, so half of a tile's diagonal sums carry over to the next tile in registers and the other
   half is final: plain stores, with atomics only where two programs' runs meet.
Scores are in the log2 domain (exp2), as FlashAttention kernels do. The passes are also callable apart
(`last_rows_lse`, `scores_from_lse`): a caller that needs the diagonal sums of some heads only (FlexPrefill's
vertical-slash heads) asks for the column sums first and the diagonal sums later, with the other heads flagged.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..._triton import LOG2E, online_max_sum

__all__ = ["vertical_slash_scores_triton", "last_rows_lse", "scores_from_lse"]

_PROGRAMS_PER_SM = 8  # scores pass: programs per SM (each walks a run of key tiles)
_SCORES_WARPS = 4
_SCORES_ROWS = 64  # scores pass: at most this many stacked query rows (heads x BM) per program
_LSE_WARPS = 8
_LSE_ROWS = 256  # max / sum pass: at most this many stacked query rows per program (H200, 1M keys: all four
# heads of a kv head in one program read each key tile once: 1.39 against 1.89 ms)
_SCORES_BN = 64  # key tile widths (D <= 128; half of it for larger head dims), at least the padded last_q
_LSE_BN = 64


@triton.jit
def _load_q(Q, b, hk, s_qb, s_qh, s_qm, s_qd, L, HG: tl.constexpr, BM: tl.constexpr, D: tl.constexpr,
            G_SUB, sub):
    """The last-L queries of HG query heads stacked along rows: [HG * BM, D]; padded rows are zero."""
    r = tl.arange(0, HG * BM)
    head = (hk * G_SUB * HG + sub * HG + r // BM).to(tl.int64)  # int64: head * stride passes 2**31 at 1M
    t = r % BM
    d = tl.arange(0, D)
    ptr = Q + b.to(tl.int64) * s_qb + head[:, None] * s_qh + t[:, None] * s_qm + d[None, :] * s_qd
    return tl.load(ptr, mask=(t < L)[:, None], other=0.0)


@triton.jit(do_not_specialize=("Sk", "L", "keys_per_split", "n_split"))
def _lse_kernel(Q, K, M_OUT, L_OUT,
                s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd,
                Hkv, Sk, L, G_SUB, keys_per_split, n_split, scale_log2,
                HG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    sub = pid % G_SUB
    hk = ((pid // G_SUB) % Hkv).to(tl.int64)
    b = (pid // (G_SUB * Hkv)).to(tl.int64)
    q = _load_q(Q, b, hk, s_qb, s_qh, s_qm, s_qd, L, HG, BM, D, G_SUB, sub)
    r = tl.arange(0, HG * BM)
    t = r % BM
    d = tl.arange(0, D)
    m_i = tl.full([HG * BM], float("-inf"), tl.float32)
    l_i = tl.zeros([HG * BM], tl.float32)
    k_start = split * keys_per_split
    for i in range(0, keys_per_split, BN):  # keys_per_split is a multiple of BN
        keys = k_start + i + tl.arange(0, BN)
        kmask = keys < Sk
        k = tl.load(K + b * s_kb + hk * s_kh + keys[:, None] * s_kn + d[None, :] * s_kd, mask=kmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        valid = kmask[None, :] & (t < L)[:, None]
        if CAUSAL:
            valid = valid & (keys[None, :] <= Sk - L + t[:, None])
        m_i, l_i = online_max_sum(m_i, l_i, tl.where(valid, s, float("-inf")))
    head = hk * G_SUB * HG + sub * HG + r // BM
    out = ((b * Hkv * G_SUB * HG + head) * n_split + split) * BM + t  # [B, Hq, n_split, BM]
    tl.store(M_OUT + out, m_i)
    tl.store(L_OUT + out, l_i)


@triton.jit
def _combined_lse(M, L_SUM, row_head, t, n_split, HG: tl.constexpr, BM: tl.constexpr):
    """Log-sum-exp (log2 domain) of the rows (row_head: b * Hq + query head, t: last-query row) from
    _lse_kernel's per-range max / sum [B, Hq, n_split, BM]; +inf for rows that saw no key (padded rows), so
    that their probabilities are 0."""
    base = row_head * n_split * BM + t
    m_max = tl.full([HG * BM], float("-inf"), tl.float32)
    for i in range(0, n_split):
        m_max = tl.maximum(m_max, tl.load(M + base + i * BM))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    total = tl.zeros([HG * BM], tl.float32)
    for i in range(0, n_split):
        total += tl.load(L_SUM + base + i * BM) * tl.exp2(tl.load(M + base + i * BM) - m_safe)
    return tl.where(total > 0.0, m_safe + tl.log2(total), float("inf"))


@triton.jit(do_not_specialize=("Sk", "L", "n_key_tiles", "tiles_per_prog", "n_split"))
def _scores_kernel(Q, K, M, L_SUM, V_OUT, S_OUT, SKIP,
                   s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd,
                   Hkv, Sk, L, G_SUB, n_key_tiles, tiles_per_prog, n_split, scale_log2,
                   HG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr,
                   VERT: tl.constexpr = True, SLASH: tl.constexpr = True, HAS_SKIP: tl.constexpr = False):
    group = tl.program_id(0)  # (b, hk, sub)
    chunk = tl.program_id(1)  # a run of consecutive key tiles, walked from the last one down
    sub = group % G_SUB
    hk = ((group // G_SUB) % Hkv).to(tl.int64)
    b = (group // (G_SUB * Hkv)).to(tl.int64)
    go = True
    if HAS_SKIP:  # programs whose query heads are all flagged make nothing
        flags = tl.load(SKIP + b * Hkv * G_SUB * HG + hk * G_SUB * HG + sub * HG + tl.arange(0, HG))
        go = tl.sum((flags == 0).to(tl.int32), 0) > 0
    if go:
        _scores_tiles(Q, K, M, L_SUM, V_OUT, S_OUT, s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, Hkv, Sk, L, G_SUB,
                      n_key_tiles, tiles_per_prog, n_split, scale_log2, chunk, sub, hk, b, HG, BM, BN, D, CAUSAL, VERT,
                      SLASH)


@triton.jit
def _scores_tiles(Q, K, M, L_SUM, V_OUT, S_OUT, s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, Hkv, Sk, L, G_SUB,
                  n_key_tiles, tiles_per_prog, n_split, scale_log2, chunk, sub, hk, b, HG: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, VERT: tl.constexpr,
                  SLASH: tl.constexpr):
    """The scores pass of one program: its run of key tiles; column sums (VERT) and diagonal sums (SLASH)."""
    r = tl.arange(0, HG * BM)
    t = r % BM
    cols = tl.arange(0, BN)
    d = tl.arange(0, D)
    q = _load_q(Q, b, hk, s_qb, s_qh, s_qm, s_qd, L, HG, BM, D, G_SUB, sub)
    lse = _combined_lse(M, L_SUM, b * Hkv * G_SUB * HG + hk * G_SUB * HG + sub * HG + r // BM, t, n_split, HG, BM)
    head = hk * G_SUB * HG + sub * HG + tl.arange(0, HG)  # query heads of this program, [HG]
    row_base = (b * Hkv * G_SUB * HG + head) * Sk  # [HG]
    # Skew in registers (tl.gather goes through shared memory): local diagonal c of a tile holds
    # p[t, t + BN - 1 - c]; c < BN + BM - 1 <= 2 * BN, split in two halves of BN.
    x_lo = t[:, None] + (BN - 1) - cols[None, :]
    x_hi = x_lo - BN
    in_lo = (x_lo >= 0) & (x_lo < BN)
    in_hi = (x_hi >= 0) & (x_hi < BN)
    x_lo = tl.where(in_lo, x_lo, 0)
    x_hi = tl.where(in_hi, x_hi, 0)
    kt_hi = tl.minimum((chunk + 1) * tiles_per_prog, n_key_tiles)
    n_tiles = kt_hi - chunk * tiles_per_prog
    carry = tl.zeros([HG, BN], tl.float32)
    o = cols  # the last flushed offsets (a vector: the loop re-assigns it)
    for i in range(0, n_tiles):
        j0 = (kt_hi - 1 - i) * BN
        keys = j0 + cols
        kmask = keys < Sk
        k = tl.load(K + b * s_kb + hk * s_kh + keys[:, None] * s_kn + d[None, :] * s_kd, mask=kmask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        valid = kmask[None, :] & (t < L)[:, None]
        if CAUSAL:
            valid = valid & (keys[None, :] <= Sk - L + t[:, None])
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        if VERT:
            vert = tl.sum(tl.reshape(p, (HG, BM, BN)), 1)
            tl.store(V_OUT + row_base[:, None] + keys[None, :], vert, mask=kmask[None, :])
        if SLASH:
            d_lo = tl.sum(tl.reshape(tl.where(in_lo, tl.gather(p, x_lo, 1), 0.0), (HG, BM, BN)), 1)
            d_hi = tl.sum(tl.reshape(tl.where(in_hi, tl.gather(p, x_hi, 1), 0.0), (HG, BM, BN)), 1)
            # Walking down the keys the offsets rise by BN per tile: the low half plus the previous tile's
            # high half is final. Only the first flush shares its offsets with another program.
            o = Sk - L - j0 - (BN - 1) + cols
            ok = (o >= 0) & (o < Sk)
            out = d_lo + carry
            if i == 0:
                tl.atomic_add(S_OUT + row_base[:, None] + o[None, :], out, mask=ok[None, :])
            else:
                tl.store(S_OUT + row_base[:, None] + o[None, :], out, mask=ok[None, :])
            carry = d_hi
    if SLASH:
        o = o + BN
        ok = (o >= 0) & (o < Sk)
        tl.atomic_add(S_OUT + row_base[:, None] + o[None, :], carry, mask=ok[None, :])


def _heads_per_program(group: int, bm: int, max_rows: int = 64) -> int:
    """The largest power of two dividing the GQA group with at most max_rows stacked rows (the scores kernel
    spills registers on sm_90 past 64 rows on 4 warps, checked with ptxas -v)."""
    hg = 1
    while group % (hg * 2) == 0 and hg * 2 * bm <= max_rows:
        hg *= 2
    return hg


class _Geometry(NamedTuple):
    bm: int
    hg: int
    g_sub: int
    hg_l: int
    g_sub_l: int
    bn: int
    bn_l: int
    n_split: int
    keys_per_split: int


def _geometry(q: torch.Tensor, k: torch.Tensor, last_q: int) -> _Geometry:
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"q: head_dim {d} is not supported by the Triton estimator (16..256, a power of two)")
    group = hq // hkv
    bm = max(16, triton.next_power_of_2(last_q))
    hg = _heads_per_program(group, bm, _SCORES_ROWS)
    hg_l = _heads_per_program(group, bm, _LSE_ROWS)  # the max / sum pass has no skew: more rows fit
    # BN >= BM: a tile's diagonals fit in two halves of BN
    bn = max(bm, _SCORES_BN if d <= 128 else _SCORES_BN // 2)
    bn_l = max(bm, _LSE_BN if d <= 128 else _LSE_BN // 2)
    n_groups_l = b * hkv * (group // hg_l)
    # Pass 1: per query row the running max and sum over each range of keys (ranges: so that the grid fills
    # the GPU); pass 2 combines them.
    n_split = max(1, min(triton.cdiv(sk, 4 * bn_l), triton.cdiv(1024, n_groups_l)))
    keys_per_split = triton.cdiv(triton.cdiv(sk, n_split), bn_l) * bn_l
    n_split = triton.cdiv(sk, keys_per_split)
    return _Geometry(bm, hg, group // hg, hg_l, group // hg_l, bn, bn_l, n_split, keys_per_split)


def last_rows_lse(q: torch.Tensor, k: torch.Tensor, last_q: int, scale: float, causal: bool):
    """The scores' first pass: per last-query row the running max and sum (log2 domain) over each range of
    keys, (m, s) float32 [B, Hq, n_split, BM], for scores_from_lse."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = _geometry(q, k, last_q)
    ql = q[:, :, sq - last_q :]
    m = torch.empty(b, hq, g.n_split, g.bm, device=q.device, dtype=torch.float32)
    s = torch.empty_like(m)
    _lse_kernel[(b * hkv * g.g_sub_l, g.n_split)](
        ql, k, m, s, *ql.stride(), *k.stride(), hkv, sk, last_q, g.g_sub_l, g.keys_per_split, g.n_split,
        scale * LOG2E, HG=g.hg_l, BM=g.bm, BN=g.bn_l, D=d, CAUSAL=causal, num_warps=_LSE_WARPS,
    )
    return m, s


def scores_from_lse(q: torch.Tensor, k: torch.Tensor, lse, last_q: int, scale: float, causal: bool, *,
                    columns: bool = True, slashes: bool = True, skip=None):
    """The scores' second pass from last_rows_lse's (m, s): (vertical, slash) float32 [B, Hq, Sk], each None
    where not asked for (columns / slashes). skip: int8 [B, Hq] or None; a program whose query heads are all
    flagged makes nothing (their columns unwritten, their diagonals zero); heads share a program with the
    other heads of their kv head, a power of two of them at a time."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = _geometry(q, k, last_q)
    ql = q[:, :, sq - last_q :]
    m, s = lse
    n_groups = b * hkv * g.g_sub
    vertical = torch.empty(b, hq, sk, device=q.device, dtype=torch.float32) if columns else None
    slash = torch.zeros(b, hq, sk, device=q.device, dtype=torch.float32) if slashes else None
    n_key_tiles = triton.cdiv(sk, g.bn)
    n_sm = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
    chunks = max(1, min(n_key_tiles, triton.cdiv(_PROGRAMS_PER_SM * n_sm, n_groups)))
    tiles_per_prog = triton.cdiv(n_key_tiles, chunks)
    chunks = triton.cdiv(n_key_tiles, tiles_per_prog)
    dummy = m  # stands in for the outputs and flags not asked for (never read or written)
    _scores_kernel[(n_groups, chunks)](
        ql, k, m, s, dummy if vertical is None else vertical, dummy if slash is None else slash,
        dummy if skip is None else skip, *ql.stride(), *k.stride(), hkv, sk, last_q, g.g_sub, n_key_tiles,
        tiles_per_prog, g.n_split, scale * LOG2E,
        HG=g.hg, BM=g.bm, BN=g.bn, D=d, CAUSAL=causal, VERT=columns, SLASH=slashes, HAS_SKIP=skip is not None,
        num_warps=_SCORES_WARPS,
    )
    return vertical, slash


def vertical_slash_scores_triton(q: torch.Tensor, k: torch.Tensor, last_q: int, scale: float, causal: bool):
    """(vertical, slash) float32 [B, Hq, Sk] each: the last_q queries' softmax summed per key column and
    per diagonal offset (o = (Sk - last_q + t) - j for last-query row t). q [B, Hq, Sq, D], k [B, Hkv, Sk, D]."""
    return scores_from_lse(q, k, last_rows_lse(q, k, last_q, scale, causal), last_q, scale, causal)
