"""What the page-ranking decode patterns share: a token budget split into forced pages (the first `sink`
and the last `window` tokens) and ranked ones, the forced / past-the-end marks on a score tensor, the
top-k into a PageSelection, and their registry budgets. A pattern brings only its page scores."""
from __future__ import annotations

from typing import Tuple

import torch

from ..kvcache import PagedKVCache, budget_pages, window_pages
from ..layouts import PageSelection
from ..patterns import Param

__all__ = ["BUDGETS", "page_shares", "mark_pages", "top_pages", "full_budget", "sweep"]

BUDGETS = (Param("budget", int, 4096, 16, doc="tokens of cache each decode step reads (whole pages)"),
           Param("sink", int, 64, 0, doc="first tokens always read"),
           Param("window", int, 64, 0, doc="last tokens always read"))


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


def top_pages(scores: torch.Tensor, cache: PagedKVCache, k: int) -> PageSelection:
    """The k best pages per (sequence, kv head) of marked scores; a sequence with fewer pages reads all."""
    pages = torch.topk(scores, k, dim=-1).indices.to(torch.int32)  # valid pages first (score > -inf)
    counts = cache.num_pages_of().clamp(max=k).view(-1, 1).expand(-1, cache.num_kv_heads).contiguous()
    return PageSelection(pages, counts, cache.page_size)


def full_budget(seqlen_q: int, seqlen_k: int, block_size: int):
    """A budget past the context reads every page: dense."""
    return {"budget": seqlen_k + 64, "sink": 0, "window": 0}


def sweep(seqlen: int, block_size: int):
    return [{"budget": b, "sink": 64, "window": 64} for b in (256 << i for i in range(32)) if b < seqlen]
