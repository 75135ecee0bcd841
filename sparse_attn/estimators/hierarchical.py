"""Hierarchical pattern (HiP-style coarse-to-fine top-k): per query block (prefill) or per decode query
(pages of a paged KV cache), `top_k` key blocks found by a branch-and-prune search in O(S log S), plus the
sink block and the `local` last visible blocks, always kept.

The search, for one query block (a "unit" is a key block in prefill, a page in decode):
- candidates: the units strictly between the sink unit 0 and the `local` last visible units, [1, hi);
  with N = hi - 1 of them and N <= top_k, all are taken;
- otherwise the candidates are cut into roots of W units, W the smallest power of two with
  N <= 2 * top_k * W (so between top_k + 1 and 2 * top_k roots, the last one cut at hi);
- each level scores every live branch [s, min(s + size, hi)) by its representative, its first unit s (HiP's
  fixed position: a kept branch's left half inherits its score, so a level after the first scores only the
  right halves); keeps the top_k best branches (tie rule: equal scores go to the branch with the lower
  first unit); and splits each kept branch in two halves (a half that starts at or past hi is dropped).
  After log2(W) splits every branch is one unit and a last selection keeps the top_k units.
Unit scores: prefill, for the query block's mean query q and a key block's keys, with element-wise key
mean, max and min over the block: a branch of several units is scored by its first unit's q . a, where
a = mean / 2 + (max + min) / 4; a single unit (the last level) by half of q . mean plus half of Quest's
bound sum_d max(q_d * max_d, q_d * min_d), which is q . a + |q| . r with r = (max - min) / 4. The mean alone
misses blocks holding one or a few strongly matching keys (a pass key), the bound alone overrates blocks
whose keys spread widely; the spread term only at the last level gathers half the bytes at the other levels
and ranked a real model's heads better than the full score at every level. Stored per key block as the 2D
row [a, r]. Per query head, its kv head's keys (GQA without copying). Decode, Quest's bound from the page's
key min / max, summed over the query heads of the GQA group (sparse_attn.estimators.quest), so one selection
per kv head serves the group and each page is read once.

Work: 2 * top_k unit scores per query block at the first level, top_k at each of the log2(W) others, so the
search costs O(nq * top_k * D * log(S / top_k)) after the O(S * D) key block summaries; it never builds a S x S
(or nq x nk) tensor on the GPU. Prefill is two Triton launches: the key block summaries (in k's dtype), then the
search, a program per query block and (up to 4) query heads of one kv head that averages their rows and walks the
levels for all of them at once in registers (sort keys [heads, 2 top_k] at the first level; a later level sorts
only its top_k new right halves and merges them with the kept keys, already in order). Decode is one launch
over (sequence, kv head), the same levels. Without CUDA or the Triton interpreter the same search runs in
torch, vectorized over rows (query blocks x heads), with each row's unit scores computed by row chunks. Entries
past a count are left unwritten (the layouts' contract: never read).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, List, Optional

import torch
import triton
import triton.language as tl

from .._checks import warn_once
from .._triton import INTERPRETED, order_key  # noqa: F401  (importing it applies the interpreter fix)
from ..kvcache import PagedKVCache, PageSummaries
from ..layouts import BlockLayout, PageSelection
from ..patterns import Param, Pattern, register_pattern
from .a_shape import PerHead, per_head
from .block_sparse import pool_blocks

__all__ = ["hierarchical_layout", "hierarchical_pages", "search_plan", "SAMPLES", "PATTERN"]

# A branch's representative: the best of SAMPLES units at fixed positions s + (j * size) // SAMPLES. The
# kernels use 1 (the first unit, see the module docstring); the torch search takes others for comparison.
SAMPLES = 1
_NONE = -(1 << 63)  # the sort key of a dead branch (below every live key)
_LOW32 = 0xFFFFFFFF
# Unit-score elements of one chunk of the torch path (float32): 2**25 is 128 MiB.
_CHUNK_ELEMENTS = 1 << 25


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def search_plan(n: int, top_k: int):
    """(root width W, levels) of the search over n candidates keeping top_k (levels = scorings: log2(W) + 1;
    0 where every candidate is taken)."""
    if n <= top_k:
        return 0, 0
    w = _pow2(-(-n // (2 * top_k)))
    return w, w.bit_length()


# ------------------------------------------------------------------------------------------------ Triton

# Launch shapes (constants of the kernels, not options). Prefill: query heads of a GQA group one program
# searches (the largest power of two dividing both the group and this), warps, elements of the head dim per
# gathered chunk of the unit scores (a [heads, 2 top_k, chunk] tile at a time: 8 16-bit elements are one
# 16-byte load per thread, so each thread sums its own chunk and the scores land one per thread, unreplicated,
# for the sort), a register cap (None: the compiler's choice). The chunk (None) follows the tile: 8 to 16 elements
# so that heads x 2 top_k x chunk stays near _PREFILL_TILE (on the H100 at 128K, chunk 16 was 9 % faster than 8
# at top_k 32 and 16 % slower at top_k 64). Decode: warps, chunk. Rows per step of a block mean.
_PREFILL_HEADS = 4
_PREFILL_WARPS = 4
_PREFILL_CHUNK = None
_PREFILL_TILE = 4096
_PREFILL_MAXNREG = None
_DECODE_WARPS = 8
_DECODE_CHUNK = 32
_MEAN_ROWS = 16
# Elements per load of the key summary kernel (8 warps): a 64-token block of D=128 in one load, reduced across
# threads once (sm_90a: 12 barriers and 768 instructions a program, against 39 and 1464 reducing every 16-row
# chunk, the form that took 0.92 ms at 128K with 8 kv heads on an H100).
_SUMMARY_TILE = 8192


@triton.jit
def _branch_keys(score, start, live):
    """int64 sort keys: the score's order-preserving bits above, (2^32 - 1 - start) below, so a descending
    sort puts higher scores first and, among equal scores, lower starts first; dead branches lowest."""
    bits = order_key(tl.where(score == 0.0, 0.0, score))  # -0.0 ties with 0.0
    key = (bits.to(tl.int64) << 32) | (0xFFFFFFFF - start.to(tl.int64))
    return tl.where(live, key, -9223372036854775808)


@triton.jit
def _best_keys(score, start, live, m, M: tl.constexpr):
    """The first level, per row (rows: query heads in prefill, one in decode): the keys of the best m of its
    2M branches, [R, M] descending, dead past m. One sort of all rows' keys along the branches."""
    srt = tl.sort(_branch_keys(score, start, live), descending=True)
    top, _ = tl.split(tl.permute(tl.reshape(srt, [srt.shape[0], 2, M]), [0, 2, 1]))
    return tl.where(tl.arange(0, M)[None, :] < m[:, None], top, -9223372036854775808)


@triton.jit
def _merge_keys(kept, score, start, live, m, M: tl.constexpr):
    """A later level: the best m of the kept keys [R, M] (descending) and the keys of M new branches. The new
    keys sorted ascending after the kept ones make a bitonic sequence; the larger of each pair (j, j + M) are
    its M largest (bitonic again), which one bitonic merge orders: sorts of M keys instead of 2M. M >= 2 (the
    launches round top_k up to a power of two, at least 2)."""
    new = tl.sort(_branch_keys(score, start, live))
    top = tl.bitonic_merge(tl.maximum(kept, new), descending=True)
    return tl.where(tl.arange(0, M)[None, :] < m[:, None], top, -9223372036854775808)


@triton.jit
def _unpack(keys):
    """The starts, liveness and scores (read back from the keys: a kept branch's left half needs no new
    score) of keys."""
    bits = (keys >> 32).to(tl.int32)
    best = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.float32, bitcast=True)
    return (0xFFFFFFFF - (keys & 0xFFFFFFFF)).to(tl.int32), keys != -9223372036854775808, best


@triton.jit
def _roots(n, m, hi, M: tl.constexpr):
    """The first level per row (m [R]): root width w (the smallest power of two with n <= 2 m w), the number
    of splits log2(w), and the roots' starts and liveness [R, 2M] (none unless there are more than m
    candidates)."""
    per = (n + 2 * m - 1) // (2 * m)
    w = tl.full(m.shape, 1, tl.int32)
    splits = tl.zeros(m.shape, tl.int32)
    for _ in tl.static_range(31):
        grow = w < per
        w = tl.where(grow, w * 2, w)
        splits += grow.to(tl.int32)
    j = tl.arange(0, 2 * M)[None, :]
    start = 1 + j * w[:, None]
    return w, splits, start, ((n > m)[:, None]) & (j < 2 * m[:, None]) & (start < hi)


@triton.jit
def _block_mean(X, s_r, s_s, s_d, R: tl.constexpr, r_ok, n_rows, BS: tl.constexpr, RB: tl.constexpr,
                D: tl.constexpr):
    """float32 [R, D]: the mean of rows [0, n_rows) (n_rows >= 1) of R row ranges X + r * s_r + row * s_s,
    summed RB rows at a time in float32 (r_ok [R]: rows of the result to read)."""
    r = tl.arange(0, R)
    d = tl.arange(0, D)
    acc = tl.zeros([R, D], tl.float32)
    for c in tl.static_range(BS // RB):
        t = c * RB + tl.arange(0, RB)
        ptr = X + r.to(tl.int64)[:, None, None] * s_r + t.to(tl.int64)[None, :, None] * s_s + d[None, None, :] * s_d
        ok = r_ok[:, None, None] & (t < n_rows)[None, :, None]
        # Read once: evict these lines first, so the key summaries the searches gather stay in L2.
        acc += tl.sum(tl.load(ptr, mask=ok, other=0.0, eviction_policy="evict_first").to(tl.float32), 1)
    return acc / n_rows.to(tl.float32)


@triton.jit
def _key_summary_kernel(X, OUT, s_xb, s_xh, s_xs, s_xd, s_ob, s_oh, s_on, H, S, bs,
                        BS: tl.constexpr, RB: tl.constexpr, D: tl.constexpr):
    """OUT[b, h, j] = key block j's summary [a, r] (2D, OUT's dtype) over X[b, h, j*bs : (j+1)*bs] (the last
    block's rows only): a = mean / 2 + (max + min) / 4, r = (max - min) / 4, element-wise."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    base = X + b.to(tl.int64) * s_xb + h.to(tl.int64) * s_xh + (j * bs).to(tl.int64) * s_xs
    n_rows = tl.minimum(bs, S - j * bs)
    d = tl.arange(0, D)
    # Element-wise over the row chunks, one cross-thread reduction of each at the end.
    acc = tl.zeros([RB, D], tl.float32)
    hi = tl.full([RB, D], float("-inf"), tl.float32)
    lo = tl.full([RB, D], float("inf"), tl.float32)
    for c in tl.static_range(BS // RB):
        t = c * RB + tl.arange(0, RB)
        ok = (t < n_rows)[:, None]
        x = tl.load(base + t.to(tl.int64)[:, None] * s_xs + d[None, :] * s_xd, mask=ok, other=0.0,
                    eviction_policy="evict_first").to(tl.float32)
        acc += x
        hi = tl.maximum(hi, tl.where(ok, x, float("-inf")))
        lo = tl.minimum(lo, tl.where(ok, x, float("inf")))
    mean = tl.sum(acc, 0) / n_rows.to(tl.float32)
    top = tl.max(hi, 0)
    bottom = tl.min(lo, 0)
    out = OUT + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + j.to(tl.int64) * s_on
    tl.store(out + d, (0.5 * mean + 0.25 * (top + bottom)).to(OUT.dtype.element_ty))
    tl.store(out + D + d, (0.25 * (top - bottom)).to(OUT.dtype.element_ty))


@triton.jit
def _half_units(QB, KB, p, ok, OFF: tl.constexpr, s_kn, D: tl.constexpr, BD: tl.constexpr):
    """sum over elements [OFF, OFF + D) of the query summary rows QB + r * 2D (float32) times the key block
    summary rows at p [R, X] where ok (else 0): qbar . a with OFF 0, |qbar| . r with OFF D."""
    r = tl.arange(0, p.shape[0])
    acc = tl.zeros(p.shape, tl.float32)
    at = KB + p.to(tl.int64)[:, :, None] * s_kn
    for c in tl.static_range(D // BD):
        d = OFF + c * BD + tl.arange(0, BD)
        qc = tl.load(QB + r[:, None] * (2 * D) + d[None, :])
        kc = tl.load(at + d[None, None, :], mask=ok[:, :, None], other=0.0, eviction_policy="evict_last")
        acc += tl.sum(kc.to(tl.float32) * qc[:, None, :], 2)
    return acc


@triton.jit
def _block_units(QB, KB, p, ok, single, s_kn, D: tl.constexpr, BD: tl.constexpr):
    """The scores of the branches starting at key blocks p [R, X] where ok (else -inf) for the R query heads of
    the program: qbar . a, plus |qbar| . r on the rows whose branches are single units (single [R]); the two
    sums are added last, as a kept branch's inherited qbar . a and its |qbar| . r are."""
    acc = _half_units(QB, KB, p, ok, 0, s_kn, D, BD)
    if tl.max(single.to(tl.int32), 0) > 0:
        acc += _half_units(QB, KB, p, ok & single[:, None], D, s_kn, D, BD)
    return tl.where(ok, acc, float("-inf"))


# Unlike the other prefill kernels, this one and _key_summary_kernel keep Triton's specialisation of their length
# arguments: unspecialised (do_not_specialize), the search faulted at 128K with 32 / 8 heads on an H100
# (Triton 3.6) while smaller sizes ran; so vLLM chunks of new length residues compile it again.
@triton.jit
def _prefill_search_kernel(Q, KBAR, QBAR, TOPK, IDX, CNT, s_qb, s_qh, s_qs, s_qd, s_kb, s_kh, s_kn,
                           s_ib, s_ih, s_in, s_cb, s_ch, Hq, sq, sk, nk, bs, local,
                           G: tl.constexpr, HP: tl.constexpr, M: tl.constexpr, LOCAL: tl.constexpr,
                           D: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, RB: tl.constexpr):
    """Query block i of HP query heads of one kv head (HP a power of two dividing the group G): their
    block-mean queries (into a scratch row the levels read back by chunks), then the search of the HP heads
    at once ([HP, 2M] keys sorted at the first level, [HP, M] merged at the others)."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // (Hq // HP)
    h0 = (bh % (Hq // HP)) * HP  # the first of the program's heads
    head = h0 + tl.arange(0, HP)
    m = tl.load(TOPK + head)
    first = Q + b.to(tl.int64) * s_qb + h0.to(tl.int64) * s_qh + (i * bs).to(tl.int64) * s_qs
    qbar = _block_mean(first, s_qh, s_qs, s_qd, HP, head >= 0, tl.minimum(bs, sq - i * bs), BS, RB, D)
    QB = QBAR + (bh.to(tl.int64) * tl.num_programs(0) + i) * HP * 2 * D
    at = QB + tl.arange(0, HP)[:, None] * 2 * D + tl.arange(0, D)[None, :]
    tl.store(at, qbar)
    tl.store(at + D, tl.abs(qbar))
    tl.debug_barrier()  # every thread's scratch stores before any thread reads the chunks back
    last = tl.minimum(i * bs + bs, sq) - 1 + (sk - sq)  # last key the block's rows may see
    diag = tl.minimum(tl.where(last >= 0, last // bs, -1), nk - 1)
    hi = tl.maximum(diag - local + 1, 1)  # candidates [1, hi); local blocks [hi, diag]
    n = tl.where(diag >= 1, hi - 1, 0)
    KB = KBAR + b.to(tl.int64) * s_kb + (h0 // G).to(tl.int64) * s_kh
    size, splits, start, live = _roots(n, m, hi, M)
    kept = _best_keys(_block_units(QB, KB, start, live, size == 1, s_kn, D, BD), start, live, m, M)
    for _ in range(tl.max(splits, 0)):
        top, keep, best = _unpack(kept)
        more = size > 1  # a head with a smaller root width (larger top_k) is at single blocks already
        size = tl.where(more, size // 2, size)
        right = top + size[:, None]
        right_live = keep & more[:, None] & (right < hi)
        final = more & (size == 1)  # rows whose branches become single units: scored with the spread term
        units = _block_units(QB, KB, right, right_live, final, s_kn, D, BD)
        if tl.max(final.to(tl.int32), 0) > 0:
            # The kept left halves get their spread term too (their qbar . a is the inherited score): their
            # keys are made and sorted again before the merge with the right halves'.
            left = best + _half_units(QB, KB, top, keep & final[:, None], D, s_kn, D, BD)
            kept = tl.sort(_branch_keys(left, top, keep), descending=True)
        kept = _merge_keys(kept, units, right, right_live, m, M)
    top, keep, _ = _unpack(kept)
    search = (n > m)[:, None]
    r = tl.arange(0, M)[None, :]
    chosen = tl.where(search, tl.where(keep, top, 2147483647), tl.where(r < n, 1 + r, 2147483647))
    chosen = tl.sort(chosen)
    n_chosen = tl.where(n > m, m, n)[:, None]
    row = (IDX + b.to(tl.int64) * s_ib + head.to(tl.int64) * s_ih + i.to(tl.int64) * s_in)[:, None]
    tl.store(row, tl.zeros([HP, 1], tl.int32), mask=diag >= 0)
    tl.store(row + 1 + r, chosen, mask=r < n_chosen)
    t = tl.arange(0, LOCAL)[None, :]
    n_local = tl.where(diag >= 1, diag - hi + 1, 0)
    tl.store(row + 1 + n_chosen + t, hi + t, mask=t < n_local)
    cnt = tl.where(diag >= 0, 1 + n_chosen + n_local, 0)
    tl.store(CNT + b.to(tl.int64) * s_cb + head[:, None].to(tl.int64) * s_ch + i, cnt)


@triton.jit
def _page_units(Q, KMIN, KMAX, SLOTS, p, ok, s_qh, s_mp, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """Quest's bound of pages p [1, X] where ok (else -inf): the score of the branches starting there. The
    group's Q+ / Q- are summed again per chunk of the head dim from the (cached) query rows."""
    slot = tl.load(SLOTS + p, mask=ok, other=0).to(tl.int64)
    acc = tl.zeros(p.shape, tl.float32)
    for c in tl.static_range(D // BD):
        d = c * BD + tl.arange(0, BD)
        qpos = tl.zeros([BD], tl.float32)
        qneg = tl.zeros([BD], tl.float32)
        for g in tl.static_range(G):
            q = tl.load(Q + g * s_qh + d).to(tl.float32)
            qpos += tl.maximum(q, 0.0)
            qneg += tl.minimum(q, 0.0)
        at = slot[:, :, None] * s_mp + d[None, None, :]
        mn = tl.load(KMIN + at, mask=ok[:, :, None], other=0.0).to(tl.float32)
        mx = tl.load(KMAX + at, mask=ok[:, :, None], other=0.0).to(tl.float32)
        acc += tl.sum(mx * qpos[None, None, :] + mn * qneg[None, None, :], 2)
    return tl.where(ok, acc, float("-inf"))


@triton.jit
def _decode_search_kernel(Q, KMIN, KMAX, STABLE, SEQLENS, PAGES, CNT, s_qb, s_qh, s_mp, s_mh, s_sb, s_pb, s_ph,
                          Hkv, m, local, ps,
                          G: tl.constexpr, M: tl.constexpr, LOCAL: tl.constexpr, D: tl.constexpr,
                          BD: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // Hkv
    h = bh % Hkv
    QG = Q + b.to(tl.int64) * s_qb + (h * G).to(tl.int64) * s_qh
    npages = (tl.load(SEQLENS + b) + ps - 1) // ps
    hi = tl.maximum(npages - local, 1)  # candidates [1, hi); local pages [hi, npages)
    n = tl.where(npages >= 2, hi - 1, 0)
    SLOTS = STABLE + b.to(tl.int64) * s_sb
    KN = KMIN + h.to(tl.int64) * s_mh
    KX = KMAX + h.to(tl.int64) * s_mh
    mm = tl.full([1], m, tl.int32)  # one row: the kv head's selection
    size, splits, start, live = _roots(n, mm, hi, M)
    kept = _best_keys(_page_units(QG, KN, KX, SLOTS, start, live, s_qh, s_mp, G, D, BD), start, live, mm, M)
    for _ in range(tl.max(splits, 0)):
        top, keep, _ = _unpack(kept)
        size = size // 2
        right = top + size[:, None]
        right_live = keep & (right < hi)
        units = _page_units(QG, KN, KX, SLOTS, right, right_live, s_qh, s_mp, G, D, BD)
        kept = _merge_keys(kept, units, right, right_live, mm, M)
    top, keep, _ = _unpack(kept)
    search = n > m
    r = tl.arange(0, M)[None, :]
    chosen = tl.where(search, tl.where(keep, top, 2147483647), tl.where(r < n, 1 + r, 2147483647))
    n_chosen = tl.where(search, m, n)
    row = PAGES + b.to(tl.int64) * s_pb + h.to(tl.int64) * s_ph
    tl.store(row, 0, mask=npages >= 1)
    tl.store(row + 1 + r, chosen, mask=r < n_chosen)
    t = tl.arange(0, LOCAL)
    n_local = tl.where(npages >= 2, npages - hi, 0)
    tl.store(row + 1 + n_chosen + t, hi + t, mask=t < n_local)
    tl.store(CNT + bh, tl.minimum(npages, 1) + n_chosen + n_local)


# ------------------------------------------------------------------------------------------------- torch

def _keys(score: torch.Tensor, start: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    bits = torch.where(score == 0, 0.0, score.float()).contiguous().view(torch.int32)  # -0.0 ties with 0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = (bits.long() << 32) | (_LOW32 - start.long())
    return torch.where(live, key, torch.full_like(key, _NONE))


def search_torch(unit_scores: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], hi: torch.Tensor,
                 m: torch.Tensor, *, samples: int = SAMPLES) -> torch.Tensor:
    """The search of the module docstring for many rows at once, vectorized over them: row r's candidates
    are the units [1, hi[r]), m[r] >= 1 are kept. unit_scores(rows [R'], units [R', X], single [R', 1] bool) ->
    float32 [R', X], the scores of those units (all < hi) for those rows, as representatives of branches that
    are single units where `single` (the last level of those rows). Returns int64 [R, max m]: each row's chosen units
    ascending (every candidate where there are at most m), padded with int64 max."""
    dev = hi.device
    n = (hi - 1).clamp(min=0)
    width = max(1, int(m.max()) if m.numel() else 1)
    r = torch.arange(width, device=dev)
    out = torch.where(r < n[:, None], 1 + r, torch.iinfo(torch.int64).max)
    rows = (n > m).nonzero().flatten()
    if rows.numel() == 0:
        return out
    n, hi, m = n[rows], hi[rows, None], m[rows, None]
    per = -(-n // (2 * m[:, 0]))
    size = torch.ones_like(per)
    while bool((size < per).any()):
        size = torch.where(size < per, size * 2, size)
    j = torch.arange(2 * width, device=dev)
    start = 1 + j * size[:, None]
    live = (j < 2 * m) & (start < hi)
    size = size[:, None]
    while True:
        score = torch.full(start.shape, float("-inf"), device=dev)
        for s in range(samples):
            p = start + (s * size) // samples
            ok = live & (p < hi)
            units = unit_scores(rows, torch.where(ok, p, 0), size == 1)
            score = torch.maximum(score, torch.where(ok, units, float("-inf")))
        top = _keys(score, start, live).sort(dim=-1, descending=True).values[:, :width]
        keep = (r < m) & (top != _NONE)
        top = _LOW32 - (top & _LOW32)
        if bool((size == 1).all()):
            break
        # Rows already at single units keep their choice (scoring it again chooses it again).
        right = top + size // 2
        start = torch.stack([top, right], -1).flatten(1)
        live = torch.stack([keep, keep & (size > 1) & (right < hi)], -1).flatten(1)
        size = torch.where(size > 1, size // 2, size)
    out[rows] = torch.where(keep, top, torch.iinfo(torch.int64).max).sort(-1).values
    return out


def _dots(vectors: Callable, keys: Callable, rows: torch.Tensor, units: torch.Tensor, d: int) -> torch.Tensor:
    """sum_d vectors(rows)[r, d] * keys(rows, units)[r, x, d] (float32 [R, X]), a chunk of rows at a time."""
    out = torch.empty(units.shape, device=units.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, units.shape[1] * d))
    for c0 in range(0, rows.numel(), step):
        rr, uu = rows[c0:c0 + step], units[c0:c0 + step]
        out[c0:c0 + step] = torch.einsum("rd,rxd->rx", vectors(rr), keys(rr, uu))
    return out


def _rows_out(chosen: torch.Tensor, total_units: torch.Tensor, hi: torch.Tensor, n_local: torch.Tensor,
              width: int) -> tuple:
    """Per row [sink 0, chosen..., local hi..] as int32 [R, width] padded with -1, and the counts."""
    big = torch.iinfo(torch.int64).max
    n_chosen = (chosen != big).sum(-1, keepdim=True)
    slot = torch.arange(width, device=chosen.device)
    picked = chosen.gather(1, (slot - 1).clamp(0, chosen.shape[1] - 1).expand(chosen.shape[0], -1))
    local = hi[:, None] + slot - 1 - n_chosen
    total = torch.where(total_units >= 1, 1 + n_chosen[:, 0] + n_local, 0)
    ids = torch.where(slot == 0, 0, torch.where(slot <= n_chosen, picked, local))
    ids = torch.where(slot < total[:, None], ids, -1)
    return ids.to(torch.int32), total.to(torch.int32)


def _prefill_torch(qbar, kbar, m, sq: int, sk: int, bs: int, local: int, width: int):
    b, hq, nq, d = qbar.shape
    hkv, nk = kbar.shape[1], kbar.shape[2]
    dev = qbar.device
    last = (torch.arange(nq, device=dev) * bs + bs).clamp(max=sq) - 1 + (sk - sq)
    diag = torch.where(last >= 0, torch.div(last, bs, rounding_mode="floor"), -1).clamp(max=nk - 1).repeat(b * hq)
    hi = (diag - local + 1).clamp(min=1)  # rows (b, h, i), i fastest
    q_rows = qbar.reshape(-1, d)
    k_rows = kbar.reshape(b * hkv, nk, d)
    kv_of = torch.arange(b * hq * nq, device=dev) // (nq * (hq // hkv))
    half = d // 2

    def half_dots(rows, units, lo: int):
        """Over summary elements [lo, lo + half): qbar . a (lo 0) or |qbar| . r (lo half)."""
        return _dots(lambda r: q_rows[r, lo:lo + half], lambda r, u: k_rows[kv_of[r, None], u, lo:lo + half].float(),
                     rows, units, half)

    def scores(rows, units, single):
        # qbar . a, plus |qbar| . r on the rows at single units only, the two sums added last (as the kernel does)
        out = half_dots(rows, units, 0)
        at = single[:, 0].nonzero().flatten()
        if at.numel():
            out[at] += half_dots(rows[at], units[at], half)
        return out

    chosen = search_torch(scores, torch.where(diag >= 1, hi, 1), m.to(dev).repeat_interleave(nq).repeat(b))
    n_local = torch.where(diag >= 1, diag - hi + 1, 0)
    ids, counts = _rows_out(chosen, diag + 1, hi, n_local, width)
    return ids.view(b, hq, nq, width), counts.view(b, hq, nq)


# ------------------------------------------------------------------------------------------ the two sides

def _outputs(shape, count_shape, device):
    """The kernels' outputs: ids (entries past a count are left unwritten: nothing reads them) and counts."""
    return (torch.empty(shape, dtype=torch.int32, device=device),
            torch.empty(count_shape, dtype=torch.int32, device=device))


def key_summaries(k: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, S, D] -> [B, H, ceil(S / block_size), 2D] in dtype: each key block's summary [a, r] (see the
    module docstring; the last, partial block over its own rows), one Triton launch (D a power of two)."""
    b, h, s, d = k.shape
    nb, bp = -(-s // block_size), _pow2(block_size)
    out = torch.empty(b, h, nb, 2 * d, dtype=dtype, device=k.device)
    _key_summary_kernel[(nb, b * h)](k, out, *k.stride(), *out.stride()[:3], h, s, block_size,
                                     BS=bp, RB=max(1, min(bp, _SUMMARY_TILE // d)), D=d, num_warps=8)
    return out


def _key_summaries_torch(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """key_summaries in float32, in torch (views of k: the whole blocks, then the partial last one)."""
    s = k.shape[2]
    full = s // block_size
    parts = []
    if full:
        blocks = k[:, :, : full * block_size].unflatten(2, (full, block_size))
        parts.append((blocks.amax(3), blocks.amin(3)))
    if s > full * block_size:
        tail = k[:, :, full * block_size:]
        parts.append((tail.amax(2, keepdim=True), tail.amin(2, keepdim=True)))
    hi = torch.cat([p[0] for p in parts], 2).float()
    lo = torch.cat([p[1] for p in parts], 2).float()
    return torch.cat([0.5 * pool_blocks(k, block_size) + 0.25 * (hi + lo), 0.25 * (hi - lo)], -1)


def _query_summaries(qbar: torch.Tensor) -> torch.Tensor:
    """[qbar, |qbar|]: dotted with a key block's [a, r], the unit score (module docstring)."""
    return torch.cat([qbar, qbar.abs()], -1)


def _check_local(local) -> int:
    if isinstance(local, bool) or not isinstance(local, int) or local < 1:
        raise ValueError(f"local: expected an int >= 1 (the last visible blocks, always kept), got {local!r}")
    return local


def _use_triton(x: torch.Tensor, pow2_dim: bool = True) -> bool:
    return (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and pow2_dim


def hierarchical_layout(q: torch.Tensor, k: torch.Tensor, top_k: PerHead, *, block_size: int = 64, local: int = 1,
                        use_triton: Optional[bool] = None) -> BlockLayout:
    """The hierarchical BlockLayout (see the module docstring) of q [B, Hq, Sq, D] against k [B, Hkv, Sk, D],
    causal bottom-right (the queries are the last Sq of Sk positions). top_k: key blocks the search picks per
    query block besides the sink block and the `local` last visible ones (an int or one per query head,
    >= 1). use_triton: None takes the Triton kernel on CUDA or under TRITON_INTERPRET=1, else torch."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"q: expected a multiple of k's {hkv} heads, got {hq}")
    local = _check_local(local)
    bs = block_size
    nq, nk = -(-sq // bs), -(-sk // bs)
    m = per_head("top_k", top_k, hq, minimum=1).clamp(max=nk)
    width = max(1, min(nk, 1 + int(m.max()) + local))
    # The key block summaries in k's dtype on the GPU (half the bytes the search gathers), float32 on the CPU.
    kdtype = k.dtype if k.is_cuda else torch.float32
    if use_triton is None and q.is_cuda and d & (d - 1):
        warn_once("hierarchical-head-dim", f"sparse_attn: hierarchical's prefill kernel takes a power-of-two head "
                  f"dim; D={d} searches in torch (slower, same selection)")
    if not (_use_triton(q, d & (d - 1) == 0) if use_triton is None else use_triton):
        qsum = _query_summaries(pool_blocks(q, bs))  # [B, Hq, nq, 2D] float32
        idx, counts = _prefill_torch(qsum, _key_summaries_torch(k, bs).to(kdtype), m, sq, sk, bs, local, width)
        return BlockLayout(counts, idx, bs, bs, sq, sk, validate=False)
    hp, bp = math.gcd(hq // hkv, _PREFILL_HEADS), _pow2(bs)
    mp = max(2, _pow2(int(m.max())))
    chunk = _PREFILL_CHUNK or min(16, max(8, _PREFILL_TILE // (hp * 2 * mp)))
    kbar = key_summaries(k, bs, kdtype)  # [B, Hkv, nk, 2D]
    idx, counts = _outputs((b, hq, nq, width), (b, hq, nq), q.device)
    # Each program's query summaries [block-mean query, its absolute value], written and read back by the program.
    scratch = torch.empty(b * hq * nq, 2 * d, dtype=torch.float32, device=q.device)
    _prefill_search_kernel[(nq, b * hq // hp)](
        q, kbar, scratch, m.to(torch.int32).to(q.device), idx, counts, *q.stride(), *kbar.stride()[:3],
        *idx.stride()[:3], *counts.stride()[:2], hq, sq, sk, nk, bs, local,
        G=hq // hkv, HP=hp, M=mp, LOCAL=_pow2(local), D=d, BD=min(d, chunk), BS=bp, RB=min(bp, _MEAN_ROWS),
        num_warps=_PREFILL_WARPS, maxnreg=_PREFILL_MAXNREG)
    return BlockLayout(counts, idx, bs, bs, sq, sk, validate=False)


def hierarchical_pages(q: torch.Tensor, cache: PagedKVCache, summaries: PageSummaries, *, top_k: int,
                       local: int = 1, use_triton: Optional[bool] = None) -> PageSelection:
    """Decode's side: per (sequence, kv head) the page 0, the `local` last pages and `top_k` pages found by
    the search over the pages between them, scored by Quest's key min / max bound summed over the kv head's
    query heads (one selection per GQA group). q [B, Hq, D] (or [B, Hq, 1, D]). A sequence with at most
    1 + top_k + local pages reads all of them. One launch, static shapes, no host sync."""
    if q.dim() == 4:
        q = q[:, :, 0]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k: expected an int >= 1 (pages the search picks), got {top_k!r}")
    local = _check_local(local)
    b, hq, d = q.shape
    hkv, ps = cache.num_kv_heads, cache.page_size
    m = min(top_k, cache.max_pages)
    width = max(1, min(cache.max_pages, 1 + m + local))
    if use_triton is None and q.is_cuda and d & (d - 1):
        warn_once("hierarchical-decode-head-dim", f"sparse_attn: hierarchical's decode kernel takes a power-of-two "
                  f"head dim; D={d} searches in torch (slower, same selection)")
    if not (_use_triton(q, d & (d - 1) == 0) if use_triton is None else use_triton):
        return _decode_torch(q, cache, summaries, m, local, width)
    pages, counts = _outputs((b, hkv, width), (b, hkv), q.device)
    _decode_search_kernel[(b * hkv,)](
        q, summaries.kmin, summaries.kmax, summaries.table, cache.seqlens, pages, counts, q.stride(0), q.stride(1),
        summaries.kmin.stride(0), summaries.kmin.stride(1), summaries.table.stride(0), pages.stride(0),
        pages.stride(1), hkv, m, local, ps,
        G=hq // hkv, M=max(2, _pow2(m)), LOCAL=_pow2(local), D=d, BD=min(d, _DECODE_CHUNK),
        num_warps=_DECODE_WARPS)
    return PageSelection(pages, counts, ps)


def _decode_torch(q, cache: PagedKVCache, summaries: PageSummaries, m: int, local: int, width: int):
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    qg = q.float().view(b, hkv, hq // hkv, d)
    vec = torch.cat([qg.clamp(min=0).sum(2), qg.clamp(max=0).sum(2)], -1).view(b * hkv, 2 * d)  # rows (b, h)
    bounds = torch.cat([summaries.kmax, summaries.kmin], -1).float()  # [slots, Hkv, 2D]
    table = summaries.table.long()
    seq_of = torch.arange(b * hkv, device=q.device) // hkv
    head_of = torch.arange(b * hkv, device=q.device) % hkv

    def keys(rows, units):
        return bounds[table[seq_of[rows, None], units], head_of[rows, None]]

    npages = cache.num_pages_of().long().repeat_interleave(hkv)
    hi = (npages - local).clamp(min=1)
    chosen = search_torch(lambda rr, uu, _single: _dots(lambda r_: vec[r_], keys, rr, uu, 2 * d),
                          torch.where(npages >= 2, hi, 1), torch.full_like(npages, m))
    n_local = torch.where(npages >= 2, npages - hi, 0)
    ids, counts = _rows_out(chosen, npages, hi, n_local, width)
    return PageSelection(ids.view(b, hkv, width), counts.view(b, hkv), cache.page_size)


# -------------------------------------------------------------------------------------------- registry

def _estimate(q, k, budgets, *, causal: bool, scale, block_size: int, local: int = 1) -> BlockLayout:
    return hierarchical_layout(q, k, budgets["top_k"], block_size=block_size, local=local)


def _build(layout, q, k, budgets, *, causal: bool, block_size: int, local: int = 1) -> BlockLayout:
    return layout


def _top_ks(seqlen: int, block_size: int) -> List[Dict[str, int]]:
    """top_k 1, then powers of two up to a quarter of the key blocks."""
    nk = -(-seqlen // block_size)
    return [{"top_k": 1}] + [{"top_k": 2 << i} for i in range(64) if 2 << i <= max(2, nk // 4)]


def _cost(seqlen: int, *, block_size: int, **options) -> float:
    """The search's FLOPs relative to dense causal attention's 2 * D * seqlen^2: per query block 2 * top_k
    dot products of D, then top_k per level over log2(nk / top_k) levels, and the last level's spread terms
    (2 * top_k more; top_k 64 taken here)."""
    nq = -(-seqlen // block_size)
    dots = 64 * (4 + math.log2(max(1.0, nq / 128)))
    return nq * dots / seqlen ** 2


PATTERN = register_pattern(Pattern(
    name="hierarchical",
    summary="HiP-style coarse-to-fine top-k: top_k key blocks per query block (pages in decode) by a "
            "branch-and-prune search, O(S log S), plus the first and the last local ones",
    layout=BlockLayout,
    budgets=(Param("top_k", int, 64, 1, doc="key blocks per query block (decode: pages) the search picks, besides "
                                            "the first and the `local` last visible ones"),),
    options=(Param("local", int, 1, 1, doc="last visible key blocks (decode: pages) always kept"),),
    estimate=_estimate,
    build=_build,
    # top_k as large as the key blocks or pages of any size the kernels take (16 tokens and up): dense.
    full_budget=lambda seqlen_q, seqlen_k, block_size: {"top_k": -(-seqlen_k // min(block_size, 16))},
    candidates=_top_ks,
    sweep=_top_ks,
    estimator_cost=_cost,
    speed_tflops=467.0,  # the block-sparse kernel's measured rate
    select=lambda q, cache, summaries, *, scale=None, top_k, local: hierarchical_pages(
        q, cache, summaries, top_k=top_k, local=local),
    summaries=True,
    decode_page_size=64,
    decode_reads=lambda page_size, *, top_k, local: (1 + int(top_k) + int(local)) * page_size,
    color="tab:olive",
))
