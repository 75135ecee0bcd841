"""A-shape (StreamingLLM) pattern: the first `sink` tokens plus a local `window`, no estimation.

Built at block granularity: each query block keeps the key blocks that hold the sink tokens and the
key blocks that any of its rows' windows touch. The same rule serves decode (one query against a long
cache): the single query block keeps the sink blocks and the blocks of the last `window` keys.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Union

import torch

from .._checks import check_positive_int
from ..layouts import BlockLayout
from ..patterns import Param, Pattern, register_pattern

__all__ = ["a_shape_layout", "a_shape_pages", "per_head", "PATTERN"]

PerHead = Union[int, Sequence[int], torch.Tensor]


def per_head(name: str, value: PerHead, num_heads: int, *, minimum: int) -> torch.Tensor:
    """An int or one int per head -> int64 tensor [num_heads]; values below `minimum` are refused."""
    t = torch.as_tensor(value, dtype=torch.int64).flatten().cpu()
    if t.numel() == 1:
        t = t.expand(num_heads)
    if t.numel() != num_heads:
        raise ValueError(f"{name}: expected an int or {num_heads} values (one per head), got {t.numel()}")
    if (t < minimum).any():
        raise ValueError(f"{name}: expected values >= {minimum}, got {t.tolist()}")
    return t.clone()


def a_shape_layout(
    batch: int,
    num_heads: int,
    seqlen_q: int,
    seqlen_k: int,
    *,
    sink: PerHead = 128,
    window: PerHead = 1024,
    block_size: int = 64,
    device=None,
) -> BlockLayout:
    """Sink + local-window BlockLayout, bottom-right causal (query i sees keys j <= i + seqlen_k - seqlen_q).

    sink: leading tokens every query keeps (>= 0; rounded up to whole key blocks).
    window: keys ending at each query's own position that it keeps (>= 1; the blocks covering them).
    Both may be given per head (a sequence or tensor of num_heads values).
    """
    for name, value in (("batch", batch), ("num_heads", num_heads), ("seqlen_q", seqlen_q),
                        ("seqlen_k", seqlen_k), ("block_size", block_size)):
        check_positive_int(name, value)
    bs = block_size
    device = torch.device("cpu") if device is None else torch.device(device)
    sink_cpu = per_head("sink", sink, num_heads, minimum=0)
    window_cpu = per_head("window", window, num_heads, minimum=1)
    nq, nk = -(-seqlen_q // bs), -(-seqlen_k // bs)
    # Widths from the CPU copies (no device sync): a block's rows span window + bs - 1 keys at most.
    ns_max = int((-(-sink_cpu // bs)).clamp(max=nk).max())
    width_w = min(nk, int(-(-(window_cpu.max() + bs - 1) // bs)) + 1)
    window_t = window_cpu.to(device)
    n_sink = (-(-sink_cpu.to(device) // bs)).clamp(max=nk)  # [H]
    off = seqlen_k - seqlen_q
    q0 = torch.arange(nq, dtype=torch.int64, device=device) * bs
    q1 = (q0 + bs).clamp(max=seqlen_q)
    last = q1 - 1 + off  # last key any row of the block may see
    last_blk = torch.div(last, bs, rounding_mode="floor").clamp(max=nk - 1)  # -1 when the block sees nothing
    first_key = q0[None] + off - window_t[:, None] + 1  # [H, nq]
    first_blk = torch.div(first_key.clamp(min=0), bs, rounding_mode="floor")
    sink_ids = torch.arange(ns_max, device=device).expand(num_heads, nq, ns_max)
    sink_ok = (sink_ids < n_sink[:, None, None]) & (sink_ids <= last_blk[None, :, None])
    win_ids = first_blk[..., None] + torch.arange(width_w, device=device)
    # Window blocks that are also sink blocks are listed once, as sink blocks.
    win_ok = (win_ids <= last_blk[None, :, None]) & (win_ids >= n_sink[:, None, None])
    ids = torch.cat([torch.where(sink_ok, sink_ids, nk), torch.where(win_ok, win_ids, nk)], dim=-1)
    ids = ids.sort(dim=-1).values
    counts = (ids < nk).sum(-1, dtype=torch.int32)
    ids = torch.where(ids < nk, ids, -1).to(torch.int32)
    counts = counts.expand(batch, -1, -1).contiguous()
    ids = ids.expand(batch, -1, -1, -1).contiguous()
    return BlockLayout(counts, ids, bs, bs, seqlen_q, seqlen_k, validate=False)


def a_shape_pages(cache, *, sink: int = 128, window: int = 1024) -> "PageSelection":
    """Decode's A-shape: per sequence the pages holding its first `sink` tokens and its last `window` tokens
    (whole pages), shared by every kv head; no scoring, no host sync (static width). A sequence shorter
    than that reads all of its pages."""
    from ..kvcache import window_pages
    from ..layouts import PageSelection

    ps = cache.page_size
    n_sink = -(-int(sink) // ps)
    n_local = window_pages(max(1, int(window)), ps)
    width = min(n_sink + n_local, cache.max_pages)
    n = cache.num_pages_of().long().view(-1, 1)  # [B, 1]
    j = torch.arange(width, device=cache.k.device).view(1, -1)
    # Fewer pages than the width: all of them, in order; else the sink pages, then the last n_local.
    pages = torch.where((n <= width) | (j < n_sink), j, n - width + j)
    counts = n.clamp(max=width).to(torch.int32)
    return PageSelection(pages.to(torch.int32).unsqueeze(1), counts, ps)


def _decode_reads(page_size: int, *, sink: int, window: int) -> int:
    """Tokens a decode step reads at most: the sink's pages and the pages the window can straddle."""
    from ..kvcache import window_pages

    return (-(-int(sink) // page_size) + window_pages(max(1, int(window)), page_size)) * page_size


def _powers(low: int, high: int) -> List[int]:
    return [low << i for i in range(64) if low << i <= high]


def _build(estimate, q, k, budgets, *, causal: bool, block_size: int) -> BlockLayout:
    b, h, sq = q.shape[:3]
    return a_shape_layout(b, h, sq, k.shape[2], sink=budgets["sink"], window=budgets["window"],
                          block_size=block_size, device=q.device)


def _windows(seqlen: int, block_size: int) -> List[Dict[str, int]]:
    """One sink block and windows 64 .. seqlen / 4 (powers of two)."""
    return [{"sink": block_size, "window": w} for w in _powers(64, max(64, seqlen // 4))]


PATTERN = register_pattern(Pattern(
    name="a_shape",
    summary="StreamingLLM A-shape: sink tokens + local window, no estimation; also sparsifies decode",
    layout=BlockLayout,
    budgets=(Param("sink", int, 128, 0, doc="leading tokens every query keeps (rounded up to whole blocks)"),
             Param("window", int, 1024, 1, doc="most recent keys each query keeps (the blocks covering them)")),
    build=_build,
    full_budget=lambda seqlen_q, seqlen_k, block_size: {"sink": 0, "window": seqlen_k},
    candidates=_windows,
    sweep=_windows,
    # Runs the block-sparse kernel (467 TFLOP/s of computed entries at 10 % density, 128K, H100 2026-11-23).
    speed_tflops=467.0,
    select=lambda q, cache, summaries, *, scale=None, sink, window: a_shape_pages(cache, sink=sink, window=window),
    decode_reads=_decode_reads,
    minference_name="stream_llm",
    minference=lambda vertical, slash: {"sink": vertical, "window": slash},
    color="tab:green",
))
