"""Vertical-slash estimator (MInference 1.0): score the last queries against every key, keep the key
columns ("verticals") and the diagonals ("slashes") that gather the most attention mass.

Only the last `last_q` queries are scored, so the work is last_q x seqlen_k per head, done a few heads
at a time; no seqlen_q x seqlen_k tensor is ever built.

What is always kept (clipped to the budget): the first FORCED_COLUMNS key columns (attention sinks) and
the diagonals with offsets 0 .. FORCED_SLASHES - 1 (the main diagonal and the ones just below it), in
that order of priority. Offsets follow the layouts' convention: diagonal o holds the pairs (i, j) with
j = i + (seqlen_k - seqlen_q) - o.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..a_shape import PerHead, per_head

__all__ = ["estimate_vertical_slash", "vertical_slash_scores", "diagonal_sums", "check_share_heads", "FORCED_COLUMNS",
           "FORCED_SLASHES", "VerticalSlashChoice"]

FORCED_COLUMNS = 64
FORCED_SLASHES = 64

# Elements of one head chunk's last_q x seqlen_k score matrix (float32): 2**28 is 1 GiB.
_CHUNK_ELEMENTS = 1 << 28


def diagonal_sums(p: torch.Tensor) -> torch.Tensor:
    """p [N, L, Sk] holds rows Sk-L .. Sk-1 of a bottom-right causal score matrix (the last L queries).
    Returns [N, Sk]: entry o is the sum of p[t, j] over the pairs with (Sk - L + t) - j == o.

    Row t, read from its end, starts at offset L - 1 - t; after padding every row on the left with L
    zeros and flipping, the diagonals line up on a strided view (row stride W - 1), so the sum is one
    reduction over a view, without any index tensor.
    """
    n, length, sk = p.shape
    width = sk + length
    flipped = torch.nn.functional.pad(p, (length, 0)).flip(-1).contiguous()
    view = flipped.as_strided((n, length, sk), (length * width, width - 1, 1), flipped.storage_offset() + length - 1)
    return view.sum(1)


def check_share_heads(share_heads, num_heads: int, num_kv_heads: int) -> int:
    """share_heads: a positive int dividing the GQA group (query heads per kv head)."""
    group = num_heads // num_kv_heads
    if isinstance(share_heads, bool) or not isinstance(share_heads, int) or share_heads < 1 or group % share_heads:
        raise ValueError(f"share_heads: expected a positive int dividing the query heads per kv head ({group}), "
                         f"got {share_heads!r}")
    return share_heads


class VerticalSlashChoice(NamedTuple):
    """What estimate_vertical_slash returns (a tuple: `vertical, slash = choice` works): int32 key ids and
    diagonal offsets per head, each row sorted ascending. The index builder takes them without sorting
    again (dispatch.build_pattern passes assume_sorted for this type only)."""

    vertical: torch.Tensor
    slash: torch.Tensor


def _forced(scores: torch.Tensor, n_forced: int, ceiling: float) -> None:
    """Raise the first n_forced entries above every real score (<= ceiling), earlier ones higher."""
    n = min(n_forced, scores.shape[-1])
    scores[..., :n] = ceiling + 1 + torch.arange(n, 0, -1, device=scores.device, dtype=scores.dtype)


def _last_q_probs(q: torch.Tensor, k: torch.Tensor, last_q: int, scale: float, causal: bool) -> torch.Tensor:
    """softmax of the last last_q queries against all keys, float32 [B, Hkv, g, L, Sk]."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    ql = q[:, :, sq - last_q :].unflatten(1, (hkv, hq // hkv)) * scale
    s = torch.matmul(ql, k.unsqueeze(2).transpose(-1, -2))
    if causal:
        # Query row t (global Sq - L + t) sees key j <= Sk - L + t: only the last L columns need a mask.
        t = torch.arange(last_q, device=q.device)
        s[..., sk - last_q :].masked_fill_(t[None, :] > t[:, None], float("-inf"))
    return torch.softmax(s, dim=-1, dtype=torch.float32)


def _scores_torch(q, k, last_q: int, scale: float, causal: bool):
    """(vertical, slash) float32 [B, Hq, Sk], a few kv heads at a time."""
    b, hq = q.shape[:2]
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    vertical = torch.empty(b, hq, sk, device=q.device, dtype=torch.float32)
    slash = torch.empty_like(vertical)
    kv_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, b * g * last_q * sk))
    for h0 in range(0, hkv, kv_per_chunk):
        h1 = min(hkv, h0 + kv_per_chunk)
        p = _last_q_probs(q[:, h0 * g : h1 * g], k[:, h0:h1], last_q, scale, causal).flatten(1, 2)
        vertical[:, h0 * g : h1 * g] = p.sum(-2)
        slash[:, h0 * g : h1 * g] = diagonal_sums(p.flatten(0, 1)).unflatten(0, p.shape[:2])
    return vertical, slash


def vertical_slash_scores(q, k, *, last_q: int, scale: float, causal: bool = True, backend: str = "auto"):
    """Attention mass of the last `last_q` queries per key column and per diagonal offset:
    (vertical, slash), float32 [B, Hq, Sk] each. backend: "triton" (fused, no last_q x Sk tensor; CUDA, or
    the interpreter), "torch" (chunked over kv heads), or "auto" (triton on CUDA, torch elsewhere)."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "triton":
        from .scores_triton import vertical_slash_scores_triton

        return vertical_slash_scores_triton(q, k, last_q, scale, causal)
    return _scores_torch(q, k, last_q, scale, causal)


def _topk_padded(scores: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Per head the top sizes[h] ids of scores [B, H, N], padded to max(sizes) by repeating the best id,
    sorted ascending. int32 [B, H, max(sizes)]."""
    width = int(sizes.max())
    uniform = bool((sizes == width).all())
    # With one budget for all heads the order of the top-k does not matter: skip sorting by score.
    ids = torch.topk(scores, width, dim=-1, sorted=not uniform).indices
    if not uniform:
        extra = torch.arange(width, device=ids.device) >= sizes.to(ids.device)[:, None]  # [H, width]
        ids = torch.where(extra, ids[..., :1], ids)
    return ids.sort(dim=-1).values.to(torch.int32)


def estimate_vertical_slash(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    vertical_size: PerHead = 1000,
    slash_size: PerHead = 6096,
    last_q: int = 64,
    causal: bool = True,
    scale: Optional[float] = None,
    backend: str = "auto",
    share_heads: int = 1,
):
    """Choose vertical key columns and slash diagonals per query head (or per run of query heads).

    q [B, Hq, Sq, D], k [B, Hkv, Sk, D] (GQA: Hq a multiple of Hkv; k is never repeated).
    vertical_size / slash_size: an int or one per query head; clipped to seqlen_k.
    Returns a VerticalSlashChoice (vertical_indices, slash_indices): int32 [B, Hq, max vertical_size] key
    ids and int32 [B, Hq, max slash_size] diagonal offsets, each sorted ascending. A head whose budget is
    below the maximum repeats its best-scoring id (the first forced column / the main diagonal) to fill the
    row, so duplicates may appear and mean nothing more. backend: see vertical_slash_scores.

    share_heads = n > 1: one choice per run of n consecutive query heads of a GQA group (n must divide
    Hq / Hkv), from the sum of the run's scores; the budgets must be equal within a run. Returns
    [B, Hq / n, ...]; dispatch.build_pattern turns them into a layout with shared_heads=n (built per query
    head from the repeated choices; `VerticalSlashLayout.repeat_heads` gives the same from a per-run
    index): the attention kernel then serves two heads from one stream of K/V tiles. Each head keeps the
    same number of entries, but chosen for the run, so a head's recall can only fall where the run's heads
    disagree.
    """
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    scale = d ** -0.5 if scale is None else float(scale)
    last_q = max(1, min(int(last_q), sq, sk))
    nv = per_head("vertical_size", vertical_size, hq, minimum=1).clamp(max=sk)
    ns = per_head("slash_size", slash_size, hq, minimum=1).clamp(max=sk)
    n = check_share_heads(share_heads, hq, k.shape[1])
    if n > 1:
        for name, sizes in (("vertical_size", nv), ("slash_size", ns)):
            runs = sizes.view(-1, n)
            if not bool((runs == runs[:, :1]).all()):
                raise ValueError(f"{name}: with share_heads={n} every run of {n} heads needs one budget, "
                                 f"got {sizes.tolist()}")
        nv, ns = nv[::n], ns[::n]
    v_scores, s_scores = vertical_slash_scores(q, k, last_q=last_q, scale=scale, causal=causal, backend=backend)
    if n > 1:
        v_scores = v_scores.unflatten(1, (hq // n, n)).sum(2)
        s_scores = s_scores.unflatten(1, (hq // n, n)).sum(2)
    ceiling = float(last_q * n)  # no score exceeds it: each of n heads' last_q rows sums to 1
    if v_scores.is_cuda or backend == "triton":  # one launch instead of the forcing, top-k and sort below
        from .topk_triton import topk_ids_sorted

        ids = topk_ids_sorted((v_scores, s_scores), (nv, ns), (FORCED_COLUMNS, FORCED_SLASHES), ceiling)
        return VerticalSlashChoice(*ids)
    _forced(v_scores, FORCED_COLUMNS, ceiling)
    _forced(s_scores, FORCED_SLASHES, ceiling)
    return VerticalSlashChoice(_topk_padded(v_scores, nv), _topk_padded(s_scores, ns))
