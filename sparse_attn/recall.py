"""Attention recall: how much of the true (dense, causal) softmax attention mass a sparse index keeps.

For each query row, recall = sum of softmax(q k^T * scale) over the entries the layout computes; the
result is the mean over the rows that see at least one key. Rows are processed in chunks, so memory
grows with chunk x seqlen_k, never seqlen_q x seqlen_k.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch

from ._checks import FLOAT_DTYPES, check_positive_int, check_tensor
from .layouts import Layout

__all__ = ["attention_recall", "sampled_rows"]

# Elements of one chunk's score matrix (heads x rows x keys, float32): 2**25 is 128 MiB.
_CHUNK_ELEMENTS = 1 << 25

AnyLayout = Union[Layout, torch.Tensor]


def _check(q, k, layout):
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES, device=q.device)
    b, hq, sq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or hq % k.shape[1]:
        raise ValueError(f"k: expected [{b}, Hkv dividing {hq}, Sk, {d}], got {tuple(k.shape)}")
    sk = k.shape[2]
    if isinstance(layout, Layout):
        if layout.batch != b or layout.num_heads != hq or layout.seqlen_q < sq or layout.seqlen_k < sk:
            raise ValueError(f"layout: expected batch {b}, {hq} heads, seqlen_q >= {sq}, seqlen_k >= {sk}; got "
                             f"batch {layout.batch}, {layout.num_heads} heads, {layout.seqlen_q}, {layout.seqlen_k}")
    elif isinstance(layout, torch.Tensor):
        check_tensor("layout", layout, ndim=4, dtypes=(torch.bool,))
        lb, lh, lq, lk = layout.shape
        if lb not in (1, b) or lh not in (1, hq) or lq < sq or lk < sk:
            raise ValueError(f"layout: expected a bool mask [1 or {b}, 1 or {hq}, >= {sq}, >= {sk}], "
                             f"got {tuple(layout.shape)}")
    else:
        raise TypeError(f"layout: expected a sparse_attn Layout or a bool mask, got {type(layout).__name__}")


def sampled_rows(seqlen_q: int, bands: int = 16, band_rows: int = 64) -> List[Tuple[int, int]]:
    """`bands` row ranges of `band_rows` rows spread evenly over [0, seqlen_q), the last one ending at
    seqlen_q (overlapping ranges merged): attention_recall(rows=...) on long inputs, where scoring every
    row would cost a dense pass."""
    check_positive_int("bands", bands)
    check_positive_int("band_rows", band_rows)
    if bands * band_rows >= seqlen_q:
        return [(0, seqlen_q)]
    step = (seqlen_q - band_rows) / max(1, bands - 1)
    starts = sorted({round(i * step) for i in range(bands)})
    out: List[Tuple[int, int]] = []
    for r0 in starts:
        r1 = min(seqlen_q, r0 + band_rows)
        if out and r0 <= out[-1][1]:
            out[-1] = (out[-1][0], r1)
        else:
            out.append((r0, r1))
    return out


def _kept_mass(layout: AnyLayout, p: torch.Tensor, b: int, r0: int) -> torch.Tensor:
    """Per (head, row) the probability mass of p [Hq, rows, keys] that the layout keeps."""
    if isinstance(layout, torch.Tensor):
        rows, keys = p.shape[1:]
        m = layout[min(b, layout.shape[0] - 1), :, r0 : r0 + rows, :keys]
        return (p * m.to(p.device)).sum(-1)
    return layout.row_mass(p, b, r0)


def attention_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: Union[AnyLayout, Sequence[AnyLayout]],
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    chunk_size: Optional[int] = None,
    rows: Optional[Sequence[Tuple[int, int]]] = None,
) -> torch.Tensor:
    """Fraction of the dense softmax attention mass the layout's entries capture, per (batch, query head).

    q [B, Hq, Sq, D], k [B, Hkv, Sk, D]; layout: a sparse_attn Layout or a bool mask
    [B or 1, Hq or 1, Sq, Sk], or a list of them (the softmax is computed once for all: the profiler's
    candidates). causal: bottom-right aligned (query i sees keys j <= i + Sk - Sq).
    chunk_size: query rows per chunk (default: as many as fit 2**25 scores). rows: (start, end) ranges of
    query rows to measure on (default every row; see sampled_rows). Returns float64 [B, Hq]
    on the CPU, or [len(layouts), B, Hq] for a list; a head none of whose rows sees a key gets recall 1.
    """
    many = isinstance(layout, (list, tuple))
    layouts = list(layout) if many else [layout]
    for item in layouts:
        _check(q, k, item)
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else float(scale)
    step = chunk_size or max(1, _CHUNK_ELEMENTS // max(1, hq * sk))
    ranges = [(0, sq)] if rows is None else [(max(0, int(a)), min(sq, int(z))) for a, z in rows]
    chunks = [(r0, min(z, r0 + step)) for a, z in ranges for r0 in range(a, z, step)]
    total = torch.zeros(len(layouts), b, hq, dtype=torch.float64, device=q.device)
    counted = torch.zeros(b, dtype=torch.float64, device=q.device)
    for bi in range(b):
        kb = k[bi].float().unsqueeze(1)  # [Hkv, 1, Sk, D]
        for r0, r1 in chunks:
            # Causal: keys past the chunk's last row carry no mass, so they are not scored at all.
            keys = min(sk, max(0, r1 - 1 + sk - sq + 1)) if causal else sk
            seen = torch.arange(r0, r1, device=q.device) + (sk - sq if causal else sk) >= 0
            if keys == 0 or not seen.any():
                continue
            qc = q[bi, :, r0:r1].float().unflatten(0, (hkv, hq // hkv))
            s = torch.matmul(qc, kb[:, :, :keys].transpose(-1, -2)).flatten(0, 1) * scale  # [Hq, rows, keys]
            if causal:
                last = torch.arange(r0, r1, device=q.device)[:, None] + (sk - sq)
                visible = torch.arange(keys, device=q.device)[None, :] <= last
                s.masked_fill_(~visible, float("-inf"))
            p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # rows seeing no key: all zeros
            del s
            for i, item in enumerate(layouts):
                kept = _kept_mass(item, p, bi, r0)
                total[i, bi] += kept[:, seen].double().sum(-1)
            counted[bi] += seen.sum()
    recall = torch.where(counted[:, None] > 0, total / counted.clamp(min=1)[:, None], torch.ones_like(total)).cpu()
    return recall if many else recall[0]
