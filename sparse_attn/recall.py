"""Attention recall: how much of the true (dense, causal) softmax attention mass a sparse index keeps.

For each query row, recall = sum of softmax(q k^T * scale) over the entries the layout computes; the
result is the mean over the rows that see at least one key. Rows are processed in chunks, so memory
grows with chunk x seqlen_k, never seqlen_q x seqlen_k.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ._checks import FLOAT_DTYPES, check_positive_int, check_tensor
from .layouts import BlockLayout, VerticalSlashLayout

__all__ = ["attention_recall"]

# Elements of one chunk's score matrix (heads x rows x keys, float32): 2**25 is 128 MiB.
_CHUNK_ELEMENTS = 1 << 25

Layout = Union[BlockLayout, VerticalSlashLayout, torch.Tensor]


def _check(q, k, layout):
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES, device=q.device)
    b, hq, sq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or hq % k.shape[1]:
        raise ValueError(f"k: expected [{b}, Hkv dividing {hq}, Sk, {d}], got {tuple(k.shape)}")
    sk = k.shape[2]
    if isinstance(layout, (BlockLayout, VerticalSlashLayout)):
        if layout.batch != b or layout.num_heads != hq or layout.seqlen_q < sq or layout.seqlen_k < sk:
            raise ValueError(f"layout: expected batch {b}, {hq} heads, seqlen_q >= {sq}, seqlen_k >= {sk}; got "
                             f"batch {layout.batch}, {layout.num_heads} heads, {layout.seqlen_q}, {layout.seqlen_k}")
    elif isinstance(layout, torch.Tensor):
        check_tensor("layout", layout, ndim=4, dtypes=(torch.bool,))
        if layout.shape[0] not in (1, b) or layout.shape[1] not in (1, hq) or layout.shape[2] < sq or layout.shape[3] < sk:
            raise ValueError(f"layout: expected a bool mask [1 or {b}, 1 or {hq}, >= {sq}, >= {sk}], "
                             f"got {tuple(layout.shape)}")
    else:
        raise TypeError(f"layout: expected a BlockLayout, a VerticalSlashLayout or a bool mask, got {type(layout).__name__}")


def _rows_mask(layout: Layout, b: int, r0: int, r1: int, sk: int, heads: int, device) -> torch.Tensor:
    if isinstance(layout, torch.Tensor):
        m = layout[min(b, layout.shape[0] - 1), :, r0:r1, :sk]
    else:
        m = layout.mask_rows(b, r0, r1, sk)
    return m.to(device).expand(heads, r1 - r0, sk)


def attention_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: Layout,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Fraction of the dense softmax attention mass the layout's entries capture, per (batch, query head).

    q [B, Hq, Sq, D], k [B, Hkv, Sk, D]; layout: BlockLayout, VerticalSlashLayout or bool mask
    [B or 1, Hq or 1, Sq, Sk]. causal: bottom-right aligned (query i sees keys j <= i + Sk - Sq).
    chunk_size: query rows per chunk (default: as many as fit 2**25 scores). Returns float64 [B, Hq]
    on the CPU;
    a head none of whose rows sees a key gets recall 1.
    """
    _check(q, k, layout)
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else float(scale)
    rows = chunk_size or max(1, _CHUNK_ELEMENTS // max(1, hq * sk))
    total = torch.zeros(b, hq, dtype=torch.float64, device=q.device)
    counted = torch.zeros(b, dtype=torch.float64, device=q.device)
    keys = torch.arange(sk, device=q.device)
    for bi in range(b):
        kb = k[bi].float().unsqueeze(1)  # [Hkv, 1, Sk, D]
        for r0 in range(0, sq, rows):
            r1 = min(sq, r0 + rows)
            qc = q[bi, :, r0:r1].float().unflatten(0, (hkv, hq // hkv))
            s = torch.matmul(qc, kb.transpose(-1, -2)).flatten(0, 1) * scale  # [Hq, rows, Sk]
            if causal:
                visible = keys[None, :] <= torch.arange(r0, r1, device=q.device)[:, None] + (sk - sq)
                s = s.masked_fill(~visible, float("-inf"))
            p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows seeing no key: all zeros
            kept = (p * _rows_mask(layout, bi, r0, r1, sk, hq, q.device)).sum(-1)
            seen = torch.arange(r0, r1, device=q.device) + (sk - sq if causal else sk) >= 0
            total[bi] += kept[:, seen].double().sum(-1)
            counted[bi] += seen.sum()
    return torch.where(counted[:, None] > 0, total / counted.clamp(min=1)[:, None], torch.ones_like(total)).cpu()
