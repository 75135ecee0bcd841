"""Per-head dispatch: run one layer whose query heads use different patterns and budgets.

Heads are grouped by pattern. Inside a group the estimator takes one budget per head and pads the
sparse index to a common width, so ONE estimator call and ONE kernel launch cover every head of the
group, never a Python loop over heads. Query heads are gathered with index_select; keys and values are
passed by kv head (GQA), never repeated per query head: a group uses the original k/v when it covers
every kv head with the same number of query heads, else a subset of kv heads (split further by the
number of query heads per kv head, at most `group size` sub-launches).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from .ops import attention as kernel_attention
from .ops.reference import sdpa, sdpa_layout_attention
from .patterns import DENSE, get_pattern

__all__ = [
    "HeadGroup",
    "head_groups",
    "estimate_pattern",
    "build_pattern",
    "plan_pattern",
    "attend",
    "dense_attention",
    "step_backends",
    "run_head_config",
    "LayerLayouts",
    "RowChunks",
    "group_estimates",
]

# Elements of one explicit causal mask chunk in dense_attention (rows x seqlen_k bools).
_MASK_ELEMENTS = 1 << 26


@dataclass
class HeadGroup:
    """Query heads that run in one launch: one pattern, the same number of query heads per kv head."""

    pattern: str
    heads: List[int]      # query heads, kv-major (heads of kv_heads[0] first)
    kv_heads: List[int]
    configs: List[Dict[str, Any]]


def head_groups(head_config: Sequence[Dict[str, Any]], num_kv_heads: int) -> List[HeadGroup]:
    """Group query heads by pattern, then by how many of a kv head's query heads share that pattern."""
    group = len(head_config) // num_kv_heads
    by_pattern: Dict[str, Dict[int, List[int]]] = defaultdict(lambda: defaultdict(list))
    for h, cfg in enumerate(head_config):
        by_pattern[cfg["pattern"]][h // group].append(h)
    out = []
    for pattern, per_kv in by_pattern.items():
        by_count: Dict[int, List[int]] = defaultdict(list)
        for kv, heads in sorted(per_kv.items()):
            by_count[len(heads)].append(kv)
        for count, kvs in sorted(by_count.items()):
            heads = [h for kv in kvs for h in per_kv[kv]]
            out.append(HeadGroup(pattern, heads, kvs, [head_config[h] for h in heads]))
    return out


def estimate_pattern(pattern: str, q, k, configs, *, causal: bool, scale: Optional[float], block_size: int,
                     **options):
    """Phase 1, online estimation (None for a pattern without an estimator). `configs`: one head dict per
    query head of q (its budgets); options: the pattern's per-call options (defaults where absent)."""
    p = get_pattern(pattern)
    if p.estimate is None:
        return None
    return p.estimate(q, k, p.budget_tensors(configs), causal=causal, scale=scale, block_size=block_size,
                      **p.run_options(options))


def build_pattern(pattern: str, estimate, q, k, configs, *, causal: bool = True, block_size: int, **options):
    """Phase 2, the sparse index over q's heads (a Layout of the pattern's type)."""
    p = get_pattern(pattern)
    return p.build(estimate, q, k, p.budget_tensors(configs), causal=causal, block_size=block_size,
                   **p.run_options(options))


def plan_pattern(pattern: str, q, k, configs, *, causal: bool, scale, block_size: int, **options):
    """Phases 1 and 2: the pattern's layout for q's heads."""
    est = estimate_pattern(pattern, q, k, configs, causal=causal, scale=scale, block_size=block_size, **options)
    return build_pattern(pattern, est, q, k, configs, causal=causal, block_size=block_size, **options)


def attend(q, k, v, layout, *, causal: bool, scale: Optional[float]):
    """Phase 3: attention over the layout; its kernel family on CUDA, elsewhere the same entries in fp32
    through SDPA with the layout's mask, by row chunks (several times faster than the explicit reference)."""
    if q.is_cuda:
        return kernel_attention(q, k, v, layout, causal=causal, scale=scale)
    return sdpa_layout_attention(q, k, v, layout, causal=causal, scale=scale)


def dense_attention(q, k, v, *, causal: bool, scale: Optional[float]):
    """Dense attention through torch SDPA (GQA without repeating k/v), bottom-right causal."""
    sq, sk = q.shape[2], k.shape[2]
    if not causal or sq == 1:
        with step_backends(q):
            return sdpa(q, k, v, scale=scale)
    if sq == sk:
        return sdpa(q, k, v, is_causal=True, scale=scale)
    if q.is_cuda and sq < sk and _flash_lower_right(q, k, v):
        # A chunk of queries against a longer cache: the flash kernel's own bottom-right causal band.
        from torch.nn.attention.bias import causal_lower_right

        return sdpa(q, k, v, attn_mask=causal_lower_right(sq, sk), scale=scale)
    # Sq != Sk: SDPA's is_causal is top-left aligned, so pass the bottom-right band explicitly, by rows.
    out = torch.zeros_like(q)
    rows = max(1, _MASK_ELEMENTS // sk)
    first = max(0, sq - sk)  # rows before this one see no key: their output stays 0
    for r0 in range(first, sq, rows):
        r1 = min(sq, r0 + rows)
        i = torch.arange(r0, r1, device=q.device)[:, None] + (sk - sq)
        band = torch.arange(sk, device=q.device)[None, :] <= i
        out[:, :, r0:r1] = sdpa(q[:, :, r0:r1], k, v, attn_mask=band, scale=scale)
    return out


def step_backends(q: Optional[torch.Tensor] = None):
    """A context for SDPA calls: all backends but cuDNN where q [B, H, Sq, D] is a decode step on CUDA (Sq 1;
    without q, always), else no restriction. cuDNN's SDPA builds an execution plan per input shape, and a decode
    step's key length is new at every step, so where torch prefers cuDNN (Hopper) each step would pay for a new
    plan."""
    if q is not None and not (q.is_cuda and q.shape[2] == 1):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _flash_lower_right(q, k, v) -> bool:
    """Whether torch's flash kernel takes these inputs with a bottom-right causal bias (elsewhere torch would
    build the Sq x Sk mask)."""
    try:
        from torch.backends.cuda import SDPAParams, can_use_flash_attention

        # The check torch.nn.attention.bias makes before it runs the flash kernel (is_causal False: the bias is it).
        return bool(can_use_flash_attention(SDPAParams(q, k, v, None, 0.0, False, q.shape[1] != k.shape[1])))
    except (ImportError, TypeError, RuntimeError):
        return False


def _select(t: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """t's heads `ids` (dim 1): the tensor itself when ids are all of its heads in order."""
    if list(ids) == list(range(t.shape[1])):
        return t
    return t.index_select(1, torch.tensor(ids, device=t.device))


@dataclass
class LayerLayouts:
    """What one layer call computed: the sparse layouts per head group (dense heads have none).
    Density and recall are derived on demand, since both cost a device sync (recall a dense pass)."""

    batch: int
    num_heads: int
    causal: bool
    parts: List[tuple] = field(default_factory=list)  # (query heads, kv heads, layout)

    def density(self) -> torch.Tensor:
        """float64 [B, Hq]: computed entries / causal entries; dense heads 1."""
        d = torch.ones(self.batch, self.num_heads, dtype=torch.float64)
        for heads, _, layout in self.parts:
            d[:, heads] = layout.head_density(self.causal)
        return d

    def recall(self, q, k, scale: Optional[float] = None, rows=None) -> torch.Tensor:
        """float64 [B, Hq]: attention mass the layouts keep (sparse_attn.recall); dense heads 1. rows: (start,
        end) query ranges to measure on (default all)."""
        from .recall import attention_recall

        r = torch.ones(self.batch, self.num_heads, dtype=torch.float64)
        for heads, kv_heads, layout in self.parts:
            r[:, heads] = attention_recall(_select(q, heads), _select(k, kv_heads), layout, causal=self.causal,
                                           scale=scale, rows=rows)
        return r


@dataclass
class RowChunks:
    """What one layer call computed when its queries ran as consecutive row chunks (see
    methods.sparse_attention): per chunk its query rows [r0, r1) and its LayerLayouts over those rows and the
    keys they may see. Density and recall are the chunks', weighted by their causal entries."""

    seqlen_k: int
    chunks: List[tuple] = field(default_factory=list)  # (r0, r1, LayerLayouts)
    seqlen_q: int = 0

    def _weights(self) -> torch.Tensor:
        from .layouts import causal_tile_entries

        off = self.seqlen_k - self.seqlen_q
        w = torch.tensor([float(causal_tile_entries(r0, r1, 0, self.seqlen_k, off)) for r0, r1, _ in self.chunks],
                         dtype=torch.float64)
        return w / w.sum()

    def density(self) -> torch.Tensor:
        parts = torch.stack([layouts.density() for _, _, layouts in self.chunks])
        return (parts * self._weights().view(-1, 1, 1)).sum(0)

    def recall(self, q, k, scale: Optional[float] = None, rows=None) -> torch.Tensor:
        """As LayerLayouts.recall; with rows, each chunk measured on the rows inside it, weighted by their count."""
        off = self.seqlen_k - self.seqlen_q
        if rows is None:
            parts = torch.stack([layouts.recall(q[:, :, r0:r1], k[:, :, : r1 + off], scale)
                                 for r0, r1, layouts in self.chunks])
            return (parts * self._weights().view(-1, 1, 1)).sum(0)
        total, count = 0.0, 0
        for r0, r1, layouts in self.chunks:
            local = [(max(a, r0) - r0, min(b, r1) - r0) for a, b in rows if min(b, r1) > max(a, r0)]
            n = sum(b - a for a, b in local)
            if n:
                total = total + layouts.recall(q[:, :, r0:r1], k[:, :, : r1 + off], scale, rows=local) * n
                count += n
        return total / max(1, count)


def group_estimates(q, k, head_config, *, causal: bool, scale: Optional[float], block_size: int = 64,
                    **options) -> Dict[int, Any]:
    """{group index (head_groups order): its estimate} for the groups whose pattern restricts an estimate to
    row chunks (Pattern.rows): what a call run in row chunks estimates once."""
    out = {}
    for i, g in enumerate(head_groups(head_config, k.shape[1])):
        if g.pattern != DENSE and get_pattern(g.pattern).rows is not None:
            out[i] = estimate_pattern(g.pattern, _select(q, g.heads), _select(k, g.kv_heads), g.configs,
                                      causal=causal, scale=scale, block_size=block_size, **options)
    return out


def run_head_config(q, k, v, head_config, *, causal: bool, scale: Optional[float], block_size: int = 64,
                    estimates: Optional[Dict[int, Any]] = None, **options):
    """One layer with per-head configs (validated). options: per-call options of the patterns (each pattern
    takes its own, defaults for the rest). estimates: {group index: estimate} made beforehand (group_estimates,
    restricted to these rows), built from instead of estimating. Returns (out [B, Hq, Sq, D], LayerLayouts)."""
    b, hq = q.shape[:2]
    out = torch.empty_like(q)
    record = LayerLayouts(b, hq, causal)
    for i, g in enumerate(head_groups(head_config, k.shape[1])):
        qg, kg, vg = _select(q, g.heads), _select(k, g.kv_heads), _select(v, g.kv_heads)
        if g.pattern == DENSE:
            og = dense_attention(qg, kg, vg, causal=causal, scale=scale)
        elif estimates and i in estimates:
            layout = build_pattern(g.pattern, estimates[i], qg, kg, g.configs, causal=causal, block_size=block_size,
                                   **options)
        else:
            layout = plan_pattern(g.pattern, qg, kg, g.configs, causal=causal, scale=scale,
                                  block_size=block_size, **options)
        if g.pattern != DENSE:
            og = attend(qg, kg, vg, layout, causal=causal, scale=scale)
            record.parts.append((g.heads, g.kv_heads, layout))
        if list(g.heads) == list(range(hq)):
            out = og
        else:
            out.index_copy_(1, torch.tensor(g.heads, device=q.device), og)
    return out, record
