"""Page-mean decode selection: rank every page of the cache by the attention its mean key draws, and read
only the best pages.

Per query head h and page p the logit is scale * q_h . mean_p (mean_p: the element-wise mean of the page's
keys, kept in the page summaries beside Quest's min / max). Each head's logits become its share of
attention by a softmax over the sequence's pages, and a page scores the sum of its shares over the query
heads of the GQA group: one selection serves the group (each page is read once), and no head decides alone
because its logits run larger. Where Quest's min / max bound favours pages whose keys merely spread wide,
the mean ranks pages by what they hold on average; on SmolLM2 at a 1K-token budget it kept the pass keys
that the bound lost (bench/RESULTS.md). One fused Triton kernel writes every (sequence, kv head, query
head, page) logit; the softmax, the group sum and the top-k are a few tensor ops on the GPU (no host sync).
The first `sink` and the last `window` tokens' pages are always kept; the budget counts tokens (whole pages).
"""
from __future__ import annotations

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

__all__ = ["page_mean_logits", "page_mean_scores", "page_mean_select", "PATTERN"]

_BLOCK_PAGES = 64


@triton.jit
def _logits_kernel(Q, KMEAN, STABLE, SEQLENS, OUT, s_qb, s_qh, s_qd, s_mp, s_mh, s_md, s_sb, s_sp,
                   max_pages, Hkv, scale,
                   G: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, BP: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    p = tl.program_id(1) * BP + tl.arange(0, BP)
    d = tl.arange(0, D)
    n = (tl.load(SEQLENS + b) + PS - 1) // PS
    ok = p < n
    slot = tl.load(STABLE + b * s_sb + p.to(tl.int64) * s_sp, mask=ok, other=0).to(tl.int64)
    mean = tl.load(KMEAN + slot[:, None] * s_mp + h * s_mh + d[None, :] * s_md, mask=ok[:, None],
                   other=0.0).to(tl.float32)
    for g in tl.static_range(G):
        q = tl.load(Q + b * s_qb + (h * G + g) * s_qh + d * s_qd).to(tl.float32)
        logit = tl.where(ok, tl.sum(mean * q[None, :], 1) * scale, float("-inf"))
        tl.store(OUT + (bh * G + g) * max_pages + p, logit, mask=p < max_pages)


def _logits_torch(q, cache: PagedKVCache, summaries: PageSummaries, scale: float) -> torch.Tensor:
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    slots = summaries.table[:, : cache.max_pages].long()
    mean = summaries.kmean[slots].float()  # [B, P, Hkv, D]
    logits = torch.einsum("bphd,bhgd->bhgp", mean, q.float().view(b, hkv, hq // hkv, d)) * scale
    p = torch.arange(cache.max_pages, device=q.device).view(1, 1, 1, -1)
    return torch.where(p < cache.num_pages_of().long().view(-1, 1, 1, 1), logits, float("-inf"))


def page_mean_logits(q: torch.Tensor, cache: PagedKVCache, summaries: PageSummaries, *,
                     scale: Optional[float] = None) -> torch.Tensor:
    """float32 [B, Hkv, G, max_pages]: scale * q . (the page's mean key) per query head (G per kv head) and
    page; -inf for pages past the sequence's length. q [B, Hq, D]; scale defaults to D ** -0.5."""
    if q.dim() != 3 or q.shape[0] != cache.batch or q.shape[2] != cache.head_dim or \
            q.shape[1] % cache.num_kv_heads:
        raise ValueError(f"q: expected [batch={cache.batch}, a multiple of {cache.num_kv_heads} heads, "
                         f"head_dim={cache.head_dim}], got {tuple(q.shape)}")
    if summaries.kmean is None:
        raise ValueError("summaries: made without key means (kmean is None); build them with PageSummaries.build")
    if summaries.page_size != cache.page_size:
        raise ValueError(f"summaries: page_size {summaries.page_size} differs from the cache's {cache.page_size}")
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    scale = d ** -0.5 if scale is None else float(scale)
    if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return _logits_torch(q, cache, summaries, scale)
    g = hq // hkv
    out = torch.empty(b, hkv, g, cache.max_pages, device=q.device, dtype=torch.float32)
    _logits_kernel[(b * hkv, triton.cdiv(cache.max_pages, _BLOCK_PAGES))](
        q, summaries.kmean, summaries.table, cache.seqlens, out, *q.stride(), *summaries.kmean.stride(),
        *summaries.table.stride(), cache.max_pages, hkv, scale,
        G=g, D=d, PS=cache.page_size, BP=_BLOCK_PAGES, num_warps=4)
    return out


def page_mean_scores(q: torch.Tensor, cache: PagedKVCache, summaries: PageSummaries, *, n_sink: int = 1,
                     n_local: int = 1, scale: Optional[float] = None) -> torch.Tensor:
    """float32 [B, Hkv, max_pages]: each page's share of attention by its mean key (a softmax of
    page_mean_logits over the sequence's pages, per query head), summed over the kv head's query heads;
    the first n_sink and last n_local pages of each sequence +inf, pages past its length -inf."""
    score = page_mean_logits(q, cache, summaries, scale=scale).softmax(-1).sum(2)
    return mark_pages(score, cache, n_sink, n_local)


def page_mean_select(q: torch.Tensor, cache: PagedKVCache, summaries: PageSummaries, *, budget: int,
                     sink: int = 0, window: int = 1, scale: Optional[float] = None) -> PageSelection:
    """Per (sequence, kv head) the budget // page_size best pages by page_mean_scores, the pages of the
    first `sink` and the last `window` tokens always among them (their share of the budget first). A
    sequence with fewer pages than that reads all of its pages. q [B, Hq, D] (or [B, Hq, 1, D]); scale: the
    attention's softmax scale (default D ** -0.5)."""
    if q.dim() == 4:
        q = q[:, :, 0]
    k, n_sink, n_local = page_shares(cache, budget, sink, window)
    return top_pages(page_mean_scores(q, cache, summaries, n_sink=n_sink, n_local=n_local, scale=scale), cache, k)


PATTERN = register_pattern(Pattern(
    name="page_mean",
    summary="Page-mean decode: pages ranked by the attention share their mean key draws per query head, "
            "summed over the GQA group, top pages up to a token budget (prefill dense)",
    budgets=_pages.BUDGETS,
    select=page_mean_select,
    summaries=True,
    decode_page_size=32,
    full_budget=_pages.full_budget,
    sweep=_pages.sweep,
    color="tab:cyan",
))
