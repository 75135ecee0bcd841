"""What the page-ranking decode patterns share: a token budget split into forced pages (the first `sink`
and the last `window` tokens) and ranked ones, the forced / past-the-end marks on a score tensor, the
top-k into a PageSelection, and their registry budgets. A pattern brings only its page scores.

The top-k on the GPU is one Triton launch, one program per (sequence, kv head) row: four radix passes over
the scores' order-preserving integer keys find the row's k-th largest score exactly (each pass a 256-bin
histogram of one key byte among the keys matching the bytes chosen so far), then one pass writes the kept
page ids in ascending order (a prefix sum of the kept flags: no sort) and the row's count. Ties at the
threshold go to the lower page ids. torch.topk sorts every row and needs a few more launches for the
counts; a decode step at 128K with a 4K-token budget spent ~35 us in it on an H100.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch
import triton
import triton.language as tl

from .._triton import INTERPRETED, order_key, radix_pick  # noqa: F401  (importing it applies the interpreter fix)
from ..kvcache import PagedKVCache, budget_pages, window_pages
from ..layouts import PageSelection
from ..patterns import Param

__all__ = ["BUDGETS", "page_shares", "mark_pages", "top_pages", "full_budget", "sweep", "reads"]

BUDGETS = (Param("budget", int, 4096, 16, doc="tokens of cache each decode step reads (whole pages)"),
           Param("sink", int, 64, 0, doc="first tokens always read"),
           Param("window", int, 64, 0, doc="last tokens always read"))

_TOPK_BLOCK = 4096  # scores a program holds at once (a row of 4096 pages in registers: 128K tokens of 32-token pages)
_TOPK_WARPS = 8


def page_shares(cache: PagedKVCache, budget: int, sink: int, window: int) -> Tuple[int, int, int]:
    """(pages the budget buys, of them the sink's, of the rest the window's): the forced pages come first."""
    k = budget_pages(budget, cache.page_size, cache.max_pages)
    n_sink = min(-(-int(sink) // cache.page_size), k)
    return k, n_sink, min(window_pages(window, cache.page_size), k - n_sink)


def mark_pages(score: torch.Tensor, cache: PagedKVCache, n_sink: int, n_local: int) -> torch.Tensor:
    """score [B, H, max_pages] with each sequence's first n_sink and last n_local pages +inf and the pages
    past its length -inf."""
    n = cache.num_pages_of().long().view(-1, 1, 1)
    p = torch.arange(cache.max_pages, device=score.device).view(1, 1, -1)
    ok = p < n
    forced = ok & ((p < n_sink) | (p >= n - n_local))
    return torch.where(forced, float("inf"), torch.where(ok, score, float("-inf")))


@triton.jit
def _keys(row, offs, n):
    """int32 keys of row[offs] whose signed order is the scores' order (past n: below every score)."""
    key = order_key(tl.load(row + offs, mask=offs < n, other=float("-inf")))
    return tl.where(offs < n, key, -2147483648)


@triton.jit
def _top_pages_kernel(SCORES, SEQLENS, PAGES, COUNTS, n, H, k, page_size,
                      NBLK, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row = SCORES + r * n
    # Four radix passes, most significant byte first: `hi` the bytes chosen so far, k_rem how many keys
    # matching them are still to be taken (the keys above them are taken whole).
    k_rem = k
    hi = 0
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        hist = tl.zeros([256], tl.int32)
        for i in range(NBLK):
            offs = i * BLOCK + tl.arange(0, BLOCK)
            key = _keys(row, offs, n)
            if p == 0:
                hist += tl.histogram((key >> 24) + 128, 256)
            else:
                hist += tl.histogram((key >> shift) & 0xFF, 256, mask=(key >> (shift + 8)) == hi)
        hi, k_rem = radix_pick(hist, k_rem, hi, p == 0)
    # hi is now the k-th largest key: keep every key above it and the first k_rem equal to it, in order.
    out = PAGES + r * k
    taken = 0
    ties = 0
    for i in range(NBLK):
        offs = i * BLOCK + tl.arange(0, BLOCK)
        key = _keys(row, offs, n)
        tie = (key == hi).to(tl.int32)
        keep = ((key > hi) | ((tie != 0) & (ties + tl.cumsum(tie, 0) <= k_rem))).to(tl.int32)
        slot = taken + tl.cumsum(keep, 0) - 1
        tl.store(out + slot, offs.to(tl.int32), mask=(keep != 0) & (slot < k))
        taken += tl.sum(keep, 0)
        ties += tl.sum(tie, 0)
    filled = (tl.load(SEQLENS + r // H) + page_size - 1) // page_size
    tl.store(COUNTS + r, tl.minimum(filled, k).to(tl.int32))


def top_pages(scores: torch.Tensor, cache: PagedKVCache, k: int) -> PageSelection:
    """The k best pages per (sequence, kv head) of marked scores (float32 [B, H, max_pages], forced pages
    +inf, pages past the length -inf); a sequence with fewer pages reads all of them. On the GPU the pages
    come in ascending order with ties at the k-th score taken lowest page first; on the CPU in score order."""
    b, h, n = scores.shape
    if not (scores.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        pages = torch.topk(scores, k, dim=-1).indices.to(torch.int32)  # valid pages first (score > -inf)
        counts = cache.num_pages_of().clamp(max=k).view(-1, 1).expand(-1, h).contiguous()
        return PageSelection(pages, counts, cache.page_size)
    scores = scores.contiguous()
    pages = torch.empty(b, h, k, device=scores.device, dtype=torch.int32)
    counts = torch.empty(b, h, device=scores.device, dtype=torch.int32)
    block = min(_TOPK_BLOCK, triton.next_power_of_2(n))
    _top_pages_kernel[(b * h,)](scores, cache.seqlens, pages, counts, n, h, k, cache.page_size,
                                triton.cdiv(n, block), BLOCK=block, num_warps=_TOPK_WARPS)
    return PageSelection(pages, counts, cache.page_size)


def reads(page_size: int, *, budget: int, **_) -> int:
    """The most tokens a step reads: the budget's whole pages (sink and window come out of it)."""
    return max(1, int(budget) // page_size) * page_size


def full_budget(seqlen_q: int, seqlen_k: int, block_size: int):
    """A budget past the context reads every page: dense."""
    return {"budget": seqlen_k + 64, "sink": 0, "window": 0}


def sweep(seqlen: int, block_size: int):
    return [{"budget": b, "sink": 64, "window": 64} for b in (256 << i for i in range(32)) if b < seqlen]
