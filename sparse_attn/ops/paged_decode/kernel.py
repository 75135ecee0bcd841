"""Triton kernels of paged decode attention (split-K, flash-decoding) and of the page summaries.

- `_decode_kernel`: one program per (sequence, kv head, split): all query heads of the GQA group stacked as
  the rows of one tile (padded to 16 for tl.dot), online softmax over the split's share of the page list,
  BN keys (BN / page_size pages) per step gathered through the page table. Writes the split's running max,
  sum and unnormalised output (the group's real rows only).
- `_combine_kernel`: one program per (sequence, query head): merges its splits into the output, a chunk
  of splits at a time.
- `_summarize_kernel`: per (sequence, kv head, page slot) the min, max and mean of a page's valid keys.

Every page number read from a table is clamped into the storage, so a bad table cannot read out of bounds
(the cache's own checks report it); tokens past a sequence's length are masked. Scores are in the log2
domain (exp2); accumulation is float32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..._triton import INTERPRETED  # noqa: F401  (importing it applies the interpreter fix)


@triton.jit
def _page_rows(PAGES, PT, b, h, idx, ok, s_tb, s_tp, s_pb, s_ph, s_pk, num_pages, PS: tl.constexpr):
    """(logical page, physical page) of list entries idx (entries not ok read page 0)."""
    logical = tl.load(PAGES + b * s_pb + h * s_ph + idx * s_pk, mask=ok, other=0)
    phys = tl.load(PT + b * s_tb + logical.to(tl.int64) * s_tp, mask=ok, other=0)
    phys = tl.minimum(tl.maximum(phys, 0), num_pages - 1).to(tl.int64)
    return logical, phys


@triton.jit
def _decode_kernel(Q, K, V, PT, PAGES, COUNTS, SEQLENS, M_OUT, L_OUT, O_OUT,
                   s_qb, s_qh, s_qd,
                   k_per, k_outer, k_inner, k_tok, k_head, k_dim,
                   v_per, v_outer, v_inner, v_tok, v_head, v_dim,
                   s_tb, s_tp, s_pb, s_ph, s_pk, s_cb, s_ch,
                   num_pages, Hkv, n_splits, per_split, qk_scale,
                   G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, BN: tl.constexpr,
                   PREC: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    count = tl.load(COUNTS + b * s_cb + h * s_ch)
    seqlen = tl.load(SEQLENS + b)
    i0 = split * per_split
    i1 = tl.minimum(i0 + per_split, count)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    q = tl.load(Q + b * s_qb + (h * G + g)[:, None] * s_qh + d[None, :] * s_qd, mask=(g < G)[:, None], other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    j = tl.arange(0, BN)
    in_page = j % PS
    for t in range(i0, i1, BN // PS):
        idx = t + j // PS
        ok = idx < i1
        logical, phys = _page_rows(PAGES, PT, b, h, idx, ok, s_tb, s_tp, s_pb, s_ph, s_pk, num_pages, PS)
        ok = ok & (logical * PS + in_page < seqlen)
        kb = (phys // k_per) * k_outer + (phys % k_per) * k_inner + in_page * k_tok + h * k_head
        k = tl.load(K + kb[:, None] + d[None, :] * k_dim, mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = (phys // v_per) * v_outer + (phys % v_per) * v_inner + in_page * v_tok + h * v_head
        v = tl.load(V + vb[:, None] + d[None, :] * v_dim, mask=ok[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    live = g < G
    row = (bh * n_splits + split) * G + g
    tl.store(M_OUT + row, m_i, mask=live)
    tl.store(L_OUT + row, l_i, mask=live)
    tl.store(O_OUT + row[:, None] * D + d[None, :], acc, mask=live[:, None])


@triton.jit
def _combine_kernel(M, L, O, OUT, s_ob, s_oh, s_od, Hkv, n_splits,
                    G: tl.constexpr, D: tl.constexpr, NSC: tl.constexpr):
    row = tl.program_id(0)  # (sequence, kv head, query head of the group)
    bh = row // G
    g = row % G
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    d = tl.arange(0, D)
    m_run = tl.max(tl.full([NSC], float("-inf"), tl.float32), 0)
    l_run = tl.sum(tl.zeros([NSC], tl.float32), 0)
    acc = tl.zeros([D], tl.float32)
    # NSC splits at a time, merged online (a count of 128 splits would not fit registers as one tile).
    for c in range(0, n_splits, NSC):
        sp = c + tl.arange(0, NSC)
        live = sp < n_splits
        rows = ((bh * n_splits + sp) * G + g).to(tl.int64)
        m = tl.load(M + rows, mask=live, other=float("-inf"))
        m_new = tl.maximum(m_run, tl.max(m, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.math.exp2(m - m_use)  # splits that saw nothing weigh 0
        alpha = tl.math.exp2(m_run - m_use)
        l_run = l_run * alpha + tl.sum(w * tl.load(L + rows, mask=live, other=0.0), 0)
        o = tl.load(O + rows[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
        acc = acc * alpha + tl.sum(o * w[:, None], 0)
        m_run = m_new
    o = acc / tl.where(l_run > 0, l_run, 1.0)
    tl.store(OUT + b * s_ob + (h * G + g) * s_oh + d * s_od, o.to(OUT.dtype.element_ty))


@triton.jit
def _summarize_kernel(K, PT, STABLE, SEQLENS, FIRST, KMIN, KMAX, KMEAN,
                      k_per, k_outer, k_inner, k_tok, k_head, k_dim,
                      s_tb, s_tp, s_sb, s_sp, s_mp, s_mh, s_md,
                      num_pages, max_pages, Hkv,
                      D: tl.constexpr, PS: tl.constexpr, MEAN: tl.constexpr):
    bh = tl.program_id(0)
    slot = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    seqlen = tl.load(SEQLENS + b)
    logical = tl.load(FIRST + b) + slot
    if (logical < max_pages) & (logical * PS < seqlen) & (logical >= 0):
        phys = tl.load(PT + b * s_tb + logical.to(tl.int64) * s_tp)
        phys = tl.minimum(tl.maximum(phys, 0), num_pages - 1).to(tl.int64)
        t = tl.arange(0, PS)
        d = tl.arange(0, D)
        ok = logical * PS + t < seqlen
        kb = (phys // k_per) * k_outer + (phys % k_per) * k_inner + t * k_tok + h * k_head
        k = tl.load(K + kb[:, None] + d[None, :] * k_dim, mask=ok[:, None], other=0.0)
        mn = tl.min(tl.where(ok[:, None], k, float("inf")), 0)
        mx = tl.max(tl.where(ok[:, None], k, float("-inf")), 0)
        dst = tl.load(STABLE + b * s_sb + logical.to(tl.int64) * s_sp).to(tl.int64) * s_mp + h * s_mh + d * s_md
        tl.store(KMIN + dst, mn.to(KMIN.dtype.element_ty))
        tl.store(KMAX + dst, mx.to(KMAX.dtype.element_ty))
        if MEAN:
            n = tl.sum(ok.to(tl.float32), 0)
            mean = tl.sum(tl.where(ok[:, None], k.to(tl.float32), 0.0), 0) / n
            tl.store(KMEAN + dst, mean.to(KMEAN.dtype.element_ty))


@triton.jit
def _density_kernel(PAGES, COUNTS, SEQLENS, OUT, B, K, s_pb, s_ph, s_pk, s_cb, s_ch, group,
                    PS: tl.constexpr, SHARED: tl.constexpr, BLOCK: tl.constexpr):
    """One program per query head: the mean over sequences of (tokens its kv head's selection reads) /
    (the sequence's length), in float64."""
    hq = tl.program_id(0)
    h = 0 if SHARED else hq // group
    total = tl.zeros([1], dtype=tl.float64)
    for b in range(0, B):
        seqlen = tl.load(SEQLENS + b).to(tl.int64)
        count = tl.load(COUNTS + b * s_cb + h * s_ch)
        read = tl.zeros([BLOCK], dtype=tl.int64)
        for k0 in range(0, K, BLOCK):
            idx = k0 + tl.arange(0, BLOCK)
            ok = idx < count
            page = tl.load(PAGES + b * s_pb + h * s_ph + idx * s_pk, mask=ok, other=0).to(tl.int64)
            read += tl.where(ok, tl.minimum(tl.maximum(seqlen - page * PS, 0), PS), 0)
        total += tl.sum(read, 0).to(tl.float64) / tl.maximum(seqlen, 1).to(tl.float64)
    tl.store(OUT + hq + tl.arange(0, 1), total / B)
