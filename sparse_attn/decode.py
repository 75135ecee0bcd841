"""Sparse decode for callers that hold a contiguous [B, Hkv, S, D] cache (Hugging Face's): one query per
sequence against the cache read in place as pages, the pages chosen by a decode pattern's `select`.

A `DecodeState` per layer keeps that layer's page summaries between steps (patterns that score pages read
them): built once over the whole cache on the first sparse step after a prefill, then only the pages that
new tokens landed in are recomputed (one small launch per step). A cache that shrank, changed batch or
outgrew the summaries' capacity is summarized anew.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from .kvcache import PagedKVCache, PageSummaries, consecutive_table, contiguous_pages
from .layouts import PageSelection
from .ops.paged_decode import paged_decode_attention
from .patterns import get_pattern

__all__ = ["DecodeState", "decode_step", "sparse_decode_from", "DECODE_MIN_RATIO"]

# A sparse step pays for its selection (page scores over the whole cache, a top-k, more launches) on top of
# what it reads; where it would read half the cache or more, a dense step is cheaper.
DECODE_MIN_RATIO = 2


@dataclass
class DecodeState:
    """One layer's decode state: its page summaries and the cache length they cover."""

    summaries: Optional[PageSummaries] = None
    tokens: int = 0
    table: Optional[torch.Tensor] = None  # the consecutive page table of the latest view

    def reset(self) -> None:
        self.summaries, self.tokens, self.table = None, 0, None

    def view(self, k: torch.Tensor, v: torch.Tensor, page_size: int) -> PagedKVCache:
        """k, v [B, Hkv, S, D] as pages, the page table reused while the cache stays within its pages."""
        b, pages = k.shape[0], contiguous_pages(k.shape[2], page_size)
        t = self.table
        if t is None or tuple(t.shape) != (b, pages) or t.device != k.device:
            t = self.table = consecutive_table(b, pages, k.device)
        return PagedKVCache.from_contiguous(k, v, page_size=page_size, validate=False, page_table=t)

    def summaries_for(self, cache: PagedKVCache) -> PageSummaries:
        """Summaries of every page of `cache` (a contiguous cache, all sequences of its full length),
        recomputing only the pages past what the state already covers."""
        s, ps = cache.k.shape[2], cache.page_size
        old = self.summaries
        fresh = (old is None or s < self.tokens or old.table.shape[0] != cache.batch or old.page_size != ps
                 or old.kmin.dtype != cache.k.dtype or old.kmin.device != cache.k.device
                 or old.kmin.shape[1:] != (cache.num_kv_heads, cache.head_dim) or cache.max_pages > old.max_pages)
        if fresh:
            # Room for the cache to double before the summaries move (generation appends a token a step).
            self.summaries = PageSummaries.build(cache, capacity_pages=2 * cache.max_pages)
        elif s > self.tokens:
            first = self.tokens // ps
            self.summaries.update(cache, first, -(-s // ps) - first)
        self.tokens = s
        return self.summaries


def sparse_decode_from(pattern: str, budgets: Dict[str, Any], min_seqlen: int) -> int:
    """Cached tokens from which decode steps of `pattern` under `budgets` run sparse on a contiguous cache:
    min_seqlen, or DECODE_MIN_RATIO times the tokens a step reads where the pattern says (Pattern.decode_reads)."""
    p = get_pattern(pattern)
    if p.decode_reads is None:
        return int(min_seqlen)
    return max(int(min_seqlen), DECODE_MIN_RATIO * int(p.decode_reads(p.decode_page_size, **budgets)))


def decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: str, budgets: Dict[str, Any], *,
                scale: Optional[float] = None, state: Optional[DecodeState] = None
                ) -> Tuple[torch.Tensor, PageSelection, PagedKVCache]:
    """Attention of q [B, Hq, 1, D] over the pages `pattern` selects from k, v [B, Hkv, S, D] (every sequence
    S tokens). budgets: the pattern's budgets and options. Without a state, summaries are built over the
    whole cache for this call alone (correct, but as costly as dense). Returns (out [B, Hq, 1, D], the
    selection, the paged view)."""
    p = get_pattern(pattern)
    if not p.decode:
        raise ValueError(f"pattern: {pattern!r} has no decode side")
    state = state or DecodeState()
    cache = state.view(k, v, p.decode_page_size)
    summaries = state.summaries_for(cache) if p.summaries else None
    selection = p.select(q[:, :, 0], cache, summaries, scale=scale, **budgets)
    out = paged_decode_attention(q, cache, selection, scale=scale)
    return out, selection, cache
