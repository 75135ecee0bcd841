"""Decode attention over a paged KV cache: one query per sequence against the pages a PageSelection lists
(or every page: the dense paged baseline), split-K with a combine step; and the page-summary kernel.

    out = paged_decode_attention(q, cache)                     # q [B, Hq, D] (or [B, Hq, 1, D]): dense
    out = paged_decode_attention(q, cache, selection)          # only the selected pages

Static shapes and no host sync: a decode step built from these calls can be captured in a CUDA graph.
Runs on CUDA tensors, or on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1); elsewhere
the fp32 reference (`reference_decode`), with one warning.
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch
import triton

from ..._checks import FLOAT_DTYPES, check_tensor, warn_once
from ...kvcache import PagedKVCache, PageSummaries
from ...layouts import PageSelection
from . import kernel as _kernel

__all__ = ["paged_decode_attention", "dense_selection", "summarize", "reference_decode", "not_supported_reasons",
           "head_density", "HEAD_DIMS"]

HEAD_DIMS = (16, 32, 64, 128, 256)
_MAX_SPLITS = 128
_PROGRAMS_PER_SM = 16
_MIN_SPLIT_KEYS = 512  # fewer keys per split cost more in per-program and combine overhead than they hide
_BLOCK_N = 64  # keys per step (at least one page)
_WARPS, _STAGES = 4, 2


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def not_supported_reasons(q: torch.Tensor, cache: PagedKVCache) -> List[str]:
    reasons = []
    if not (q.is_cuda or _interpreted()):
        reasons.append(f"device {q.device}: the kernels need CUDA (or TRITON_INTERPRET=1 on CPU)")
    if cache.head_dim not in HEAD_DIMS:
        reasons.append(f"head_dim {cache.head_dim}: the kernels take {HEAD_DIMS}")
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        reasons.append("bfloat16 on the Triton interpreter (its bf16 dot is unreliable)")
    return reasons


def dense_selection(cache: PagedKVCache) -> PageSelection:
    """Every page of every sequence (shared by all kv heads): the dense paged baseline."""
    pages = torch.arange(cache.max_pages, device=cache.k.device, dtype=torch.int32).view(1, 1, -1)
    counts = cache.num_pages_of().view(-1, 1)
    return PageSelection(pages.expand(cache.batch, 1, -1), counts, cache.page_size)


def _check(q: torch.Tensor, cache: PagedKVCache, selection: Optional[PageSelection]) -> torch.Tensor:
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache: expected a PagedKVCache, got {type(cache).__name__}")
    check_tensor("q", q, ndim=(3, 4), dtypes=FLOAT_DTYPES, device=cache.k.device)
    if q.dim() == 4:
        if q.shape[2] != 1:
            raise ValueError(f"q: expected one query per sequence ([B, Hq, 1, D]), got {tuple(q.shape)}")
        q = q[:, :, 0]
    b, hq, d = q.shape
    if q.dtype != cache.k.dtype:
        raise TypeError(f"q: expected the cache's dtype {cache.k.dtype}, got {q.dtype}")
    if b != cache.batch or d != cache.head_dim or hq % cache.num_kv_heads:
        raise ValueError(f"q: expected [{cache.batch}, a multiple of {cache.num_kv_heads} heads, {cache.head_dim}] "
                         f"(the cache's batch, kv heads and head dim), got {tuple(q.shape)}")
    if selection is not None:
        if not isinstance(selection, PageSelection):
            raise TypeError(f"selection: expected a PageSelection, got {type(selection).__name__}")
        if selection.page_size != cache.page_size:
            raise ValueError(f"selection: page_size {selection.page_size} differs from the cache's {cache.page_size}")
        sb, sh = selection.counts.shape
        if sb != b or sh not in (1, cache.num_kv_heads) or selection.pages.device != q.device:
            raise ValueError(f"selection: expected counts [{b}, 1 or {cache.num_kv_heads}] on {q.device}, got "
                             f"{(sb, sh)} on {selection.pages.device}")
    return q


def paged_decode_attention(q: torch.Tensor, cache: PagedKVCache, selection: Optional[PageSelection] = None, *,
                           scale: Optional[float] = None, num_splits: Optional[int] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over the selected pages (every page without a selection) of each sequence.
    q [B, Hq, D] or [B, Hq, 1, D] (Hq a multiple of the cache's kv heads); returns q's shape and dtype.
    A sequence with no token to read gets 0. num_splits: splits per (sequence, kv head) (default: enough
    programs to fill the GPU), for benchmarks."""
    q_in = q
    q = _check(q, cache, selection)
    selection = dense_selection(cache) if selection is None else selection
    scale = cache.head_dim ** -0.5 if scale is None else float(scale)
    reasons = not_supported_reasons(q, cache)
    if reasons:
        warn_once("paged_decode:" + reasons[0], "paged_decode_attention: using the reference (slow): "
                  + "; ".join(reasons))
        return reference_decode(q, cache, selection, scale=scale).view_as(q_in)
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    group = hq // hkv
    gp = max(16, triton.next_power_of_2(group))
    ps = cache.page_size
    bn = max(ps, _BLOCK_N)
    width = selection.width
    steps = max(1, triton.cdiv(width, bn // ps))
    if num_splits is None:
        n_sm = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
        num_splits = triton.cdiv(_PROGRAMS_PER_SM * n_sm, b * hkv)
        num_splits = min(num_splits, max(1, steps * bn // _MIN_SPLIT_KEYS))
    splits = max(1, min(int(num_splits), steps, _MAX_SPLITS))
    per_split = triton.cdiv(steps, splits) * (bn // ps)
    splits = triton.cdiv(width, per_split) if width else 1
    m, l_s, o, out = _outputs(q, b * hkv * splits * group)
    pages, counts = selection.pages, selection.counts
    s_ph = pages.stride(1) if pages.shape[1] > 1 else 0
    s_ch = counts.stride(1) if counts.shape[1] > 1 else 0
    prec = "ieee" if q.dtype == torch.float32 else None
    _kernel._decode_kernel[(b * hkv, splits)](
        q, cache.k, cache.v, cache.page_table, pages, counts, cache.seqlens, m, l_s, o,
        *q.stride(), *cache.addressing(cache.k), *cache.addressing(cache.v),
        *cache.page_table.stride(), pages.stride(0), s_ph, pages.stride(2), counts.stride(0), s_ch,
        cache.num_pages, hkv, splits, per_split, scale * 1.4426950408889634,
        G=group, GP=gp, D=d, PS=ps, BN=bn, PREC=prec, num_warps=_WARPS, num_stages=_STAGES)
    _kernel._combine_kernel[(b * hq,)](m, l_s, o, out, *out.stride(), hkv, splits, G=group, D=d,
                                        NSC=min(32, max(2, triton.next_power_of_2(splits))), num_warps=4)
    return out.view_as(q_in)


def _outputs(q: torch.Tensor, rows: int):
    """The splits' running max, sum and output (float32, `rows` of them) and the output; the kernels write
    every element (tests poison these)."""
    m = torch.empty(rows, device=q.device, dtype=torch.float32)
    return m, torch.empty_like(m), torch.empty(rows, q.shape[-1], device=q.device, dtype=torch.float32), \
        torch.empty_like(q)


def summarize(cache: PagedKVCache, summaries: PageSummaries, first_page: torch.Tensor, num_pages: int) -> None:
    """Min / max / mean of the keys of `num_pages` logical pages per sequence from first_page (int32 [B]), into
    `summaries` (see PageSummaries.update). Torch on devices the kernel cannot run on."""
    b, hkv, d = cache.batch, cache.num_kv_heads, cache.head_dim
    if not (cache.k.is_cuda or _interpreted()) or d not in HEAD_DIMS:
        _summarize_torch(cache, summaries, first_page, num_pages)
        return
    _kernel._summarize_kernel[(b * hkv, num_pages)](
        cache.k, cache.page_table, summaries.table, cache.seqlens, first_page, summaries.kmin, summaries.kmax,
        summaries.kmin if summaries.kmean is None else summaries.kmean,
        *cache.addressing(cache.k), *cache.page_table.stride(), *summaries.table.stride(),
        *summaries.kmin.stride(), cache.num_pages, cache.max_pages, hkv, D=d, PS=cache.page_size,
        MEAN=summaries.kmean is not None, num_warps=2)


def _summarize_torch(cache: PagedKVCache, summaries: PageSummaries, first_page: torch.Tensor, num_pages: int):
    for b in range(cache.batch):
        k, _ = cache.gather(b)  # [Hkv, n, D]
        n = k.shape[1]
        for p in range(int(first_page[b]), int(first_page[b]) + num_pages):
            if p < 0 or p >= cache.max_pages or p * cache.page_size >= n:
                continue
            part = k[:, p * cache.page_size: (p + 1) * cache.page_size]
            slot = int(summaries.table[b, p])
            summaries.kmin[slot] = part.amin(1)
            summaries.kmax[slot] = part.amax(1)
            if summaries.kmean is not None:
                summaries.kmean[slot] = part.float().mean(1).to(summaries.kmean.dtype)


def reference_decode(q: torch.Tensor, cache: PagedKVCache, selection: Optional[PageSelection] = None, *,
                     scale: Optional[float] = None) -> torch.Tensor:
    """The fp32 reference: per sequence, softmax over exactly the selected tokens. q [B, Hq, D]."""
    q = _check(q, cache, selection)
    selection = dense_selection(cache) if selection is None else selection
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    scale = d ** -0.5 if scale is None else float(scale)
    out = torch.zeros_like(q)
    for bi in range(b):
        k, v = cache.gather(bi)
        n = k.shape[1]
        mask = selection.token_mask(cache.seqlens, max(n, 1))[bi, :, :n].to(q.device)  # [1 or Hkv, n]
        mask = mask.expand(hkv, n).repeat_interleave(hq // hkv, 0)
        kq = k.float().repeat_interleave(hq // hkv, 0)
        vq = v.float().repeat_interleave(hq // hkv, 0)
        s = torch.einsum("hd,hnd->hn", q[bi].float(), kq) * scale
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        out[bi] = torch.einsum("hn,hnd->hd", p, vq).to(q.dtype)
    return out


def head_density(selection: PageSelection, seqlens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """float64 [num_heads]: per query head, the mean over sequences of the tokens the selection reads over the
    sequence's length (query head i reads its kv head i // (num_heads / H)'s pages). One launch, no host sync
    (a decode step's stats); the torch composition elsewhere."""
    b, h, k = selection.pages.shape
    if num_heads % h:
        raise ValueError(f"num_heads: expected a multiple of the selection's {h} kv heads, got {num_heads}")
    check_tensor("seqlens", seqlens, ndim=1, dtypes=(torch.int32, torch.int64), device=selection.pages.device)
    if seqlens.shape[0] != b:
        raise ValueError(f"seqlens: expected {b} lengths (the selection's batch), got {seqlens.shape[0]}")
    if not (selection.pages.is_cuda or _interpreted()):
        return selection.density(seqlens).repeat_interleave(num_heads // h, 1).mean(0)
    out = torch.empty(num_heads, dtype=torch.float64, device=selection.pages.device)
    pages, counts = selection.pages, selection.counts
    _kernel._density_kernel[(num_heads,)](
        pages, counts, seqlens, out, b, k, *pages.stride(), *counts.stride(), num_heads // h,
        PS=selection.page_size, SHARED=h == 1, BLOCK=min(256, triton.next_power_of_2(max(k, 16))))
    return out
