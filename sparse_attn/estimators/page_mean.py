"""Page-mean decode selection: rank every page of the cache by the attention its mean key draws, and read
only the best pages.

Per query head h and page p the logit is scale * q_h . mean_p (mean_p: the element-wise mean of the page's
keys, kept in the page summaries beside Quest's min / max). Each head's logits become its share of
attention by a softmax over the sequence's pages, and a page scores the sum of its shares over the query
heads of the GQA group: one selection serves the group (each page is read once), and no head decides alone
because its logits run larger. Where Quest's min / max bound favours pages whose keys merely spread wide,
the mean ranks pages by what they hold on average; on SmolLM2 at a 1K-token budget it kept the pass keys
that the bound lost (bench/RESULTS.md). One fused Triton kernel writes every (sequence, kv head, query
head, page) logit with each block's softmax partials (max, sum of exponentials), a second one the pages'
shares summed over the group, then the package's page top-k: three launches, no host sync.
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
def _logits_kernel(Q, KMEAN, STABLE, SEQLENS, OUT, PART, s_qb, s_qh, s_qd, s_mp, s_mh, s_md, s_sb, s_sp,
                   max_pages, Hkv, scale, n_blocks,
                   G: tl.constexpr, D: tl.constexpr, PS: tl.constexpr, BP: tl.constexpr):
    """Logits of BP pages for the G query heads of one kv head, and per head the block's max logit and its
    sum of exp(logit - max) (PART [B, Hkv, G, n_blocks, 2]) for the softmax over the sequence's pages."""
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    p = blk * BP + tl.arange(0, BP)
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
        m = tl.max(logit, 0)
        total = tl.sum(tl.where(ok, tl.exp(logit - tl.where(ok, m, 0.0)), 0.0), 0)  # no -inf - -inf
        part = PART + ((bh * G + g) * n_blocks + blk) * 2
        tl.store(part, m)
        tl.store(part + 1, total)


@triton.jit
def _shares_kernel(LOGITS, PART, SEQLENS, OUT, max_pages, Hkv, n_blocks, n_sink, n_local,
                   G: tl.constexpr, PS: tl.constexpr, BP: tl.constexpr, NB: tl.constexpr):
    """Per page of BP: its softmax share per query head (the softmax over the sequence's pages, from the
    blocks' partial maxima and sums) summed over the G heads; forced pages +inf, pages past the length -inf."""
    bh = tl.program_id(0)
    p = tl.program_id(1) * BP + tl.arange(0, BP)
    blocks = tl.arange(0, NB)
    score = tl.zeros([BP], tl.float32)
    for g in tl.static_range(G):
        part = PART + ((bh * G + g) * n_blocks + blocks) * 2
        m_blk = tl.load(part, mask=blocks < n_blocks, other=float("-inf"))
        l_blk = tl.load(part + 1, mask=blocks < n_blocks, other=0.0)
        live = m_blk > float("-inf")
        m = tl.max(m_blk, 0)
        m = tl.where(m > float("-inf"), m, 0.0)  # a sequence without pages: every logit -inf
        l = tl.sum(tl.where(live, l_blk * tl.exp(tl.where(live, m_blk, m) - m), 0.0), 0)
        logit = tl.load(LOGITS + (bh * G + g) * max_pages + p, mask=p < max_pages, other=float("-inf"))
        score += tl.exp(logit - m) / tl.maximum(l, 1e-30)
    n = (tl.load(SEQLENS + bh // Hkv) + PS - 1) // PS
    ok = p < n
    forced = ok & ((p < n_sink) | (p >= n - n_local))
    score = tl.where(forced, float("inf"), tl.where(ok, score, float("-inf")))
    tl.store(OUT + bh * max_pages + p, score, mask=p < max_pages)


def _logits_torch(q, cache: PagedKVCache, summaries: PageSummaries, scale: float) -> torch.Tensor:
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    slots = summaries.table[:, : cache.max_pages].long()
    mean = summaries.kmean[slots].float()  # [B, P, Hkv, D]
    logits = torch.einsum("bphd,bhgd->bhgp", mean, q.float().view(b, hkv, hq // hkv, d)) * scale
    p = torch.arange(cache.max_pages, device=q.device).view(1, 1, 1, -1)
    return torch.where(p < cache.num_pages_of().long().view(-1, 1, 1, 1), logits, float("-inf"))


def _check(q, cache: PagedKVCache, summaries: PageSummaries) -> None:
    if q.dim() != 3 or q.shape[0] != cache.batch or q.shape[2] != cache.head_dim or \
            q.shape[1] % cache.num_kv_heads:
        raise ValueError(f"q: expected [batch={cache.batch}, a multiple of {cache.num_kv_heads} heads, "
                         f"head_dim={cache.head_dim}], got {tuple(q.shape)}")
    if summaries.kmean is None:
        raise ValueError("summaries: made without key means (kmean is None); build them with PageSummaries.build")
    if summaries.page_size != cache.page_size:
        raise ValueError(f"summaries: page_size {summaries.page_size} differs from the cache's {cache.page_size}")


def _on_kernels(q) -> bool:
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _launch_logits(q, cache: PagedKVCache, summaries: PageSummaries, scale: float):
    """(logits [B, Hkv, G, max_pages], per-block softmax partials [B, Hkv, G, blocks, 2], blocks)."""
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    n_blocks = triton.cdiv(cache.max_pages, _BLOCK_PAGES)
    out = torch.empty(b, hkv, g, cache.max_pages, device=q.device, dtype=torch.float32)
    part = torch.empty(b, hkv, g, n_blocks, 2, device=q.device, dtype=torch.float32)
    _logits_kernel[(b * hkv, n_blocks)](
        q, summaries.kmean, summaries.table, cache.seqlens, out, part, *q.stride(), *summaries.kmean.stride(),
        *summaries.table.stride(), cache.max_pages, hkv, scale, n_blocks,
        G=g, D=d, PS=cache.page_size, BP=_BLOCK_PAGES, num_warps=4)
    return out, part, n_blocks


def page_mean_logits(q: torch.Tensor, cache: PagedKVCache, summaries: PageSummaries, *,
                     scale: Optional[float] = None) -> torch.Tensor:
    """float32 [B, Hkv, G, max_pages]: scale * q . (the page's mean key) per query head (G per kv head) and
    page; -inf for pages past the sequence's length. q [B, Hq, D]; scale defaults to D ** -0.5."""
    _check(q, cache, summaries)
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    if not _on_kernels(q):
        return _logits_torch(q, cache, summaries, scale)
    return _launch_logits(q, cache, summaries, scale)[0]


def page_mean_scores(q: torch.Tensor, cache: PagedKVCache, summaries: PageSummaries, *, n_sink: int = 1,
                     n_local: int = 1, scale: Optional[float] = None) -> torch.Tensor:
    """float32 [B, Hkv, max_pages]: each page's share of attention by its mean key (a softmax of
    page_mean_logits over the sequence's pages, per query head), summed over the kv head's query heads;
    the first n_sink and last n_local pages of each sequence +inf, pages past its length -inf. On the GPU
    two launches: the logits with each block's softmax partials, then the shares from them."""
    _check(q, cache, summaries)
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    if not _on_kernels(q):
        return mark_pages(_logits_torch(q, cache, summaries, scale).softmax(-1).sum(2), cache, n_sink, n_local)
    logits, part, n_blocks = _launch_logits(q, cache, summaries, scale)
    b, hkv, g, n = logits.shape
    out = torch.empty(b, hkv, n, device=q.device, dtype=torch.float32)
    _shares_kernel[(b * hkv, n_blocks)](logits, part, cache.seqlens, out, n, hkv, n_blocks, n_sink, n_local,
                                        G=g, PS=cache.page_size, BP=_BLOCK_PAGES,
                                        NB=triton.next_power_of_2(n_blocks), num_warps=4)
    return out


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
    decode_reads=_pages.reads,
    sweep=_pages.sweep,
    color="tab:cyan",
))
