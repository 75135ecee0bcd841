"""Quest (query-aware page selection for decode): score every page of the cache by an upper bound of q . k
over its keys, from the page's element-wise key min and max (sparse_attn.kvcache.PageSummaries), and read
only the best pages.

For one query head the bound of a page is sum_d max(q_d * min_d, q_d * max_d). Summed over the query heads
of a GQA group (one selection serves the group, so each page is read once) it is linear in the summaries:
    sum_h sum_d max(q_hd min_d, q_hd max_d) = sum_d (Q+_d max_d + Q-_d min_d),
with Q+ = sum_h max(q_h, 0) and Q- = sum_h min(q_h, 0): two dot products per page, one fused Triton
kernel over all (sequence, kv head, page), then a top-k on the GPU (no host sync). The first `sink` and the
last `window` tokens' pages are always kept; the budget counts tokens (whole pages).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .._triton import INTERPRETED  # noqa: F401  (importing it applies the interpreter fix)
from ..kvcache import PagedKVCache, PageSummaries
from ..layouts import PageSelection
from ..patterns import Pattern, register_pattern
from . import _pages
from ._pages import mark_pages, page_shares, top_pages

__all__ = ["quest_scores", "quest_select", "PATTERN"]

_BLOCK_PAGES = 64  # pages a program scores
_HEADS_PER_PROGRAM = 1  # kv heads a program scores (a divisor of the cache's)
_WARPS = 4


@triton.jit
def _scores_kernel(Q, KMIN, KMAX, STABLE, SEQLENS, OUT, s_qb, s_qh, s_qd, s_mp, s_mh, s_md, s_sb, s_sp,
                   max_pages, Hkv, n_sink, n_local,
                   G: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, BP: tl.constexpr, HB: tl.constexpr):
    """BP pages of one sequence for HB consecutive kv heads: the page table is read once for the heads,
    whose summaries lie side by side in memory."""
    heads_per_seq = Hkv // HB
    b = (tl.program_id(0) // heads_per_seq).to(tl.int64)
    h0 = (tl.program_id(0) % heads_per_seq).to(tl.int64) * HB
    p = tl.program_id(1) * BP + tl.arange(0, BP)
    d = tl.arange(0, D)
    n = (tl.load(SEQLENS + b) + PS - 1) // PS
    ok = p < n
    forced = ok & ((p < n_sink) | (p >= n - n_local))
    slot = tl.load(STABLE + b * s_sb + p.to(tl.int64) * s_sp, mask=ok, other=0).to(tl.int64)
    for j in tl.static_range(HB):
        h = h0 + j
        q_pos = tl.zeros([D], tl.float32)
        q_neg = tl.zeros([D], tl.float32)
        for g in tl.static_range(G):
            q = tl.load(Q + b * s_qb + (h * G + g) * s_qh + d * s_qd).to(tl.float32)
            q_pos += tl.maximum(q, 0.0)
            q_neg += tl.minimum(q, 0.0)
        at = slot[:, None] * s_mp + h * s_mh + d[None, :] * s_md
        mn = tl.load(KMIN + at, mask=ok[:, None], other=0.0).to(tl.float32)
        mx = tl.load(KMAX + at, mask=ok[:, None], other=0.0).to(tl.float32)
        score = tl.sum(mx * q_pos[None, :] + mn * q_neg[None, :], 1)
        score = tl.where(forced, float("inf"), tl.where(ok, score, float("-inf")))
        tl.store(OUT + (b * Hkv + h) * max_pages + p, score, mask=p < max_pages)


def _scores_torch(q, cache: PagedKVCache, summaries: PageSummaries, n_sink: int, n_local: int) -> torch.Tensor:
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    qg = q.float().view(b, hkv, hq // hkv, d)
    q_pos, q_neg = qg.clamp(min=0).sum(2), qg.clamp(max=0).sum(2)  # [B, Hkv, D]
    slots = summaries.table[:, : cache.max_pages].long()
    mn = summaries.kmin[slots].float()  # [B, P, Hkv, D]
    mx = summaries.kmax[slots].float()
    score = torch.einsum("bphd,bhd->bhp", mx, q_pos) + torch.einsum("bphd,bhd->bhp", mn, q_neg)
    return mark_pages(score, cache, n_sink, n_local)


def quest_scores(q: torch.Tensor, cache: PagedKVCache, summaries: PageSummaries, *, n_sink: int = 1,
                 n_local: int = 1) -> torch.Tensor:
    """float32 [B, Hkv, max_pages]: each page's bound summed over the kv head's query heads; the first
    n_sink and last n_local pages of each sequence +inf, pages past its length -inf. q [B, Hq, D]."""
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return _scores_torch(q, cache, summaries, n_sink, n_local)
    out = torch.empty(b, hkv, cache.max_pages, device=q.device, dtype=torch.float32)
    hb = math.gcd(_HEADS_PER_PROGRAM, hkv)
    _scores_kernel[(b * hkv // hb, triton.cdiv(cache.max_pages, _BLOCK_PAGES))](
        q, summaries.kmin, summaries.kmax, summaries.table, cache.seqlens, out, *q.stride(),
        *summaries.kmin.stride(), *summaries.table.stride(), cache.max_pages, hkv, n_sink, n_local,
        G=hq // hkv, D=d, PS=cache.page_size, BP=_BLOCK_PAGES, HB=hb, num_warps=_WARPS)
    return out


def quest_select(q: torch.Tensor, cache: PagedKVCache, summaries: PageSummaries, *, budget: int,
                 sink: int = 0, window: int = 1, scale: Optional[float] = None) -> PageSelection:
    """Per (sequence, kv head) the budget // page_size best pages by quest_scores, the pages of the first
    `sink` and the last `window` tokens always among them (their share of the budget first). A sequence
    with fewer pages than that reads all of its pages. q [B, Hq, D] (or [B, Hq, 1, D]). scale: accepted for
    the decode contract; the ranking by the summed bound does not depend on it."""
    if q.dim() == 4:
        q = q[:, :, 0]
    k, n_sink, n_local = page_shares(cache, budget, sink, window)
    return top_pages(quest_scores(q, cache, summaries, n_sink=n_sink, n_local=n_local), cache, k)


PATTERN = register_pattern(Pattern(
    name="quest",
    summary="Quest decode: pages scored by their key min / max bound, top pages per kv head up to a token "
            "budget (prefill dense)",
    budgets=_pages.BUDGETS,
    select=quest_select,
    summaries=True,
    decode_page_size=32,
    full_budget=_pages.full_budget,
    decode_reads=_pages.reads,
    sweep=_pages.sweep,
    color="tab:purple",
))
