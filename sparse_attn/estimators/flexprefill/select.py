"""FlexPrefill's rules: per (sequence, head) the choice between query-aware and vertical-slash, the two
selections, and the one VerticalSlashLayout that holds both.

Notation: bs = block_size, nk = ceil(Sk / bs), off = Sk - Sq (bottom-right causal: row i sees keys
j <= i + off), L = min(bs, Sq, Sk) the last queries, p the softmax of those L rows against every key.

1. Decision, from the last L queries. True block distribution: t[j] = sum over the L rows of p in key
   block j, divided by L. Pooled distribution: softmax over all key blocks of (mean of the L queries) .
   (mean of key block j) * scale. The head is query-aware when JSD(pooled, t) < tau (Jensen-Shannon
   divergence, natural log: 0 <= JSD <= ln 2), else vertical-slash.
2. Query-aware: per query block, P = softmax of its pooled query against the pooled key blocks it sees
   (j * bs <= its last row + off). The first and the diagonal (last visible) block are kept; the other
   visible blocks are taken by decreasing P (ties: lower block id first) while the kept P is below gamma
   (gamma >= 1: every visible block), then topped up in the same order to at least
   ceil(min_budget / bs) blocks (or every visible one); min_budget defaults to 1024 (FlexPrefill's own runs).
3. Vertical-slash: column mass v[j] = sum of p over the L rows in column j, slash mass s[o] = sum of p
   over the pairs on diagonal o (j = i + off - o), both divided by L (each sums to 1). Columns and
   diagonals are ranked together, one list of 2 Sk entries (column j, then diagonal o at Sk + o). Column 0
   and the W = max(1, min(min_budget, Sk)) nearest diagonals 0 .. W - 1 (a local window) are kept; the
   others are taken by decreasing mass (ties: lower entry) while the kept mass is below gamma. Then, while
   there are fewer than min(min_budget, Sk) columns, the next best column is added (by decreasing v, ties:
   lower id). The estimated mass of a set is the sum of its members' (a column and a diagonal share one
   pair per row at most): ranked together, a head whose mass sits in a few columns takes those and no
   diagonals, where two separate lists would each have to reach gamma and the diagonals would cover the
   columns' mass a second time. The two floors, as FlexPrefill's own runs keep min_budget keys of columns
   and of diagonals: the best columns hold keys every row attends to that the last queries' gamma set
   left out; the window holds each row's neighbourhood, which the last queries' diagonals often miss for
   earlier rows. The window is one range of W keys a row, the columns one key each.
4. Layout: query-aware heads' blocks become key ranges (runs of consecutive blocks merged) with no
   columns; vertical-slash heads' columns and diagonals go through the vertical-slash index builder.

Why one VerticalSlashLayout for both kinds of heads: a layout type is one kernel launch, and a range
list holds any block set exactly (a block is the range [j * bs, (j + 1) * bs)), while a block layout
would round every chosen column up to a whole key block (64 x the work on scattered-key heads, the
heads this rule exists for). Splitting the heads into two launches of two kernel families would cost
a gather of the query heads and a second launch per layer for no saved work.

Two paths choose the same: the rules as torch statements here (the reference; the CPU), and on the GPU
(or the interpreter) Triton kernels with no torch work between them (_choice_triton: probs_triton.py for
the pooling, the decision and the fused query-aware side, vs_triton.py for rule 3; no sort, one device
sync for the output widths). Ties and float sums: both follow the rule above; the sums' rounding may differ.

Memory: the torch path makes the pooled probabilities a band of query blocks at a time (_CHUNK_ELEMENTS),
the Triton path one band of 16 query blocks per program in a scratch; nothing is Sq x Sk.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..block_sparse import pool_blocks
from ..vertical_slash import build_vertical_slash_index, vertical_slash_scores
from ...layouts import VerticalSlashLayout

__all__ = ["FlexChoice", "BLOCK_SIZES", "check_budgets", "last_block_scores", "decide_query_aware",
           "pooled_block_probs", "take_until", "keep_mask", "mask_ranges", "select_query_aware",
           "select_vertical_slash", "flexprefill_choice", "flexprefill_layout"]

# The vertical-slash kernel's query block sizes (the layout's block size is this pattern's block size).
BLOCK_SIZES = (16, 32, 64, 128)
# Keys per row kept at least when min_budget is None: what FlexPrefill's published runs use at every length
# (on SmolLM2 at 4K, Sk // 32 = 128 kept 9 % of the entries and 75 % top-1 agreement; 1024: 22 % and 87 %).
DEFAULT_MIN_BUDGET = 1024
# Elements of one band of pooled probabilities (float32): 2**26 is 256 MiB.
_CHUNK_ELEMENTS = 1 << 26
# Range slots (int32, starts and ends each) the Triton path writes before it knows the widest row: 64 MiB.
_RANGE_ELEMENTS = 1 << 24


class FlexChoice(NamedTuple):
    """What the estimator decides (the index builder turns it into a layout).

    query_aware: bool [B, Hq]. range_counts int32 [B, Hq, nq], range_starts / range_ends int32
    [B, Hq, nq, R]: the kept key blocks of each query block as key ranges (runs of blocks; query-aware
    heads, other heads have none). columns / slashes: int32 [B, Hq, NV] / [B, Hq, NS] kept column ids /
    diagonal offsets, ascending, padded with repeats of the first entry (vertical-slash heads; query-aware
    heads hold column 0 and diagonal 0)."""

    query_aware: torch.Tensor
    range_counts: torch.Tensor
    range_starts: torch.Tensor
    range_ends: torch.Tensor
    columns: torch.Tensor
    slashes: torch.Tensor


def check_budgets(gamma, tau, block_size, min_budget) -> None:
    g = torch.as_tensor(gamma, dtype=torch.float64)
    t = torch.as_tensor(tau, dtype=torch.float64)
    if not bool(((g > 0) & (g <= 1)).all()):
        raise ValueError(f"gamma: expected values in (0, 1], got {g.tolist()}")
    if not bool(((t >= 0) & torch.isfinite(t)).all()):
        raise ValueError(f"tau: expected finite values >= 0, got {t.tolist()}")
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size: expected one of {BLOCK_SIZES} (the vertical-slash kernel's), got {block_size!r}")
    if isinstance(min_budget, bool) or not isinstance(min_budget, int) or min_budget < 0:
        raise ValueError(f"min_budget: expected an int >= 0, got {min_budget!r}")


def _per_head(name: str, value, heads: int, device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).flatten().cpu()
    if t.numel() == 1:
        t = t.expand(heads)
    if t.numel() != heads:
        raise ValueError(f"{name}: expected a float or {heads} values (one per query head), got {t.numel()}")
    return t.to(device=device, dtype=torch.float32)


def last_block_scores(q, k, *, block_size: int, scale: float, backend: str = "auto"):
    """(column mass, slash mass) float32 [B, Hq, Sk] of the last L queries, each row summing to 1."""
    length = max(1, min(block_size, q.shape[2], k.shape[2]))
    v, s = vertical_slash_scores(q, k, last_q=length, scale=scale, causal=True, backend=backend)
    return v / length, s / length


def decide_query_aware(q, k, column_mass: torch.Tensor, tau: torch.Tensor, *, block_size: int,
                       scale: float) -> torch.Tensor:
    """bool [B, Hq]: JSD(pooled, true block distribution of the last queries) < tau (rule 1)."""
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    length = max(1, min(block_size, sq, sk))
    nk = -(-sk // block_size)
    true = F.pad(column_mass, (0, nk * block_size - sk)).unflatten(-1, (nk, block_size)).sum(-1).double()
    qm = q[:, :, sq - length:].float().mean(2).unflatten(1, (hkv, hq // hkv))  # [B, Hkv, g, D]
    kp = pool_blocks(k, block_size)  # float32 [B, Hkv, nk, D]
    pooled = torch.softmax(torch.matmul(qm, kp.transpose(-1, -2)).flatten(1, 2).double() * scale, -1)
    true = true / true.sum(-1, keepdim=True).clamp(min=1e-30)
    mid = (pooled + true) / 2

    def kl(a):
        return torch.where(a > 0, a * (a.clamp(min=1e-300).log() - mid.clamp(min=1e-300).log()), 0.0).sum(-1)

    jsd = 0.5 * kl(pooled) + 0.5 * kl(true)
    return jsd < tau.to(jsd.device).double()


def pooled_block_probs(qp, kp, kv_of, row0: int, row1: int, *, block_size: int, seqlen_q: int, seqlen_k: int,
                       scale: float) -> torch.Tensor:
    """float32 [B, H, row1 - row0, nk]: per query block the softmax of its pooled query against the pooled
    key blocks it sees (rule 2's P). qp [B, H, nq, D], kp [B, Hkv, nk, D], kv_of: each head's kv head."""
    nk = kp.shape[2]
    kh = kp.index_select(1, kv_of.to(kp.device))
    s = torch.matmul(qp[:, :, row0:row1].float(), kh.float().transpose(-1, -2)) * scale
    last = (torch.arange(row0, row1, device=qp.device) * block_size + block_size).clamp(max=seqlen_q) - 1
    visible = torch.arange(nk, device=qp.device)[None, :] * block_size <= last[:, None] + (seqlen_k - seqlen_q)
    return torch.softmax(s.masked_fill_(~visible, float("-inf")), -1).nan_to_num_(0.0)


def take_until(score: torch.Tensor, visible: torch.Tensor, forced: torch.Tensor, gamma: torch.Tensor,
               minimum) -> tuple:
    """The shared selection step over the last dim: forced entries, then the others by decreasing score
    (ties: lower index) while the kept score is below gamma (gamma >= 1: all visible), topped up to
    `minimum` entries (or all visible). gamma broadcasts against score[..., 0]. Returns (order, count):
    order int64 (kept entries first), count int64 [...]."""
    key = torch.where(forced, float("inf"), torch.where(visible, score, float("-inf")))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    vis = visible.expand_as(key)
    ranked_visible = torch.gather(vis, -1, order)
    ranked_forced = torch.gather(forced.expand_as(key), -1, order)
    mass = torch.gather(torch.where(vis, score, 0.0), -1, order).cumsum(-1)
    before = F.pad(mass[..., :-1], (1, 0))
    g = gamma.unsqueeze(-1)
    take = ranked_visible & ((before < g) | (g >= 1) | ranked_forced)
    n_visible = vis.sum(-1)
    count = torch.maximum(take.sum(-1), torch.minimum(torch.as_tensor(minimum, device=key.device), n_visible))
    return order, count


def keep_mask(p, visible, forced, gamma: torch.Tensor, minimum: int) -> torch.Tensor:
    """bool, p's shape: the entries take_until keeps (the torch statement of the rule)."""
    order, count = take_until(p, visible, forced, gamma, minimum)
    taken = torch.arange(p.shape[-1], device=p.device) < count.unsqueeze(-1)
    return torch.zeros(order.shape, dtype=torch.bool, device=p.device).scatter_(-1, order, taken)


def mask_ranges(keep: torch.Tensor, block_size: int, seqlen_k: int):
    """Runs of kept key blocks (bool [..., nk]) as key ranges: (counts int32 [...], starts, ends int32
    [..., R]), R the most runs of a row (one sync); no sort: each run's slot is a running count."""
    prev = F.pad(keep[..., :-1], (1, 0))
    nxt = F.pad(keep[..., 1:], (0, 1))
    first, last = keep & ~prev, keep & ~nxt
    counts = first.sum(-1, dtype=torch.int32)
    width = max(1, int(counts.max()))
    keys = torch.arange(keep.shape[-1], device=keep.device, dtype=torch.int32) * block_size
    out = []
    for flags, value in ((first, keys), (last, (keys + block_size).clamp(max=seqlen_k))):
        slot = torch.where(flags, flags.cumsum(-1, dtype=torch.int32) - 1, width).long()
        t = torch.zeros(*keep.shape[:-1], width + 1, dtype=torch.int32, device=keep.device)
        out.append(t.scatter_(-1, slot, value.expand_as(flags).contiguous())[..., :width])
    return counts, out[0], out[1]


def select_query_aware(qp, kp, kv_of, gamma: torch.Tensor, *, block_size: int, seqlen_q: int, seqlen_k: int,
                       scale: float, min_blocks: int):
    """Rule 2 for the heads of qp (gamma [H]) as take_until states it, as key ranges (see mask_ranges), a band
    of query blocks at a time (the torch path)."""
    b, h, nq, _ = qp.shape
    nk = kp.shape[2]
    blocks = torch.arange(nk, device=qp.device)
    rows = max(1, _CHUNK_ELEMENTS // max(1, b * h * nk))
    parts = []
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        p = pooled_block_probs(qp, kp, kv_of, r0, r1, block_size=block_size, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                               scale=scale)
        last = (torch.arange(r0, r1, device=qp.device) * block_size + block_size).clamp(max=seqlen_q) - 1
        last = last + (seqlen_k - seqlen_q)
        visible = blocks[None, :] * block_size <= last[:, None]
        diag = torch.div(last.clamp(min=0), block_size, rounding_mode="floor").clamp(max=nk - 1)
        forced = visible & ((blocks[None, :] == 0) | (blocks[None, :] == diag[:, None]))
        keep = keep_mask(p, visible, forced, gamma.view(1, h, 1), min_blocks)
        del p
        parts.append(mask_ranges(keep, block_size, seqlen_k))
    width = max(x[1].shape[-1] for x in parts)
    return (torch.cat([x[0] for x in parts], 2),
            torch.cat([_pad_last(x[1], width) for x in parts], 2),
            torch.cat([_pad_last(x[2], width) for x in parts], 2))


def select_vertical_slash(column_mass, slash_mass, gamma: torch.Tensor, *, min_budget: int):
    """Rule 3 (gamma [Hq]): (columns, slashes) int32 [B, Hq, N], ascending, padded with the first entry."""
    sk = column_mass.shape[-1]
    window = max(1, min(min_budget, sk))
    mass = torch.cat([column_mass, slash_mass], -1)  # entry sk + o is diagonal o
    idx = torch.arange(2 * sk, device=mass.device)
    forced = ((idx == 0) | ((idx >= sk) & (idx < sk + window))).expand_as(mass)
    order, count = take_until(mass, torch.ones_like(forced), forced, gamma.view(1, -1), 0)
    taken = torch.arange(2 * sk, device=mass.device) < count.unsqueeze(-1)
    n_slash = (taken & (order >= sk)).sum(-1)
    # The top-up: the best columns (the taken ones are the first of this order), to min_budget columns.
    n_cols = (count - n_slash).clamp(min=min(min_budget, sk))
    col_order, _ = take_until(column_mass, torch.ones_like(forced[..., :sk]), forced[..., :sk], gamma.new_zeros(1), 0)
    out = []
    for ids, n in ((col_order, n_cols), (torch.where(taken & (order >= sk), order - sk, sk), None)):
        if n is not None:
            ids = torch.where(torch.arange(sk, device=mass.device) < n.unsqueeze(-1), ids, sk)
        width = max(1, int((ids < sk).sum(-1).max()))
        ids = ids.sort(-1).values[..., :width]
        out.append(torch.where(ids < sk, ids, ids[..., :1]).sort(-1).values.to(torch.int32))
    return tuple(out)


def flexprefill_choice(q, k, gamma, tau, *, block_size: int = 64, min_budget: Optional[int] = None,
                       scale: Optional[float] = None, backend: str = "auto") -> FlexChoice:
    """Rules 1-3 (see the module docstring). q [B, Hq, Sq, D], k [B, Hkv, Sk, D] (GQA, never repeated);
    gamma, tau: a float or one per query head; min_budget: None is 1024. backend: "triton"
    (the fused kernels: CUDA or the interpreter), "torch" (the rules as torch statements), or "auto" (triton
    on CUDA)."""
    if min_budget is None:
        min_budget = DEFAULT_MIN_BUDGET
    check_budgets(gamma, tau, block_size, min_budget)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else float(scale)
    gamma = _per_head("gamma", gamma, hq, q.device)
    tau = _per_head("tau", tau, hq, q.device)
    if backend == "triton":
        return _choice_triton(q, k, gamma, tau, block_size=block_size, min_budget=min_budget, scale=scale)
    nq, nk = -(-sq // block_size), -(-sk // block_size)
    column_mass, slash_mass = last_block_scores(q, k, block_size=block_size, scale=scale, backend=backend)
    query_aware = decide_query_aware(q, k, column_mass, tau, block_size=block_size, scale=scale)
    heads = query_aware.any(0).nonzero().flatten().tolist()  # one sync: which heads need rule 2
    counts = torch.zeros(b, hq, nq, dtype=torch.int32, device=q.device)
    starts = ends = torch.zeros(b, hq, nq, 1, dtype=torch.int32, device=q.device)
    if heads:
        sel = torch.tensor(heads, device=q.device)
        # On the GPU the pooled scores run in q's dtype (tensor cores); the CPU keeps float32.
        cdt = q.dtype if q.is_cuda else torch.float32
        qp = pool_blocks(q, block_size).to(cdt)  # every head (small), no copy of q's selected heads
        qp = qp if len(heads) == hq else qp.index_select(1, sel)
        kp = pool_blocks(k, block_size).to(cdt)
        rc, rs, re = select_query_aware(qp, kp, sel // (hq // hkv), gamma[sel], block_size=block_size, seqlen_q=sq,
                                        seqlen_k=sk, scale=scale, min_blocks=-(-min_budget // block_size))
        counts[:, sel] = torch.where(query_aware[:, sel, None], rc, 0)
        starts = torch.zeros(b, hq, nq, rs.shape[-1], dtype=torch.int32, device=q.device)
        ends = torch.zeros_like(starts)
        starts[:, sel], ends[:, sel] = rs, re
    columns, slashes = select_vertical_slash(column_mass, slash_mass, gamma, min_budget=min_budget)
    qa = query_aware[..., None]
    columns, slashes = torch.where(qa, 0, columns), torch.where(qa, 0, slashes)
    return FlexChoice(query_aware, counts, starts, ends, columns, slashes)


def _choice_triton(q, k, gamma: torch.Tensor, tau: torch.Tensor, *, block_size: int, min_budget: int,
                   scale: float) -> FlexChoice:
    """Rules 1-3 by the Triton kernels, about ten launches and one device sync (the output widths): the last
    queries' column sums, the pooled keys, the decision, the diagonal sums of the other heads, the pooled
    queries of the query-aware heads, the fused query-aware selection, the vertical-slash selection, then the
    ids in order."""
    from ..vertical_slash.scores_triton import last_rows_lse, scores_from_lse
    from .probs_triton import decide_triton, pool_triton, query_aware_triton
    from .vs_triton import vertical_slash_select_triton, vertical_slash_write_triton

    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    # the kernels read rows of q and k through their strides, each row contiguous
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    length = max(1, min(block_size, sq, sk))
    # The last queries' column sums for every head; their diagonal sums (the scores' costly part) only for
    # the heads the decision leaves vertical-slash.
    lse = last_rows_lse(q, k, length, scale, True)
    v, _ = scores_from_lse(q, k, lse, length, scale, True, slashes=False)
    kp = pool_triton(k, block_size)
    flag = decide_triton(q, kp, v, tau, block_size=block_size, length=length, scale=scale)
    _, s = scores_from_lse(q, k, lse, length, scale, True, columns=False, skip=flag)
    qp = pool_triton(q, block_size, flag)
    nq, nk = -(-sq // block_size), -(-sk // block_size)
    stats = torch.zeros(3, dtype=torch.int32, device=q.device)  # most runs, columns, diagonals of a row
    # On the GPU the pooled scores run in q's dtype (tensor cores); the CPU keeps float32.
    qa_args = dict(block_size=block_size, seqlen_q=sq, seqlen_k=sk, scale=scale,
                   min_blocks=-(-min_budget // block_size), dtype=q.dtype if q.is_cuda else torch.float32)
    # Ranges are written up to a width that holds most rows (the output would need a sync first).
    width = max(1, min((nk + 1) // 2, _RANGE_ELEMENTS // (b * hq * nq)))
    counts, starts, ends = query_aware_triton(qp, kp, gamma, flag, stats, width=width, **qa_args)
    plan = vertical_slash_select_triton(v, s, length, gamma, flag, stats, min_budget=min_budget)
    runs, width_c, width_s = stats.tolist()  # the one sync
    if runs > width:  # a row with more runs: again, wide enough
        counts, starts, ends = query_aware_triton(qp, kp, gamma, flag, stats, width=runs, **qa_args)
    columns, slashes = vertical_slash_write_triton(plan, length, width_c, width_s)
    runs = max(1, runs)
    return FlexChoice(flag.view(torch.bool), counts, starts[..., :runs], ends[..., :runs], columns, slashes)


def _pad_last(t: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(t, (0, width - t.shape[-1]))


def flexprefill_layout(choice: FlexChoice, seqlen_q: int, seqlen_k: int, *, block_size: int = 64,
                       backend: str = "auto") -> VerticalSlashLayout:
    """Rule 4: the choice as one VerticalSlashLayout over every head. backend: the vertical-slash index
    builder's ("auto", "torch", "triton", "cuda")."""
    some, every = torch.stack([choice.query_aware.any(), choice.query_aware.all()]).tolist()  # one sync
    if every:  # the ranges alone: no vertical-slash index to build and discard
        none = torch.zeros(choice.range_counts.shape, dtype=torch.int32, device=choice.range_counts.device)
        return VerticalSlashLayout(choice.range_counts.to(torch.int32).contiguous(), choice.range_starts.contiguous(),
                                   choice.range_ends.contiguous(), none, none[..., None], block_size, seqlen_q,
                                   seqlen_k, validate=False)
    vs = build_vertical_slash_index(choice.columns, choice.slashes, seqlen_q, seqlen_k, block_size_q=block_size,
                                    backend=backend, assume_sorted=True)
    qa = choice.query_aware[..., None]
    if not some:
        return vs
    rc, rs, re = choice.range_counts, choice.range_starts, choice.range_ends
    width = max(rs.shape[-1], vs.max_ranges)
    range_counts = torch.where(qa, rc, vs.range_counts)
    starts = torch.where(qa[..., None], _pad_last(rs, width), _pad_last(vs.range_starts, width))
    ends = torch.where(qa[..., None], _pad_last(re, width), _pad_last(vs.range_ends, width))
    column_counts = torch.where(qa, 0, vs.column_counts)
    return VerticalSlashLayout(range_counts.to(torch.int32).contiguous(), starts.contiguous(), ends.contiguous(),
                               column_counts.to(torch.int32).contiguous(), vs.column_indices, block_size, seqlen_q,
                               seqlen_k, validate=False)
