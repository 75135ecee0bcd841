"""XAttention pattern: key blocks chosen per query block by strided antidiagonal scoring, kept up to a
cumulative share `tau` of the estimated attention mass.

Scoring, per query head: queries and keys are cut into groups of `stride` consecutive tokens; a query group
r is the concatenation q[rS], q[rS+1], .., q[rS+S-1] and a key group c the concatenation k[cS+S-1], ..,
k[cS] (reversed), so one dot product of the two sums the S products on an antidiagonal of the S x S tile
(r, c). Those sums, times scale / S, are softmaxed over the key groups each query group may see (causal,
bottom-right), summed over the tiles of each (query block, key block) and averaged over the block's query
groups: an estimate of the attention mass the block's rows give each key block, at 1 / S of the cost of
the scores. Then per query block, with the first and the diagonal (last visible) key block always kept,
the other visible blocks are taken by decreasing estimate (ties: lower block id first) until the kept
estimate reaches tau; tau >= 1 keeps every visible block.

Work and memory: the scores are made a chunk of query groups and one kv head's query heads at a time, and
reduced to the chunk's block scores before the next, so no S x S (or S x S / stride) tensor is built.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..layouts import BlockLayout
from ..patterns import Param, Pattern, register_pattern

__all__ = ["antidiagonal_block_scores", "xattention_select", "PATTERN"]

# Elements of one chunk of strided scores (float32): 2**26 is 256 MiB.
_CHUNK_ELEMENTS = 1 << 26


def _check(block_size: int, stride: int) -> None:
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride: expected a positive int, got {stride!r}")
    if block_size % stride:
        raise ValueError(f"stride: expected a divisor of block_size ({block_size}), got {stride}")


def _groups(x: torch.Tensor, stride: int, reverse: bool) -> torch.Tensor:
    """[.., S, D] -> [.., ceil(S / stride), stride * D]: each group of `stride` tokens concatenated (zero
    padded at the end), in reverse order within the group if `reverse`."""
    s = x.shape[-2]
    pad = -s % stride
    x = F.pad(x, (0, 0, 0, pad)).unflatten(-2, (-1, stride))
    if reverse:
        x = x.flip(-2)
    return x.flatten(-2)


def antidiagonal_block_scores(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 64, stride: int = 8,
                              scale: Optional[float] = None, causal: bool = True, qb0: int = 0,
                              qb1: Optional[int] = None) -> torch.Tensor:
    """float32 [B, Hq, qb1 - qb0, nk]: the estimated attention mass of query blocks [qb0, qb1) on each key
    block (each row sums to 1 over the blocks it may see). q [B, Hq, Sq, D], k [B, Hkv, Sk, D] (GQA)."""
    _check(block_size, stride)
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    nq, nk = -(-sq // block_size), -(-sk // block_size)
    qb1 = nq if qb1 is None else qb1
    scale = (d ** -0.5 if scale is None else float(scale)) / stride
    per = block_size // stride  # groups per block
    cdt = q.dtype if q.is_cuda else torch.float32
    kg = _groups(k.to(cdt), stride, reverse=True)  # [B, Hkv, nkg, S*D]
    nkg = kg.shape[2]
    col_first = torch.arange(nkg, device=q.device) * stride  # first key of each key group
    off = sk - sq
    rows_per_chunk = max(per, (_CHUNK_ELEMENTS // max(1, b * g * nkg)) // per * per)
    out = torch.empty(b, hq, qb1 - qb0, nk, dtype=torch.float32, device=q.device)
    for r0 in range(qb0 * block_size, min(qb1 * block_size, sq), rows_per_chunk * stride):
        r1 = min(r0 + rows_per_chunk * stride, qb1 * block_size, sq)
        qg = _groups(q[:, :, r0:r1].to(cdt), stride, reverse=False)  # [B, Hq, rows, S*D]
        rows = qg.shape[2]
        s = torch.matmul(qg.unflatten(1, (hkv, g)), kg.unsqueeze(2).transpose(-1, -2)).float() * scale
        s = s.flatten(1, 2)  # [B, Hq, rows, nkg]
        last_row = torch.clamp(r0 + (torch.arange(rows, device=q.device) + 1) * stride, max=r1) - 1
        visible = col_first[None, :] <= (last_row[:, None] + off if causal else sk - 1)
        p = torch.softmax(s.masked_fill_(~visible, float("-inf")), dim=-1).nan_to_num_(0.0)
        del s
        # Sum over each key block's groups, then over each query block's groups.
        p = F.pad(p, (0, nk * per - nkg)).unflatten(-1, (nk, per)).sum(-1)  # [B, Hq, rows, nk]
        first_block = r0 // block_size
        row_block = (r0 + torch.arange(rows, device=q.device) * stride) // block_size - first_block
        nb = int(row_block[-1]) + 1
        blocks = torch.zeros(b, hq, nb, nk, dtype=torch.float32, device=q.device)
        blocks.index_add_(2, row_block, p)
        counts = torch.bincount(row_block, minlength=nb).clamp(min=1).float()
        out[:, :, first_block - qb0: first_block - qb0 + nb] = blocks / counts[:, None]
    return out


def xattention_select(q: torch.Tensor, k: torch.Tensor, tau, *, block_size: int = 64, stride: int = 8,
                      scale: Optional[float] = None, causal: bool = True) -> BlockLayout:
    """The XAttention layout (see the module docstring). tau: a float, or one per query head."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    nq, nk = -(-sq // block_size), -(-sk // block_size)
    tau = torch.as_tensor(tau, dtype=torch.float64).flatten().cpu()
    tau = (tau.expand(hq) if tau.numel() == 1 else tau).to(q.device).float().view(1, hq, 1, 1)
    off = sk - sq
    blocks = torch.arange(nk, device=q.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * hq * nk * 4))
    counts, ids = [], []
    for qb0 in range(0, nq, chunk):
        qb1 = min(nq, qb0 + chunk)
        score = antidiagonal_block_scores(q, k, block_size=block_size, stride=stride, scale=scale, causal=causal,
                                          qb0=qb0, qb1=qb1)
        last_key = (torch.arange(qb0, qb1, device=q.device) * block_size + block_size).clamp(max=sq) - 1 + off
        diag = torch.div(last_key, block_size, rounding_mode="floor").clamp(max=nk - 1)  # -1: sees nothing
        if not causal:
            diag = torch.full_like(diag, nk - 1)
        visible = blocks[None, :] <= diag[:, None]  # [chunk, nk]
        forced = visible & ((blocks[None, :] == 0) | (blocks[None, :] == diag[:, None]))
        # Order: forced first, then by decreasing score, ties to the lower id (a stable sort over ids).
        key = torch.where(forced, float("inf"), torch.where(visible, score, float("-inf")))
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices
        mass = torch.gather(torch.where(visible, score, 0.0).expand_as(key), -1, order).cumsum(-1)
        ranked_visible = torch.gather(visible.expand_as(key), -1, order)
        before = F.pad(mass[..., :-1], (1, 0))  # mass kept before each entry
        take = ranked_visible & ((before < tau) | (tau >= 1) | torch.gather(forced.expand_as(key), -1, order))
        n = take.sum(-1)
        # Kept as wide as this chunk's longest list (not nk): the whole call's lists stay O(kept blocks).
        chosen = torch.where(take, order, nk).sort(-1).values[..., : max(1, int(n.max()))]
        counts.append(n.to(torch.int32))
        ids.append(chosen.to(torch.int32))
    width = max(c.shape[-1] for c in ids)
    counts_t = torch.cat(counts, 2)
    ids_t = torch.cat([F.pad(c, (0, width - c.shape[-1]), value=nk) for c in ids], 2)
    ids_t = torch.where(ids_t < nk, ids_t, -1).to(torch.int32)
    return BlockLayout(counts_t.contiguous(), ids_t.contiguous(), block_size, block_size, sq, sk, validate=False)


def _estimate(q, k, budgets, *, causal: bool, scale, block_size: int, stride: int = 8):
    return xattention_select(q, k, budgets["tau"], block_size=block_size, stride=stride, scale=scale, causal=causal)


def _build(layout, q, k, budgets, *, causal: bool, block_size: int, stride: int = 8) -> BlockLayout:
    return layout


def _taus(seqlen: int, block_size: int) -> List[Dict[str, Any]]:
    return [{"tau": t} for t in (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)]


PATTERN = register_pattern(Pattern(
    name="xattention",
    summary="XAttention: key blocks by strided antidiagonal scores, kept up to a cumulative share tau",
    layout=BlockLayout,
    budgets=(Param("tau", float, 0.9, 1e-6, 1.0, doc="share of the estimated mass each query block keeps"),),
    options=(Param("stride", int, 8, 1, 64, doc="antidiagonal stride: tokens per scoring group (divides block_size)"),),
    estimate=_estimate,
    build=_build,
    full_budget=lambda seqlen_q, seqlen_k, block_size: {"tau": 1.0},
    candidates=_taus,
    sweep=_taus,
    # One score per stride x stride tile: 2 * D * S^2 / stride FLOPs, 1 / stride of dense causal attention's.
    estimator_cost=lambda seqlen, *, block_size, stride=8, **options: 1.0 / stride,
    speed_tflops=467.0,  # the block-sparse kernel's measured rate
    causal_only=False,
    color="tab:brown",
))
