"""Block top-k pattern ("block_sparse"): mean-pool queries and keys over blocks, score the pooled blocks against each
other, and keep per query block the top-k key blocks (always the diagonal block and the first block).

The pooled score matrix is (Sq / block) x (Sk / block) per head: 16K x 16K at 1M tokens. It is built a
chunk of query blocks and a few kv heads at a time, so memory stays bounded by _CHUNK_ELEMENTS.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch

from ..layouts import BlockLayout
from ..patterns import Param, Pattern, register_pattern
from .a_shape import PerHead, per_head

__all__ = ["estimate_block_topk", "block_topk_layout", "pool_blocks", "PATTERN"]

# Elements of one chunk of pooled scores (float32): 2**27 is 512 MiB.
_CHUNK_ELEMENTS = 1 << 27


def pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean over consecutive blocks of the sequence dim: [B, H, S, D] -> float32 [B, H, ceil(S / bs), D].
    The last, partial block is the mean of the tokens it has. Reads x through views (no copy of x)."""
    s = x.shape[2]
    full = s // block_size
    parts = []
    if full:
        blocks = x[:, :, : full * block_size].unflatten(2, (full, block_size))
        parts.append(blocks.sum(3, dtype=torch.float32) / block_size)
    if s > full * block_size:
        parts.append(x[:, :, full * block_size :].sum(2, keepdim=True, dtype=torch.float32) / (s - full * block_size))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def _budgets(top_k, density, num_heads: int, nk: int):
    if (top_k is None) == (density is None):
        raise ValueError("top_k, density: expected exactly one of them (key blocks per query block, or a fraction)")
    if density is not None:
        if not 0 < float(density) <= 1:
            raise ValueError(f"density: expected a fraction in (0, 1], got {density!r}")
        return None, min(nk, math.ceil(float(density) * nk) + 2)
    # Fewer than 2 cannot hold the two forced blocks (diagonal and first): raise such budgets to 2.
    sizes = per_head("top_k", top_k, num_heads, minimum=1).clamp(min=2).clamp(max=nk)
    return sizes, int(sizes.max())


def estimate_block_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    top_k: Optional[PerHead] = None,
    density: Optional[float] = None,
    block_size: int = 64,
    causal: bool = True,
) -> torch.Tensor:
    """Top key blocks per (batch, query head, query block): int32 [B, Hq, nq, width], unsorted, -1 = none.

    top_k: key blocks kept per query block (an int or one per query head), or
    density: the fraction of each query block's visible key blocks to keep (at least the two forced ones).
    The diagonal block (the last one the block's rows may see) and the first block are always kept,
    so a top_k below 2 counts as 2.
    """
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    bs = block_size
    nq, nk = -(-sq // bs), -(-sk // bs)
    sizes, width = _budgets(top_k, density, hq, nk)
    uniform = sizes is not None and bool((sizes == width).all())
    off = sk - sq
    q_last_key = (torch.arange(nq, device=q.device) * bs + bs).clamp(max=sq) - 1 + off
    diag = torch.div(q_last_key, bs, rounding_mode="floor").clamp(max=nk - 1)  # -1: the block sees nothing
    if not causal:
        diag = torch.div((torch.arange(nq, device=q.device) * bs + off).clamp(0, sk - 1), bs, rounding_mode="floor")
    key_blocks = torch.arange(nk, device=q.device)
    # On the GPU the pooled scores run in q's dtype (tensor cores: fp32 would cost ~40 ms at 1M tokens);
    # the ranking barely moves. The CPU keeps float32.
    cdt = q.dtype if q.is_cuda else torch.float32
    out = torch.empty(b, hq, nq, width, dtype=torch.int32, device=q.device)
    kv_step = max(1, _CHUNK_ELEMENTS // max(1, b * g * nq * nk))
    rows = max(1, _CHUNK_ELEMENTS // max(1, b * g * kv_step * nk))
    for h0 in range(0, hkv, kv_step):
        h1 = min(hkv, h0 + kv_step)
        kp = pool_blocks(k[:, h0:h1], bs).to(cdt).unsqueeze(2)  # [B, hkv, 1, nk, D]
        qp = pool_blocks(q[:, h0 * g : h1 * g], bs).to(cdt).unflatten(1, (h1 - h0, g))  # [B, hkv, g, nq, D]
        for r0 in range(0, nq, rows):
            r1 = min(nq, r0 + rows)
            s = torch.matmul(qp[:, :, :, r0:r1], kp.transpose(-1, -2))  # [B, hkv, g, r, nk]
            d = diag[r0:r1, None]
            if causal:
                s.masked_fill_(key_blocks > d, float("-inf"))
            forced = ((key_blocks == d) | (key_blocks == 0)) & (d >= 0)
            s.masked_fill_(forced, float("inf"))
            # Per-block or per-head budgets cut the top-k list by rank, so it must be sorted by score.
            vals, ids = torch.topk(s, width, dim=-1, sorted=not uniform)
            keep = vals > float("-inf")
            if sizes is not None:
                head_sizes = sizes[h0 * g : h1 * g].to(q.device).view(h1 - h0, g, 1, 1)
                keep &= torch.arange(width, device=q.device) < head_sizes
            else:
                visible = (d + 1).clamp(min=0) if causal else torch.full_like(d, nk)
                budget = torch.maximum(torch.ceil(density * visible.double()).long(), visible.clamp(max=2))
                keep &= torch.arange(width, device=q.device) < budget
            out[:, h0 * g : h1 * g, r0:r1] = torch.where(keep, ids, -1).flatten(1, 2)
    return out


def block_topk_layout(ids: torch.Tensor, seqlen_q: int, seqlen_k: int, block_size: int = 64) -> BlockLayout:
    """Sort the estimator's block ids into a BlockLayout (ids [B, H, nq, width], -1 = none)."""
    nk = -(-seqlen_k // block_size)
    keyed = torch.where(ids >= 0, ids, nk).sort(dim=-1).values
    counts = (keyed < nk).sum(-1, dtype=torch.int32)
    indices = torch.where(keyed < nk, keyed, -1).to(torch.int32)
    return BlockLayout(counts, indices.contiguous(), block_size, block_size, seqlen_q, seqlen_k, validate=False)


def _normalize(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    if kwargs.get("top_k") is not None and kwargs.get("density") is not None:
        raise ValueError("method 'block_sparse': pass top_k or density, not both")
    if kwargs.get("top_k") is None and kwargs.get("density") is None:
        kwargs = {**kwargs, "density": 0.1}
    return kwargs


def _estimate(q, k, budgets, *, causal: bool, scale, block_size: int, density: Optional[float] = None):
    top_k = None if density is not None else budgets["top_k"]
    return estimate_block_topk(q, k, top_k=top_k, density=density, block_size=block_size, causal=causal)


def _build(ids, q, k, budgets, *, causal: bool, block_size: int, density: Optional[float] = None) -> BlockLayout:
    return block_topk_layout(ids, q.shape[2], k.shape[2], block_size)


def _top_ks(seqlen: int, block_size: int) -> List[Dict[str, int]]:
    """top_k 2 .. (key blocks) / 2, powers of two."""
    nk = -(-seqlen // block_size)
    return [{"top_k": 2 << i} for i in range(64) if 2 << i <= max(2, nk // 2)]


PATTERN = register_pattern(Pattern(
    name="block_sparse",
    summary="block top-k: mean-pooled q/k blocks, top key blocks per query block (diagonal + first kept)",
    layout=BlockLayout,
    budgets=(Param("top_k", int, None, 1, optional=True,
                   doc="key blocks per query block (>= 2: diagonal and first always kept)"),),
    options=(Param("density", float, None, 1e-9, 1.0, optional=True,
                   doc="or: fraction of each query block's visible key blocks; 0.1 when neither is given"),),
    estimate=_estimate,
    build=_build,
    full_budget=lambda seqlen_q, seqlen_k, block_size: {"top_k": -(-seqlen_k // block_size)},
    candidates=_top_ks,
    sweep=_top_ks,
    # Pooled blocks scored against each other: 1 / (2 * block_size^2) of dense attention's FLOPs.
    estimator_cost=lambda seqlen, *, block_size, **options: 0.5 / block_size ** 2,
    # 467 TFLOP/s of computed entries at 10 % density, 128K (H100, 2026-11-23).
    speed_tflops=467.0,
    causal_only=False,
    normalize=_normalize,
    minference_name="block_sparse",
    # MInference's block_sparse heads ignore both numbers and keep a fixed 100 blocks per query block.
    minference=lambda vertical, slash: {"top_k": 100},
    color="tab:orange",
))
