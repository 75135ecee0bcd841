"""A-shape (StreamingLLM) pattern: the first `sink` tokens plus a local `window`, no estimation.

Built at block granularity: each query block keeps the key blocks that hold the sink tokens and the
key blocks that any of its rows' windows touch. The same rule serves decode (one query against a long
cache): the single query block keeps the sink blocks and the blocks of the last `window` keys.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from .._checks import check_positive_int
from ..layouts import BlockLayout

__all__ = ["a_shape_layout"]

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
