"""Triton kernels of rule 3 (the vertical-slash heads' columns and diagonals), without sorting:

- `_vs_select_kernel`, one program per (sequence, head): the gamma rule over the one ranked list of columns
  and diagonals (column j is entry j, diagonal o entry Sk + o; column 0 and the window of diagonals 0 .. W - 1
  kept first), by the bisection with snapped ends that the query-aware side uses (probs_triton.py), then the
  top-up to min_budget columns by a count bisection over the columns alone. It stores per row the threshold
  and the tie quota of each kind, how many ids each keeps and how many diagonals come first whatever their
  mass, and raises the widest row of each kind in `stats`.
- `_vs_write_kernel`, after one read of those widths: each row's kept ids in ascending order, behind the
  padding (copies of id 0, the forced column / the main diagonal), from a running count: no sort.

Ties at the threshold go, in the ranked list's order, to the lower entry: columns before diagonals, lower ids
first. Heads flagged query-aware keep only column 0 and diagonal 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton import INTERPRETED  # noqa: F401  (importing it applies the interpreter fix)

__all__ = ["vertical_slash_select_triton", "vertical_slash_write_triton"]

_BT = 2048  # entries per tile
_CAP = 4096  # candidates a search keeps in registers once its bracket holds no more
_WARPS = 8


@triton.jit
def _tile(X, j, n, length, first):
    """Masses of ids j (the sums divided by the number of last queries) and which are candidates (the ids from
    `first` on; the lower ones are kept whatever their mass)."""
    x = tl.load(X + j, mask=j < n, other=0.0) / length
    return x, (j >= first) & (j < n)


@triton.jit
def _step(x, cand, v, lo_v, hi_v, acc, up, down, n_low, n_high, BY_MASS: tl.constexpr):
    """One tile of a bisection pass at v: the mass (or count) at or above v, the nearest values on either
    side of v, and how many candidates fall in [lo_v, v) and in [v, hi_v]."""
    ge = cand & (x >= v)
    if BY_MASS:
        acc += tl.where(ge, x, 0.0)
    else:
        acc += ge.to(tl.float32)
    up = tl.minimum(up, tl.where(ge, x, 2.0))
    down = tl.maximum(down, tl.where(cand & (x < v), x, -1.0))
    n_low += (cand & (x >= lo_v) & (x < v)).to(tl.int32)
    n_high += (ge & (x <= hi_v)).to(tl.int32)
    return acc, up, down, n_low, n_high


@triton.jit
def _bisect(V, S, BUF, n, window, length, lo, hi, goal, first, BY_MASS: tl.constexpr, WITH_S: tl.constexpr,
            BT: tl.constexpr, CAP: tl.constexpr):
    """The largest candidate value v in [lo, hi] (float bits of two candidate values) with mass(c >= v) >= goal
    (BY_MASS) or count(c >= v) >= goal, over the columns from 1 (and the diagonals from `window`: WITH_S); ends
    snap to values.
    Passes over the whole row while the bracket holds more than CAP candidates; then one pass copies those
    to BUF (CAP floats of this row) and takes the mass above the bracket, and the rest runs in registers.
    The first step tries `first` (float bits) where it lies in (lo, hi]."""
    n_in = tl.full((), CAP + 1, tl.int32)
    mid = tl.where((first > lo) & (first <= hi), first, lo + (hi - lo + 1) // 2)
    while (lo < hi) & (n_in > CAP):
        v = mid.to(tl.float32, bitcast=True)
        lo_v = lo.to(tl.float32, bitcast=True)
        hi_v = hi.to(tl.float32, bitcast=True)
        acc = tl.zeros([BT], tl.float32)
        up = tl.full([BT], 2.0, tl.float32)
        down = tl.full([BT], -1.0, tl.float32)
        n_low = tl.zeros([BT], tl.int32)
        n_high = tl.zeros([BT], tl.int32)
        for j0 in range(0, n, BT):
            j = j0 + tl.arange(0, BT)
            x, cand = _tile(V, j, n, length, 1)
            acc, up, down, n_low, n_high = _step(x, cand, v, lo_v, hi_v, acc, up, down, n_low, n_high, BY_MASS)
            if WITH_S:
                x, cand = _tile(S, j, n, length, window)
                acc, up, down, n_low, n_high = _step(x, cand, v, lo_v, hi_v, acc, up, down, n_low, n_high, BY_MASS)
        ok = tl.sum(acc, 0) >= goal
        lo = tl.where(ok, tl.min(up, 0).to(tl.int32, bitcast=True), lo)
        hi = tl.where(ok, hi, tl.max(down, 0).to(tl.int32, bitcast=True))
        n_in = tl.where(ok, tl.sum(n_high, 0), tl.sum(n_low, 0))
        mid = lo + (hi - lo + 1) // 2
    if lo < hi:
        lo_v = lo.to(tl.float32, bitcast=True)
        hi_v = hi.to(tl.float32, bitcast=True)
        above = tl.zeros([BT], tl.float32)
        taken = 0
        tl.debug_barrier()  # BUF may still be read by a previous search
        for j0 in range(0, n, BT):
            j = j0 + tl.arange(0, BT)
            x, cand = _tile(V, j, n, length, 1)
            above, taken = _gather(x, cand, lo_v, hi_v, above, taken, BUF, BY_MASS, CAP)
            if WITH_S:
                x, cand = _tile(S, j, n, length, window)
                above, taken = _gather(x, cand, lo_v, hi_v, above, taken, BUF, BY_MASS, CAP)
        tl.debug_barrier()  # the copies, written by every thread, are read by every thread
        c = tl.arange(0, CAP)
        inside = c < taken
        buf = tl.load(BUF + c, mask=inside, other=-1.0)
        above = tl.sum(above, 0)
        while lo < hi:
            mid = lo + (hi - lo + 1) // 2
            v = mid.to(tl.float32, bitcast=True)
            ge = inside & (buf >= v)
            if BY_MASS:
                ok = above + tl.sum(tl.where(ge, buf, 0.0), 0) >= goal
            else:
                ok = above + tl.sum(ge.to(tl.float32), 0) >= goal
            lo = tl.where(ok, tl.min(tl.where(ge, buf, 2.0), 0).to(tl.int32, bitcast=True), lo)
            hi = tl.where(ok, hi, tl.max(tl.where(inside & (buf < v), buf, -1.0), 0).to(tl.int32, bitcast=True))
    return lo


@triton.jit
def _gather(x, cand, lo_v, hi_v, above, taken, BUF, BY_MASS: tl.constexpr, CAP: tl.constexpr):
    """Append the tile's candidates in [lo_v, hi_v] to BUF; add its mass (or count) above hi_v."""
    if BY_MASS:
        above += tl.where(cand & (x > hi_v), x, 0.0)
    else:
        above += (cand & (x > hi_v)).to(tl.float32)
    inside = (cand & (x >= lo_v) & (x <= hi_v)).to(tl.int32)
    slot = taken + tl.cumsum(inside, 0) - 1
    tl.store(BUF + slot, x, mask=(inside != 0) & (slot < CAP))
    return above, taken + tl.sum(inside, 0)


@triton.jit(do_not_specialize=("n", "length", "window", "min_cols"))
def _vs_select_kernel(V, S, GAMMA, QA, THR, CNT, STATS, BUF, n, length, num_heads, window, min_cols,
                      BT: tl.constexpr, CAP: tl.constexpr):
    row = tl.program_id(0)
    vrow = V + row.to(tl.int64) * n
    srow = S + row.to(tl.int64) * n
    buf = BUF + row.to(tl.int64) * CAP
    gamma = tl.load(GAMMA + row % num_heads)
    # per kind: threshold, tie quota, ids kept; query-aware heads keep the forced ids only
    t_col = tl.full((), 2.0, tl.float32)
    t_slash = tl.full((), 2.0, tl.float32)
    q_col = tl.zeros((), tl.int32)
    q_slash = tl.zeros((), tl.int32)
    n_col = tl.full((), 1, tl.int32)
    n_slash = tl.full((), 1, tl.int32)
    forced_slash = tl.full((), 1, tl.int32)
    if tl.load(QA + row) == 0:
        forced_slash = forced_slash * window
        n_slash = forced_slash
        total = tl.zeros([BT], tl.float32)
        forced = tl.zeros([BT], tl.float32)
        c_min = tl.full([BT], 2.0, tl.float32)
        c_max = tl.full([BT], -1.0, tl.float32)
        col_min = tl.full([BT], 2.0, tl.float32)
        col_max = tl.full([BT], -1.0, tl.float32)
        for j0 in range(0, n, BT):
            j = j0 + tl.arange(0, BT)
            x, cand = _tile(vrow, j, n, length, 1)
            y, cand_s = _tile(srow, j, n, length, window)
            total += tl.where(cand, x, 0.0) + tl.where(cand_s, y, 0.0)
            forced += tl.where((j < window) & (j < n), y, 0.0)
            col_min = tl.minimum(col_min, tl.where(cand, x, 2.0))
            col_max = tl.maximum(col_max, tl.where(cand, x, -1.0))
            c_min = tl.minimum(c_min, tl.where(cand_s, y, 2.0))
            c_max = tl.maximum(c_max, tl.where(cand_s, y, -1.0))
        need = gamma - (tl.load(vrow) / length + tl.sum(forced, 0))
        total = tl.sum(total, 0)
        col_lo = tl.min(col_min, 0).to(tl.int32, bitcast=True)
        col_hi = tl.max(col_max, 0).to(tl.int32, bitcast=True)
        if (gamma >= 1) | (total < need):  # every column and diagonal
            t_col = tl.full((), -1.0, tl.float32)
            t_slash = tl.full((), -1.0, tl.float32)
            n_col = tl.full((), 1, tl.int32) * n
            n_slash = tl.full((), 1, tl.int32) * n
        elif (need > 0) & (n > 1):
            lo = tl.minimum(tl.min(c_min, 0), tl.min(col_min, 0)).to(tl.int32, bitcast=True)
            hi = tl.maximum(tl.max(c_max, 0), tl.max(col_max, 0)).to(tl.int32, bitcast=True)
            # below (total - need) / candidates no value can be the threshold: the first step tries it
            floor = ((total - need) / (2 * n - 1 - window)).to(tl.int32, bitcast=True)
            t = _bisect(vrow, srow, buf, n, window, length, lo, hi, need, floor, True, True, BT,
                        CAP).to(tl.float32, bitcast=True)
            mass = tl.zeros([BT], tl.float32)
            above_c = tl.zeros([BT], tl.int32)
            above_s = tl.zeros([BT], tl.int32)
            tie_c = tl.zeros([BT], tl.int32)
            tie_s = tl.zeros([BT], tl.int32)
            for j0 in range(0, n, BT):
                j = j0 + tl.arange(0, BT)
                x, cand = _tile(vrow, j, n, length, 1)
                y, cand_s = _tile(srow, j, n, length, window)
                mass += tl.where(cand & (x > t), x, 0.0) + tl.where(cand_s & (y > t), y, 0.0)
                above_c += (cand & (x > t)).to(tl.int32)
                above_s += (cand_s & (y > t)).to(tl.int32)
                tie_c += (cand & (x == t)).to(tl.int32)
                tie_s += (cand_s & (y == t)).to(tl.int32)
            n_tie_c = tl.sum(tie_c, 0)
            # ties at t, columns first, are taken one by one while the kept mass is below need
            ties = tl.minimum(tl.ceil((need - tl.sum(mass, 0)) / t), 1e9).to(tl.int32)
            ties = tl.minimum(tl.maximum(ties, 1), n_tie_c + tl.sum(tie_s, 0))
            t_col = t
            t_slash = t
            q_col = tl.minimum(ties, n_tie_c)
            q_slash = ties - q_col
            n_col = 1 + tl.sum(above_c, 0) + q_col
            n_slash = forced_slash + tl.sum(above_s, 0) + q_slash
        # the top-up: the best columns (ties: lower id), until there are min_cols
        if min_cols > n_col:
            hi2 = tl.where(t_col <= 1.0, tl.minimum(t_col.to(tl.int32, bitcast=True), col_hi), col_hi)
            t2 = _bisect(vrow, srow, buf, n, window, length, col_lo, hi2, (min_cols - 1).to(tl.float32), col_lo, False,
                         False, BT, CAP).to(tl.float32, bitcast=True)
            above = tl.zeros([BT], tl.int32)
            for j0 in range(0, n, BT):
                x, cand = _tile(vrow, j0 + tl.arange(0, BT), n, length, 1)
                above += (cand & (x > t2)).to(tl.int32)
            t_col = t2
            q_col = min_cols - 1 - tl.sum(above, 0)
            n_col = min_cols
    tl.store(THR + row * 2, t_col)
    tl.store(THR + row * 2 + 1, t_slash)
    tl.store(CNT + row * 5, q_col)
    tl.store(CNT + row * 5 + 1, n_col)
    tl.store(CNT + row * 5 + 2, q_slash)
    tl.store(CNT + row * 5 + 3, n_slash)
    tl.store(CNT + row * 5 + 4, forced_slash)
    tl.atomic_max(STATS + 1, n_col)
    tl.atomic_max(STATS + 2, n_slash)


@triton.jit
def _write_ids(X, OUT, n, length, t, quota, kept, width, first, BT: tl.constexpr):
    """Padding (width - kept zeros), then the kept ids ascending: the ids below `first`, the ids above t, and
    the first `quota` ids equal to t."""
    pad = width - kept
    for p0 in range(0, pad, BT):
        p = p0 + tl.arange(0, BT)
        tl.store(OUT + p, tl.zeros([BT], tl.int32), mask=p < pad)
    taken = pad
    ties_seen = 0
    for j0 in range(0, n, BT):
        j = j0 + tl.arange(0, BT)
        x, cand = _tile(X, j, n, length, first)
        tie = (cand & (x == t)).to(tl.int32)
        keep = ((j < first) & (j < n)) | (cand & (x > t)) | ((tie != 0) & (ties_seen + tl.cumsum(tie, 0) <= quota))
        keep = keep.to(tl.int32)
        tl.store(OUT + taken + tl.cumsum(keep, 0) - 1, j, mask=keep != 0)
        taken += tl.sum(keep, 0)
        ties_seen += tl.sum(tie, 0)


@triton.jit(do_not_specialize=("n", "length", "width_c", "width_s"))
def _vs_write_kernel(V, S, THR, CNT, COLS, SLASHES, n, length, width_c, width_s, BT: tl.constexpr):
    row = tl.program_id(0)
    kind = tl.program_id(1)
    if kind == 0:
        _write_ids(V + row.to(tl.int64) * n, COLS + row.to(tl.int64) * width_c, n, length, tl.load(THR + row * 2),
                   tl.load(CNT + row * 5), tl.load(CNT + row * 5 + 1), width_c, 1, BT)
    else:
        _write_ids(S + row.to(tl.int64) * n, SLASHES + row.to(tl.int64) * width_s, n, length,
                   tl.load(THR + row * 2 + 1), tl.load(CNT + row * 5 + 2), tl.load(CNT + row * 5 + 3), width_s,
                   tl.load(CNT + row * 5 + 4), BT)


def vertical_slash_select_triton(column_sums: torch.Tensor, slash_sums: torch.Tensor, length: int,
                                 gamma: torch.Tensor, flag: torch.Tensor, stats: torch.Tensor, *, min_budget: int):
    """Rule 3 per (sequence, head) of column_sums / slash_sums (float32 [B, Hq, Sk], the last `length` queries'
    sums), gamma float32 [Hq]; rows with flag (int8 [B, Hq]) 1 keep only the forced ids. Returns the per-row
    plan for vertical_slash_write_triton; stats[1] / stats[2] (int32) are raised to the widest row's columns
    / diagonals."""
    b, h, n = column_sums.shape
    thr = torch.empty(b * h, 2, dtype=torch.float32, device=column_sums.device)
    cnt = torch.empty(b * h, 5, dtype=torch.int32, device=column_sums.device)
    v, s = column_sums.contiguous(), slash_sums.contiguous()
    buf = torch.empty(b * h, _CAP, dtype=torch.float32, device=column_sums.device)
    window, min_cols = max(1, min(min_budget, n)), min(min_budget, n)
    _vs_select_kernel[(b * h,)](v, s, gamma, flag, thr, cnt, stats, buf, n, length, h, window, min_cols, BT=_BT,
                                CAP=_CAP, num_warps=_WARPS)
    return v, s, thr, cnt


def vertical_slash_write_triton(plan, length: int, width_c: int, width_s: int):
    """(columns int32 [B, Hq, width_c], slashes int32 [B, Hq, width_s]): each row's kept ids ascending, padded in
    front with copies of id 0 (the widths: the stats of vertical_slash_select_triton)."""
    v, s, thr, cnt = plan
    b, h, n = v.shape
    cols = torch.empty(b, h, width_c, dtype=torch.int32, device=v.device)
    slashes = torch.empty(b, h, width_s, dtype=torch.int32, device=v.device)
    _vs_write_kernel[(b * h, 2)](v, s, thr, cnt, cols, slashes, n, length, width_c, width_s, BT=_BT, num_warps=_WARPS)
    return cols, slashes
