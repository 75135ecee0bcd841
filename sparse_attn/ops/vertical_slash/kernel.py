"""Vertical-slash attention: one Triton kernel that attends each query block to its layout's key ranges
and then to its gathered key columns, in one online softmax.

Two steps per call:
- the plan: `_count_kernel` counts each block's tiles, and `_tiles_kernel` cuts its ranges (clipped to
  what its rows can see) into BN-wide key tiles listed flat, blocks one after the other: tile t is keys
  [start_t, end_t), end_t - start_t <= BN. Ranges average a few BN wide, so looping over ranges and then
  over their tiles would restart the software pipeline at every range; one flat loop over the tile list
  keeps it full. Each block's list comes in sections: the tiles every row of the block sees whole, then
  the tiles near the causal diagonal, which alone pay the causal mask, each section in range order; the
  columns every row sees are a prefix of the (sorted) columns. Range order is key order, except on long
  inputs with GQA (GROUP_ORDER_MIN_KEYS), where `_group_order_kernel` first lists the ranges a block
  shares with the other query heads of its kv head, so that the heads read those K/V tiles at the same
  time and the L2 serves all but the first. With `split` (two heads per program) the
  BN-wide tiles every row sees come first and run with no mask at all (measured: faster there, slower for
  one head per program and, at 1M, the order alone costs the per-head kernel its L2 reuse).
  After its range tiles each block's list holds the keys it gathers: its columns and the keys of spilled
  range tails (a merged range of 65 keys would otherwise cost two tiles, the second holding one key; with
  SPILL_KEYS such tails are gathered with the columns, BN keys to a tile).
- `_vs_attn_kernel`: per (batch, query head, query block) the online softmax over the tile list (keys past
  a tile's end masked out), then over the gathered keys, BN at a time.

Program order: programs of the query heads sharing a kv head run side by side, last query blocks first
(they see the most keys; the short ones fill the tail), so neighbouring programs read the same keys and
reuse them from L2. GQA: k and v are never repeated. Padded [B, H, S, D] inputs (any strides, e.g. HF's
transposed views) and packed varlen [T, H, D] inputs with cu_seqlens are both read through strides; a
sequence shorter than the layout uses the layout's first blocks, its own causal offset, and keys clipped
to its length (as the reference does). Scores are kept in the log2 domain (exp2), accumulation is float32.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..._checks import warn_once
from ..._triton import LOG2E, count_below, tma_descriptors
from ...layouts import VerticalSlashLayout
from . import hopper

__all__ = ["Plan", "make_plan", "forward", "launch_config", "heads_per_program"]

HEAD_DIMS = (16, 32, 64, 128)
# Launch configuration for 16-bit inputs by query block size (fp32 takes half the key tile, 2 stages).
# wide_unmasked: the BN-wide tiles every row sees run without a mask (fewer instructions; measured faster
# only where two heads share each K/V tile).
CONFIG = {64: {"BN": 64, "num_warps": 4, "num_stages": 3, "wide_unmasked": False},
          128: {"BN": 64, "num_warps": 8, "num_stages": 3, "wide_unmasked": False}}
# Two heads per program (a 128-row tile of two heads' 64-row blocks): overrides CONFIG[128].
PAIR_CONFIG = {"BN": 64, "num_warps": 8, "num_stages": 2, "maxnreg": 128, "wide_unmasked": True}
BLOCK_SIZES_Q = (16, 32, 64, 128)
_LANES = 64  # blocks per program of the count kernel
# tiles kernel: ranges x tiles per step, warps. One warp on 16 x 8 is 3x faster than 4 warps on 64 x 16 (H100,
# methods benchmark layout: 0.16 against 0.49 ms at 128K, 1.39 against 4.18 ms at 1M)
_TILES_LAUNCH = dict(LANES=16, TL=8, num_warps=1)
# Per block: range tiles, range tiles every row sees whole, keys gathered (visible columns and spilled keys),
# gathered keys every row sees, of the range tiles every row sees whole those BN keys wide (listed first: they
# need no mask), spilled keys (see _range_split).
COUNTS_PER_BLOCK = 6
# A range's last tile holding at most this many keys (and fewer than BN) is spilled: its keys are gathered with
# the block's columns, BN to a tile, instead of filling a tile of its own (0: never).
SPILL_KEYS = 32
_COPY_CHUNK = 128  # tiles kernel: columns copied per step
# From this many keys on (one kv head's K and V are 5x the H100's 50 MB L2 at 512K), one head per program and
# a GQA group of 2..8 query heads, each block walks its ranges shared-first (`_group_order_kernel`): a group's
# heads then reach the ranges they share together and read each from DRAM about once. Measured on the
# methods benchmark's 1M layout: attention 3-4 % faster, DRAM reads 1.03 -> 0.93 TB; level at 128K and 512K
# (H100, 2026-11-24).
GROUP_ORDER_MIN_KEYS = 524288
GROUP_ORDER_MAX_GROUP = 8
_ORDER_LANES = 64


@triton.jit
def _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(first row, rows, first key, keys) of sequence b."""
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b)
        return q_start, tl.load(CU_Q + b + 1) - q_start, k_start, tl.load(CU_K + b + 1) - k_start
    zero = b * 0  # a tensor, like the loads above
    return zero, seqlen_q + zero, zero, seqlen_k + zero


@triton.jit
def _reaches(q0, sq, sk, BM: tl.constexpr, CAUSAL: tl.constexpr):
    """(reach, first_reach): keys below `reach` are seen by some row of the block, below `first_reach`
    by every row."""
    if CAUSAL:
        off = sk - sq
        return tl.minimum(sk, tl.minimum(q0 + BM, sq) + off), tl.maximum(tl.minimum(sk, q0 + off + 1), 0)
    every = sk + q0 * 0  # q0's shape: both branches must return the same types
    return every, every


@triton.jit
def _range_split(start, end, first, BN: tl.constexpr, SPLIT: tl.constexpr, SPILL: tl.constexpr):
    """A range's tiles by section: (all, BN-wide tiles every row sees, other tiles every row sees, tiles
    that may cross the causal limit, keys spilled). Keys below `first` are seen by every row. Without SPLIT
    the tiles every row sees are not told apart by width (all in the second section, in range order).
    SPILL > 0: a range every row sees, wider than BN, whose last tile would hold 1..SPILL keys, loses that
    tile; its keys (the spilled ones) go to the block's gathered keys instead, where they fill whole tiles."""
    width = tl.maximum(end - start, 0)
    tiles = (width + BN - 1) // BN
    below = end <= first
    whole = tl.where(below, tiles, tl.minimum(tl.maximum(first - start, 0) // BN, tiles))
    rest = width % BN
    spill = tl.where(below & (width > BN) & (rest <= SPILL), rest, 0)
    cut = (spill > 0).to(tl.int32)
    tiles -= cut
    whole -= cut
    if SPLIT:
        wide = tl.where(below, width // BN, whole)
    else:
        wide = tiles * 0
    return tiles, wide, whole - wide, tiles - whole, spill


@triton.jit
def _planned_block(num_heads, nqb, qb, HP: tl.constexpr):
    """For plan program row program_id(1) = (batch, run of HP heads sharing one index): (batch, the layout's
    block of query block(s) qb of the run's first head, the plan's block). Plans hold one head per run."""
    runs = num_heads // HP
    bh = tl.program_id(1)
    b = bh // runs
    head = (bh % runs) * HP
    return b, (b.to(tl.int64) * num_heads + head) * nqb + qb, bh.to(tl.int64) * nqb + qb


@triton.jit(do_not_specialize=("nqb", "max_ranges", "max_columns", "seqlen_q", "seqlen_k"))
def _count_kernel(R_COUNT, R_START, R_END, C_COUNT, C_IDX, CU_Q, CU_K, COUNTS,
                  num_heads, nqb, max_ranges, max_columns, seqlen_q, seqlen_k,
                  BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                  STEPS: tl.constexpr, LANES: tl.constexpr, NC: tl.constexpr, SPLIT: tl.constexpr,
                  HP: tl.constexpr, SPILL: tl.constexpr):
    """COUNTS (NC per block, see COUNTS_PER_BLOCK) of LANES blocks at a time (one lane each): a latency-bound
    walk, so many blocks share it. Planned heads: every HP-th (see _planned_block)."""
    qb = tl.program_id(0) * LANES + tl.arange(0, LANES)
    b, block, dst_block = _planned_block(num_heads, nqb, qb, HP)
    _, sq, _, sk = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    q0 = qb * BM
    live = (qb < nqb) & (q0 < sq)
    reach, first = _reaches(q0, sq, sk, BM, CAUSAL)
    n_ranges = tl.load(R_COUNT + block, mask=live, other=0)
    n_tiles = tl.zeros([LANES], tl.int32)
    n_full = tl.zeros([LANES], tl.int32)
    n_wide = tl.zeros([LANES], tl.int32)
    n_spill = tl.zeros([LANES], tl.int32)
    for r in tl.range(0, tl.max(n_ranges, 0)):
        on = r < n_ranges
        start = tl.load(R_START + block * max_ranges + r, mask=on, other=0)
        end = tl.minimum(tl.load(R_END + block * max_ranges + r, mask=on, other=0), reach)
        tiles, wide, short, cross, spill = _range_split(start, end, first, BN, SPLIT, SPILL)
        n_tiles += tiles
        n_full += wide + short
        n_wide += wide
        n_spill += spill
    n_cols = tl.load(C_COUNT + block, mask=live, other=0)
    row = C_IDX + block * max_columns
    dst = COUNTS + dst_block * NC
    gone = (qb < nqb) & ~live
    tl.store(dst, tl.where(live, n_tiles, 0), mask=live | gone)
    tl.store(dst + 1, tl.where(live, n_full, 0), mask=live | gone)
    visible = count_below(row, 1, n_cols, reach, live, STEPS) + n_spill
    tl.store(dst + 2, tl.where(live, visible, 0), mask=live | gone)
    seen = count_below(row, 1, n_cols, first, live, STEPS) + n_spill
    tl.store(dst + 3, tl.where(live, seen, 0), mask=live | gone)
    tl.store(dst + 4, tl.where(live, n_wide, 0), mask=live | gone)
    tl.store(dst + 5, tl.where(live, n_spill, 0), mask=live | gone)


@triton.jit(do_not_specialize=("nqb", "max_ranges", "max_columns", "seqlen_q", "seqlen_k"))
def _tiles_kernel(R_COUNT, R_START, R_END, C_IDX, CU_Q, CU_K, COUNTS, FIRST_TILE, T_START, T_END,
                  num_heads, nqb, max_ranges, max_columns, seqlen_q, seqlen_k,
                  BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                  LANES: tl.constexpr, TL: tl.constexpr, NC: tl.constexpr, SPLIT: tl.constexpr,
                  HP: tl.constexpr, SPILL: tl.constexpr, CHUNK: tl.constexpr):
    """One block's list, written from FIRST_TILE[block] on. First its range tiles, LANES ranges x TL tiles per
    store, in three sections, each in range order: the BN-wide tiles every row sees (the kernel may run them
    without a mask; only with SPLIT, else none), the other tiles every row sees, the tiles that may cross the
    causal limit. Then (T_START only) the keys it gathers: the visible columns every row sees, the spilled
    keys (_range_split), the other visible columns."""
    qb = tl.program_id(0)
    b, block, dst_block = _planned_block(num_heads, nqb, qb, HP)
    _, sq, _, sk = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    q0 = qb * BM
    reach, first = _reaches(q0, sq, sk, BM, CAUSAL)
    lane = tl.arange(0, LANES)
    n_ranges = tl.where(q0 < sq, tl.load(R_COUNT + block), 0)
    counts = COUNTS + dst_block * NC
    base = tl.load(FIRST_TILE + dst_block)
    n_tiles = tl.load(counts)
    n_spill = tl.load(counts + 5)
    n_visible = tl.load(counts + 2) - n_spill  # the layout's columns some row sees
    n_seen = tl.load(counts + 3) - n_spill  # and those every row sees
    slot_wide = base
    slot_short = base + tl.load(counts + 4)
    slot_cross = base + tl.load(counts + 1)
    slot_spill = base + n_tiles + n_seen
    spill_lane = tl.arange(0, BN)
    for r0 in tl.range(0, n_ranges, LANES):
        live = r0 + lane < n_ranges
        start = tl.load(R_START + block * max_ranges + r0 + lane, mask=live, other=0)
        end = tl.minimum(tl.load(R_END + block * max_ranges + r0 + lane, mask=live, other=0), reach)
        tiles, wide, short, cross, spill = _range_split(start, end, first, BN, SPLIT, SPILL)
        wide_at = slot_wide + tl.cumsum(wide, 0) - wide  # each range's first slot in each section
        short_at = slot_short + tl.cumsum(short, 0) - short
        cross_at = slot_cross + tl.cumsum(cross, 0) - cross
        for i0 in tl.range(0, tl.max(tiles, 0), TL):
            i = i0 + tl.arange(0, TL)
            ok = i[None, :] < tiles[:, None]
            t_start = start[:, None] + i[None, :] * BN
            j = i[None, :] - wide[:, None]  # index past the range's wide tiles
            dst = tl.where(j < 0, wide_at[:, None] + i[None, :],
                           tl.where(j < short[:, None], short_at[:, None] + j, cross_at[:, None] + j - short[:, None]))
            tl.store(T_START + dst, t_start, mask=ok)
            tl.store(T_END + dst, tl.minimum(t_start + BN, end[:, None]), mask=ok)
        if SPILL > 0:
            spill_at = slot_spill + tl.cumsum(spill, 0) - spill
            tl.store(T_START + spill_at[:, None] + spill_lane[None, :], end[:, None] - spill[:, None] + spill_lane[None, :],
                     mask=spill_lane[None, :] < spill[:, None])
            slot_spill += tl.sum(spill, 0)
        slot_wide += tl.sum(wide, 0)
        slot_short += tl.sum(short, 0)
        slot_cross += tl.sum(cross, 0)
    cols = C_IDX + block * max_columns
    gathered = base + n_tiles
    for c0 in tl.range(0, n_visible, CHUNK):
        c = c0 + tl.arange(0, CHUNK)
        on = c < n_visible
        key = tl.load(cols + c, mask=on, other=0)
        tl.store(T_START + gathered + tl.where(c < n_seen, c, c + n_spill), key, mask=on)


@triton.jit(do_not_specialize=("nqb", "max_ranges"))
def _group_order_kernel(R_COUNT, R_START, R_END, O_START, O_END, CLS, num_heads, nqb, max_ranges, group,
                        GP: tl.constexpr, LANES: tl.constexpr, STEPS: tl.constexpr):
    """One block of one head: its ranges written to O_START / O_END shared-first, i.e. stably sorted by how
    few of the group's other heads have a range holding the range's middle key in the same query block
    (all of them first, none last; key order within a class). CLS: scratch for each range's class."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    first = bh - (bh % num_heads) % group  # (batch, head) row of the group's first head
    block = bh.to(tl.int64) * nqb + qb
    row = block * max_ranges
    n = tl.load(R_COUNT + block)
    lane = tl.arange(0, LANES)
    class_id = tl.arange(0, GP)
    # The group's other heads side by side ([LANES, GP]): their binary searches run together, so one range
    # waits on STEPS dependent loads, not GP x STEPS. This head and the padding heads (j >= group) have no ranges.
    other = first + class_id
    oblock = other.to(tl.int64) * nqb + qb
    n_other = tl.load(R_COUNT + oblock, mask=(class_id < group) & (other != bh), other=0)
    o_row = oblock * max_ranges
    counts = tl.zeros([GP], tl.int32)
    for r0 in tl.range(0, n, LANES):
        live = r0 + lane < n
        start = tl.load(R_START + row + r0 + lane, mask=live, other=0)
        end = tl.load(R_END + row + r0 + lane, mask=live, other=0)
        mid = start + (end - start) // 2
        below = tl.zeros([LANES, GP], tl.int32)  # how many of each other head's starts are <= mid
        for i in tl.static_range(STEPS):
            probe = below + (1 << (STEPS - 1 - i))
            ok = live[:, None] & (probe <= n_other[None, :])
            at = tl.load(R_START + o_row[None, :] + probe - 1, mask=ok, other=0)
            below = tl.where(ok & (at <= mid[:, None]), probe, below)
        holds = below > 0
        end_other = tl.load(R_END + o_row[None, :] + below - 1, mask=live[:, None] & holds, other=0)
        cover = tl.sum((holds & (end_other > mid[:, None])).to(tl.int32), 1)
        cls = group - 1 - cover
        tl.store(CLS + row + r0 + lane, cls.to(tl.int8), mask=live)
        counts += tl.sum(((cls[:, None] == class_id[None, :]) & live[:, None]).to(tl.int32), 0)
    base = tl.cumsum(counts, 0) - counts  # each class's first slot
    for r0 in tl.range(0, n, LANES):
        live = r0 + lane < n
        cls = tl.load(CLS + row + r0 + lane, mask=live, other=0).to(tl.int32)
        hit = ((cls[:, None] == class_id[None, :]) & live[:, None]).to(tl.int32)
        slot = tl.sum(hit * (base[None, :] + tl.cumsum(hit, 0) - hit), 1)
        tl.store(O_START + row + slot, tl.load(R_START + row + r0 + lane, mask=live), mask=live)
        tl.store(O_END + row + slot, tl.load(R_END + row + r0 + lane, mask=live), mask=live)
        base += tl.sum(hit, 0)


def _group_order(layout: VerticalSlashLayout, group: int):
    """(range starts, range ends) of the layout with each block's ranges in shared-first order (see
    _group_order_kernel); entries past a block's count are left unset."""
    b, h, nqb = layout.range_counts.shape
    m = layout.max_ranges
    starts = torch.empty((b, h, nqb, m), dtype=layout.range_starts.dtype, device=layout.device)
    ends = torch.empty((b, h, nqb, m), dtype=layout.range_ends.dtype, device=layout.device)
    scratch = torch.empty((b, h, nqb, m), dtype=torch.int8, device=layout.device)
    _group_order_kernel[(nqb, b * h)](
        layout.range_counts, layout.range_starts, layout.range_ends, starts, ends, scratch, h, nqb, m, group,
        GP=triton.next_power_of_2(group), LANES=_ORDER_LANES, STEPS=max(1, math.ceil(math.log2(m + 1))),
        num_warps=2)
    return starts, ends


@triton.jit
def _fold(acc, m_i, l_i, q, k, v, ok, qk_scale, MASK: tl.constexpr, GUARD: tl.constexpr, PREC: tl.constexpr):
    """One tile (k [D, BN], v [BN, D]; where MASK, scores outside ok ([BM, BN] or [1, BN]) dropped)
    folded into the running softmax state."""
    s = tl.dot(q, k, input_precision=PREC)
    if MASK:
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_use = m_new
    if GUARD:  # a row with no key yet keeps m = -inf: shift by 0 there, so exp2 gives 0, not NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _range_tiles(acc, m_i, l_i, q, Kb, Vb, KD, VD, b32, hk32, T_START, T_END, lo, hi, rows, off, qk_scale,
                 s_kn, s_kd, s_vn, s_vd, BN: tl.constexpr, D: tl.constexpr, MASK: tl.constexpr,
                 CAUSAL: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    """Tiles lo..hi of the block's tile list. MASK: they may be shorter than BN (keys past a tile's end
    are dropped); CAUSAL: they may also cross the diagonal. TMA: K/V tiles come through tensor
    descriptors from the tile's start (keys past its end are real keys of the sequence, or zeros past the
    last one, and are masked out of the scores)."""
    lane = tl.arange(0, BN)
    d = tl.arange(0, D)
    k_off = lane[None, :] * s_kn + d[:, None] * s_kd  # 32-bit and loop-invariant; the tile start is 64-bit
    v_off = lane[:, None] * s_vn + d[None, :] * s_vd
    for t in tl.range(lo, hi):
        start = tl.load(T_START + t)
        if MASK:
            inside = lane < tl.load(T_END + t) - start
        else:
            inside = lane < BN
        if TMA:
            k = tl.trans(KD.load([b32, hk32, start, 0]).reshape(BN, D))
            v = VD.load([b32, hk32, start, 0]).reshape(BN, D)
        elif MASK:
            k = tl.load(Kb + start.to(tl.int64) * s_kn + k_off, mask=inside[None, :], other=0.0)
            v = tl.load(Vb + start.to(tl.int64) * s_vn + v_off, mask=inside[:, None], other=0.0)
        else:
            k = tl.load(Kb + start.to(tl.int64) * s_kn + k_off)
            v = tl.load(Vb + start.to(tl.int64) * s_vn + v_off)
        ok = inside[None, :]
        if CAUSAL:
            ok = ok & (start + lane[None, :] <= rows[:, None] + off)
        acc, m_i, l_i = _fold(acc, m_i, l_i, q, k, v, ok, qk_scale, MASK, CAUSAL, PREC)
    return acc, m_i, l_i


@triton.jit
def _column_tiles(acc, m_i, l_i, q, Kb, Vb, cols, lo, hi, n_cols, rows, off, qk_scale,
                  s_kn, s_kd, s_vn, s_vd, BN: tl.constexpr, D: tl.constexpr, MASK: tl.constexpr,
                  CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """Columns lo..hi (a multiple of BN apart unless MASK) of the block's list, gathered BN at a time."""
    lane = tl.arange(0, BN)
    d = tl.arange(0, D)
    for c0 in tl.range(lo, hi, BN):
        listed = c0 + lane < n_cols  # only read where MASK
        if MASK:
            keys = tl.load(cols + c0 + lane, mask=listed, other=0)
        else:
            keys = tl.load(cols + c0 + lane)
        kn = keys.to(tl.int64)
        k = tl.load(Kb + kn[None, :] * s_kn + d[:, None] * s_kd)
        v = tl.load(Vb + kn[:, None] * s_vn + d[None, :] * s_vd)
        ok = listed[None, :]
        if CAUSAL:
            ok = ok & (keys[None, :] <= rows[:, None] + off)
        acc, m_i, l_i = _fold(acc, m_i, l_i, q, k, v, ok, qk_scale, MASK, MASK, PREC)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=("nqb", "seqlen_q", "seqlen_k", "s_lb", "s_lh"))
def _vs_attn_kernel(
    Q, K, V, KD, VD, O, LSE, COUNTS, FIRST_TILE, T_START, T_END, CU_Q, CU_K,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_om, s_od, s_lb, s_lh, s_lm,
    num_heads, group, nqb, seqlen_q, seqlen_k, qk_scale,
    BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, HP: tl.constexpr, CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr, RETURN_LSE: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr, NC: tl.constexpr,
    WIDE_UNMASKED: tl.constexpr,
):
    # One program: query block qb of HP query heads h0 .. h0 + HP - 1 of one GQA group (HP > 1 only when
    # their indices are identical: the plan and index of h0 serve all). Its tile stacks the heads' rows,
    # [HP * BM, D], so every K/V tile loaded is used by HP heads.
    # Axis 0: (query block, run of HP heads of the group), heads fastest, last blocks first; axis 1:
    # (batch, kv head).
    per_kv = group // HP
    qb = nqb - 1 - tl.program_id(0) // per_kv
    hk = tl.program_id(1) % (num_heads // group)
    b = tl.program_id(1) // (num_heads // group)
    h0 = hk * group + (tl.program_id(0) % per_kv) * HP
    q_start, sq, k_start, sk = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    q0 = qb * BM
    if q0 < sq:
        off = sk - sq
        i = tl.arange(0, HP * BM)
        rows = q0 + i % BM  # query position of each tile row
        heads = (h0 + i // BM).to(tl.int64)  # and its query head
        row_ok = rows < sq
        d = tl.arange(0, D)
        b64 = b.to(tl.int64)
        q_rows = (q_start + rows).to(tl.int64)
        q = tl.load(Q + b64 * s_qb + heads[:, None] * s_qh + q_rows[:, None] * s_qm + d[None, :] * s_qd,
                    mask=row_ok[:, None], other=0.0)
        Kb = K + b64 * s_kb + hk.to(tl.int64) * s_kh + k_start.to(tl.int64) * s_kn
        Vb = V + b64 * s_vb + hk.to(tl.int64) * s_vh + k_start.to(tl.int64) * s_vn
        b32 = b.to(tl.int32)  # TMA coordinates (padded inputs only: k_start is 0)
        hk32 = hk.to(tl.int32)
        m_i = tl.full([HP * BM], float("-inf"), tl.float32)
        l_i = tl.zeros([HP * BM], tl.float32)
        acc = tl.zeros([HP * BM, D], tl.float32)
        block = (b64 * (num_heads // HP) + h0 // HP) * nqb + qb  # the plan's (one head per run of HP)
        n_tiles = tl.load(COUNTS + block * NC)
        n_full = tl.load(COUNTS + block * NC + 1)
        n_cols = tl.load(COUNTS + block * NC + 2)
        n_seen = tl.load(COUNTS + block * NC + 3) // BN * BN
        n_wide = tl.load(COUNTS + block * NC + 4)
        first_tile = tl.load(FIRST_TILE + block)
        ts = T_START + first_tile
        te = T_END + first_tile
        # The tile list's sections: BN-wide tiles every row sees, short ones every row sees, the rest.
        acc, m_i, l_i = _range_tiles(acc, m_i, l_i, q, Kb, Vb, KD, VD, b32, hk32, ts, te, 0, n_wide, rows, off,
                                     qk_scale, s_kn, s_kd, s_vn, s_vd, BN, D, not WIDE_UNMASKED, False, PREC, TMA)
        acc, m_i, l_i = _range_tiles(acc, m_i, l_i, q, Kb, Vb, KD, VD, b32, hk32, ts, te, n_wide, n_full, rows,
                                     off, qk_scale, s_kn, s_kd, s_vn, s_vd, BN, D, True, False, PREC, TMA)
        acc, m_i, l_i = _range_tiles(acc, m_i, l_i, q, Kb, Vb, KD, VD, b32, hk32, ts, te, n_full, n_tiles, rows,
                                     off, qk_scale, s_kn, s_kd, s_vn, s_vd, BN, D, True, CAUSAL, PREC, TMA)
        cols = ts + n_tiles  # the keys the block gathers follow its range tiles
        acc, m_i, l_i = _column_tiles(acc, m_i, l_i, q, Kb, Vb, cols, 0, n_seen, n_cols, rows, off, qk_scale,
                                      s_kn, s_kd, s_vn, s_vd, BN, D, False, CAUSAL, PREC)
        acc, m_i, l_i = _column_tiles(acc, m_i, l_i, q, Kb, Vb, cols, n_seen, n_cols, n_cols, rows, off,
                                      qk_scale, s_kn, s_kd, s_vn, s_vd, BN, D, True, CAUSAL, PREC)

        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]  # rows that saw no key: acc is 0, so 0
        tl.store(O + b64 * s_ob + heads[:, None] * s_oh + q_rows[:, None] * s_om + d[None, :] * s_od,
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])
        if RETURN_LSE:
            lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                           float("-inf"))
            tl.store(LSE + b64 * s_lb + heads * s_lh + q_rows * s_lm, lse, mask=row_ok)


def _strides4(t: torch.Tensor, packed: bool):
    """(batch, head, row, dim) strides; packed [T, H, D] tensors have no batch stride."""
    if packed:
        return 0, t.stride(1), t.stride(0), t.stride(2)
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def launch_config(block_size_q: int, fp32: bool, heads_per_program: int = 1) -> dict:
    """BN / warps / stages / register cap for a tile of heads_per_program x block_size_q rows (measured on
    H100)."""
    rows = heads_per_program * block_size_q
    cfg = dict(CONFIG[128 if rows >= 128 else 64])
    if heads_per_program > 1:
        cfg.update(PAIR_CONFIG)
    if fp32:
        cfg.update(BN=cfg["BN"] // 2, num_stages=2)
    return cfg


def heads_per_program(layout: VerticalSlashLayout, group: int, fp32: bool) -> int:
    """2 where two query heads of one GQA group share their index (layout.shared_heads even, group even)
    and their stacked rows make a tile of at most 128 (16-bit inputs); else 1."""
    if layout.shared_heads % 2 == 0 and group % 2 == 0 and layout.block_size_q <= 64 and not fp32:
        return 2
    return 1


def _tile_lists(layout: VerticalSlashLayout, cu, lengths, num_heads: int, bn: int, causal: bool, packed: bool,
          split: bool = True, hp: int = 1, group: int = 1, spill: Optional[int] = None):
    """Per-block counts int32 [B, H / hp, nqb, COUNTS_PER_BLOCK], each block's first slot int64
    [B, H / hp, nqb], and the block lists int32 [total] (start, end), blocks one after the other (no padding to
    the longest): a block's range tiles (start, end), then the keys it gathers (start only; see _tiles_kernel).
    split: list the BN-wide tiles every row sees first (else in range order with the others). hp: heads per
    program; the hp heads of a program share one index (layout.shared_heads), so only the first of each run of
    hp is planned. group: query heads per kv head; with one head per program, a group of
    2..GROUP_ORDER_MAX_GROUP and at least GROUP_ORDER_MIN_KEYS keys, "range order" is the shared-first order of
    `_group_order` instead of key order (the same tiles, listed in another order). spill: see _range_split
    (None: SPILL_KEYS, at most BN - 1)."""
    spill = min(SPILL_KEYS, bn - 1) if spill is None else int(spill)
    if not 0 <= spill < bn:
        raise ValueError(f"spill: expected 0 <= spill < BN ({bn}), got {spill}")
    r_start, r_end = layout.range_starts, layout.range_ends
    if (hp == 1 and 2 <= group <= GROUP_ORDER_MAX_GROUP and lengths[1] >= GROUP_ORDER_MIN_KEYS
            and layout.max_ranges > 1):
        r_start, r_end = _group_order(layout, group)
    b, h, nqb = layout.range_counts.shape
    h //= hp
    counts = torch.empty(b, h, nqb, COUNTS_PER_BLOCK, dtype=torch.int32, device=layout.device)
    meta = dict(BM=layout.block_size_q, BN=bn, CAUSAL=causal, VARLEN=packed, SPLIT=split, HP=hp, SPILL=spill)
    steps = max(1, math.ceil(math.log2(layout.max_columns + 1)))
    _count_kernel[(triton.cdiv(nqb, _LANES), b * h)](
        layout.range_counts, r_start, r_end, layout.column_counts,
        layout.column_indices, *cu, counts, num_heads, nqb, layout.max_ranges, layout.max_columns, *lengths,
        STEPS=steps, LANES=_LANES, NC=COUNTS_PER_BLOCK, num_warps=2, **meta)
    sizes = (counts[..., 0] + counts[..., 2]).flatten()  # range tiles + gathered keys
    ends = sizes.cumsum(0)
    first_tile = (ends - sizes).view(b, h, nqb)
    total = max(1, int(ends[-1]))  # one device sync sizes the lists
    t_start = torch.empty(total, dtype=torch.int32, device=layout.device)
    t_end = torch.empty_like(t_start)
    _tiles_kernel[(nqb, b * h)](
        layout.range_counts, r_start, r_end, layout.column_indices, *cu, counts, first_tile, t_start, t_end,
        num_heads, nqb, layout.max_ranges, layout.max_columns, *lengths, NC=COUNTS_PER_BLOCK, CHUNK=_COPY_CHUNK,
        **_TILES_LAUNCH, **meta)
    return counts, first_tile, t_start, t_end


@dataclass(frozen=True, eq=False)
class Plan:
    """The launch plan of one layout for one input signature (see make_plan): per block the counts of its
    sections, its first slot, and the flat tile list (start, end); plus the kernel chosen (`backend`), the
    heads per program and the launch configuration. `signature` records what it depends on; a run checks it."""

    counts: torch.Tensor
    first_tile: torch.Tensor
    t_start: torch.Tensor
    t_end: torch.Tensor
    backend: str  # "gluon" or "triton"
    heads: int
    config: dict
    tma: Optional[bool]
    layout: object
    signature: tuple

    def tensors(self):
        return self.counts, self.first_tile, self.t_start, self.t_end

    def check(self, layout, signature: tuple) -> None:
        if self.layout is not layout:
            raise ValueError("plan: made for another layout (plan(...) per layout, reuse it with that layout)")
        if self.signature != signature:
            raise ValueError(f"plan: made for (causal, packed, dtype, heads, kv heads, seqlens) = {self.signature}, "
                             f"this call has {signature}")


def plan_signature(q, shapes, causal: bool, cu_seqlens_q=None, cu_seqlens_k=None) -> tuple:
    cu = (id(cu_seqlens_q), id(cu_seqlens_k)) if shapes.packed else ()
    return (bool(causal), shapes.packed, q.dtype, q.device, shapes.batch, shapes.num_heads, shapes.num_kv_heads,
            shapes.head_dim, shapes.max_seqlen_q, shapes.max_seqlen_k, *cu)


def make_plan(q, k, v, layout, shapes, *, causal: bool, cu_seqlens_q=None, cu_seqlens_k=None,
              config: Optional[dict] = None, heads: Optional[int] = None, tma: Optional[bool] = None,
              backend: Optional[str] = None) -> Plan:
    """Choose the kernel and its launch for these inputs (their shapes, strides and dtypes; no data read),
    and cut the layout into its tile list. Inputs are assumed validated (see vertical_slash_attention).
    config / heads / tma override the launch configuration, heads per program and TMA use.
    backend: "auto" (default: the warp-specialised Gluon kernel of hopper.py where it applies, i.e. sm_90,
    16-bit, head dim 64/128, 64-row blocks, one head per program, K/V rows TMA can read; else the Triton
    kernel, silently), "triton", or "gluon" (the Gluon kernels wherever they can run; inputs they cannot
    take run on Triton, with one warning); None reads SPARSE_ATTN_VS_BACKEND (default "auto")."""
    packed = shapes.packed
    fp32 = q.dtype == torch.float32
    group = shapes.num_heads // shapes.num_kv_heads
    hp = heads_per_program(layout, group, fp32) if heads is None else heads
    if group % hp or layout.shared_heads % hp:
        raise ValueError(f"heads: {hp} heads per program must divide the GQA group ({group}) and "
                         f"layout.shared_heads ({layout.shared_heads})")
    cu = _cu(layout, packed, cu_seqlens_q, cu_seqlens_k)
    lengths = (shapes.max_seqlen_q, shapes.max_seqlen_k)
    signature = plan_signature(q, shapes, causal, cu_seqlens_q, cu_seqlens_k)
    if backend is None:
        backend = os.environ.get("SPARSE_ATTN_VS_BACKEND", "auto")
    if backend not in ("auto", "triton", "gluon"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'gluon' (or SPARSE_ATTN_VS_BACKEND unset), "
                         f"got {backend!r}")
    if backend != "triton" and config is None and tma is None:
        gluon_here = hopper.supported(q, k, v, q, layout, group, hp)
        if backend == "auto":  # only the warp-specialised kernel beats Triton
            gluon_here = gluon_here and hopper.tma_layout(k, v, packed)
        if gluon_here:
            tiles = _tile_lists(layout, cu, lengths, shapes.num_heads, hopper.BN, causal, packed, split=False,
                                group=group)
            return Plan(*tiles, "gluon", hp, {"BN": hopper.BN}, None, layout, signature)
        if backend == "gluon":
            warn_once("vertical_slash:gluon-unsupported", "vertical_slash_attention: the Gluon backend takes sm_90, "
                      "16-bit, head dim 64/128, 64-row blocks, one head per program, last dim contiguous; these "
                      "inputs run on the Triton kernel")
    cfg = config or launch_config(layout.block_size_q, fp32, hp)
    tiles = _tile_lists(layout, cu, lengths, shapes.num_heads, cfg["BN"], causal, packed,
                        split=bool(cfg.get("wide_unmasked", False)), hp=hp, group=group)
    return Plan(*tiles, "triton", hp, cfg, tma, layout, signature)


def _cu(layout, packed: bool, cu_seqlens_q, cu_seqlens_k):
    dummy = layout.range_counts  # stands in for cu_seqlens when not packed (never read)
    return (cu_seqlens_q, cu_seqlens_k) if packed else (dummy, dummy)


def forward(q, k, v, layout, out, lse, shapes, *, causal: bool, scale: Optional[float], cu_seqlens_q=None,
            cu_seqlens_k=None, plan: Optional[Plan] = None, **choices) -> None:
    """Attention into out (and lse), on `plan` (None: make_plan(..., **choices) first). Inputs are assumed
    validated (see vertical_slash_attention)."""
    if plan is None:
        plan = make_plan(q, k, v, layout, shapes, causal=causal, cu_seqlens_q=cu_seqlens_q,
                         cu_seqlens_k=cu_seqlens_k, **choices)
    else:
        plan.check(layout, plan_signature(q, shapes, causal, cu_seqlens_q, cu_seqlens_k))
    packed = shapes.packed
    head_dim = shapes.head_dim
    scale = head_dim ** -0.5 if scale is None else scale
    lse_strides = (0, 0, 0)
    if lse is not None:
        lse_strides = (0, lse.stride(1), lse.stride(0)) if packed else lse.stride()
    fp32 = q.dtype == torch.float32
    group = shapes.num_heads // shapes.num_kv_heads
    cu = _cu(layout, packed, cu_seqlens_q, cu_seqlens_k)
    lengths = (shapes.max_seqlen_q, shapes.max_seqlen_k)
    nqb = layout.num_query_blocks
    if plan.backend == "gluon":
        hopper.forward(q, k, v, out, lse, plan.tensors(), cu,
                       [_strides4(t, packed) for t in (q, k, v, out)], lse_strides, shapes.num_heads, group,
                       nqb, lengths, scale * LOG2E, causal=causal, packed=packed,
                       batch=shapes.batch, num_kv_heads=shapes.num_kv_heads)
        return
    cfg, hp = plan.config, plan.heads
    kd = vd = None
    if (not fp32) if plan.tma is None else plan.tma:
        kd, vd = tma_descriptors(k, v, cfg["BN"], packed)
    grid = (nqb * (group // hp), shapes.batch * shapes.num_kv_heads)
    extra = {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}
    _vs_attn_kernel[grid](
        q, k, v, kd or k, vd or v, out, lse if lse is not None else out, *plan.tensors(), *cu,
        *_strides4(q, packed), *_strides4(k, packed), *_strides4(v, packed), *_strides4(out, packed),
        *lse_strides, shapes.num_heads, group, nqb, *lengths,
        scale * LOG2E, BM=layout.block_size_q, BN=cfg["BN"], D=head_dim, HP=hp, CAUSAL=causal, VARLEN=packed,
        RETURN_LSE=lse is not None, PREC="ieee" if fp32 else None, TMA=kd is not None, NC=COUNTS_PER_BLOCK,
        WIDE_UNMASKED=bool(cfg.get("wide_unmasked", False)),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **extra,
    )
