"""Vertical-slash pattern (MInference 1.0): the estimator (estimate.py, its fused Triton scoring and top-k),
the index builder (index.py: Triton, CUDA and PyTorch backends) and the registry entry."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from ...layouts import VerticalSlashLayout
from ...patterns import Param, Pattern, register_pattern
from .estimate import (FORCED_COLUMNS, FORCED_SLASHES, VerticalSlashChoice, check_share_heads, diagonal_sums,
                       estimate_vertical_slash, vertical_slash_scores)
from .index import BACKENDS, build_vertical_slash_index

__all__ = [
    "estimate_vertical_slash",
    "vertical_slash_scores",
    "build_vertical_slash_index",
    "VerticalSlashChoice",
    "diagonal_sums",
    "check_share_heads",
    "FORCED_COLUMNS",
    "FORCED_SLASHES",
    "BACKENDS",
    "PATTERN",
]


def _powers(low: int, high: int) -> List[int]:
    return [low << i for i in range(64) if low << i <= high]


def _estimate(q, k, budgets, *, causal: bool, scale, block_size: int, last_q: int, share_heads: int):
    return estimate_vertical_slash(q, k, vertical_size=budgets["vertical_size"], slash_size=budgets["slash_size"],
                                   last_q=last_q, causal=causal, scale=scale, share_heads=share_heads)


def _build(estimate, q, k, budgets, *, causal: bool, block_size: int, last_q: int = 64,
           share_heads: int = 1) -> VerticalSlashLayout:
    """The index over q's heads. A choice made per run of n query heads (share_heads) gives a layout with
    identical runs (shared_heads = n): built per query head from the repeated choices (cheaper than
    building per run and copying the index arrays; the builder is a function of a head's choices)."""
    vertical, slash = estimate
    sq, sk = q.shape[2], k.shape[2]
    # The estimator's own output is sorted per row (repeat_interleave keeps that): no second sort.
    presorted = isinstance(estimate, VerticalSlashChoice)
    n = q.shape[1] // vertical.shape[1]
    if n > 1:
        vertical, slash = vertical.repeat_interleave(n, 1), slash.repeat_interleave(n, 1)
    layout = build_vertical_slash_index(vertical, slash, sq, sk, block_size_q=block_size, assume_sorted=presorted)
    if n == 1:
        return layout
    return VerticalSlashLayout(*layout._parts(), layout.block_size_q, layout.seqlen_q, layout.seqlen_k,
                               validate=False, shared_heads=n)


def _rows(estimate, r0: int, r1: int, seqlen_q: int, seqlen_k: int):
    """The columns and diagonals chosen for a whole call, for its rows [r0, r1): the same offsets (diagonal o
    keeps j = i + off - o in both geometries); ids past the chunk's last key, which none of its rows sees,
    become copies of the row's first id (column 0 / the main diagonal, always chosen). No longer sorted."""
    vertical, slash = estimate
    keys = r1 + seqlen_k - seqlen_q
    return (torch.where(vertical < keys, vertical, vertical[..., :1]),
            torch.where(slash < keys, slash, slash[..., :1]))


def _layouts(q, k, configs: Sequence[Dict[str, Any]], *, causal: bool, scale, block_size: int, last_q: int,
             share_heads: int) -> list:
    """The profiler's batch: columns and diagonals are chosen independently, so max(#verticals, #slashes)
    estimator calls cover the whole grid of (vertical_size, slash_size) pairs, instead of one per pair."""
    verticals = sorted({c["vertical_size"] for c in configs})
    slashes = sorted({c["slash_size"] for c in configs})
    cols, diags = {}, {}
    for i in range(max(len(verticals), len(slashes))):
        v, s = verticals[min(i, len(verticals) - 1)], slashes[min(i, len(slashes) - 1)]
        vi, si = estimate_vertical_slash(q, k, vertical_size=v, slash_size=s, last_q=last_q, causal=causal,
                                         scale=scale, share_heads=share_heads)
        cols[v], diags[s] = vi, si
    sq, sk = q.shape[2], k.shape[2]
    # On the CPU the torch builder (identical layouts; "auto" would pick the Triton interpreter under
    # TRITON_INTERPRET=1, ~50x slower).
    backend = "auto" if q.is_cuda else "torch"
    out = []
    for c in configs:
        choice = VerticalSlashChoice(cols[c["vertical_size"]], diags[c["slash_size"]])
        n = q.shape[1] // choice.vertical.shape[1]
        layout = build_vertical_slash_index(choice.vertical, choice.slash, sq, sk, block_size_q=block_size,
                                            backend=backend, assume_sorted=True)
        out.append(layout.repeat_heads(n) if n > 1 else layout)
    return out


def _candidates(seqlen: int, block_size: int) -> List[Dict[str, int]]:
    """vertical_size in {64, 80} and powers of two up to seqlen/8, slash_size in {64, 68, 80} and powers of
    two up to seqlen/4. The estimator always keeps the first 64 columns and the 64 nearest diagonals, so 64
    means those only and 68 / 80 add 4 / 16 chosen ones: a chosen diagonal costs a block-wide band (as much
    as 64 columns), so the slash grid is finest there."""
    verticals = [v for v in (64, 80) if v <= max(64, seqlen // 8)] + _powers(128, seqlen // 8)
    slashes = [s for s in (64, 68, 80) if s <= max(64, seqlen // 4)] + _powers(128, seqlen // 4)
    return [{"vertical_size": v, "slash_size": s} for v in verticals for s in slashes]


def _sweep(seqlen: int, block_size: int) -> List[Dict[str, int]]:
    """slash_size 64 .. seqlen / 2 (powers of two), vertical_size half of it (at least 64)."""
    return [{"vertical_size": max(64, s // 2), "slash_size": s} for s in _powers(64, max(64, seqlen // 2))]


def _mixture_default(seqlen_k: int) -> Dict[str, int]:
    """MInference's 1000 vertical / 6096 slash is ~5-10% of the causal entries at 128K but nearly dense at
    4K-8K, so the budget scales with the key length and is capped there:
        vertical_size = clip(seqlen_k // 32, 64, 1000),  slash_size = clip(seqlen_k // 16, 128, 6096).
    At 8K that is 256 columns + 512 diagonals, at 32K 1000 + 2048, from ~98K on the MInference sizes.
    Measured on SmolLM2-135M-Instruct at 8K tokens of pydoc text (30 layers x 9 heads): mean density 0.32,
    mean attention recall 0.94 (layer 0, the most diffuse, 0.71)."""
    return {"vertical_size": min(1000, max(64, seqlen_k // 32)), "slash_size": min(6096, max(128, seqlen_k // 16))}


def _check_model(options, num_heads: int, num_kv_heads: int) -> None:
    check_share_heads(options.get("share_heads", 1), num_heads, num_kv_heads)


PATTERN = register_pattern(Pattern(
    name="vertical_slash",
    summary="MInference vertical-slash: top key columns + top diagonals, estimated from the last queries",
    layout=VerticalSlashLayout,
    budgets=(Param("vertical_size", int, 1000, 1,
                   doc="key columns kept per head (clipped to seqlen_k; the first 64 tokens always)"),
             Param("slash_size", int, 6096, 1,
                   doc="diagonals kept per head (clipped to seqlen_k; offsets 0..63 always)")),
    options=(Param("last_q", int, 64, 1, doc="queries at the end of the input used to estimate"),
             Param("share_heads", int, 1, 1,
                   doc="1: an index per head (MInference); n (dividing the GQA group): one per run of n query "
                       "heads, chosen from their summed scores; with an even n the kernel serves two heads per "
                       "K/V stream (faster; recall falls where the run's heads disagree)")),
    estimate=_estimate,
    build=_build,
    full_budget=lambda seqlen_q, seqlen_k, block_size: {"vertical_size": seqlen_k, "slash_size": seqlen_k},
    candidates=_candidates,
    sweep=_sweep,
    # last_q queries scored against every key.
    estimator_cost=lambda seqlen, *, block_size, last_q=64, **options: min(last_q, seqlen) / seqlen,
    # Its 1000 / 6096 layout at 128K: 44.7 ms for 12.5 % of the causal entries (H100, 2026-11-23).
    speed_tflops=393.0,
    check_model=_check_model,
    layouts=_layouts,
    rows=_rows,
    mixture_default=_mixture_default,
    minference_name="vertical_and_slash",
    minference=lambda vertical, slash: {"vertical_size": vertical, "slash_size": slash},
    color="tab:blue",
))
