"""Vertical-slash sparse index: from chosen key columns ("verticals") and diagonals ("slashes") to a
VerticalSlashLayout, per (batch, query head, query block).

Definition, for query block [q0, q1) and off = seqlen_k - seqlen_q:
- diagonal o covers keys [q0 + off - o, q1 + off - o), clipped to [0, seqlen_k); empty ones are dropped;
  the block's ranges are the union of its diagonals, merged (overlapping or touching) and sorted;
- its columns are the vertical ids, sorted and unique, that no range holds and that some row of the
  block sees causally (j <= q1 - 1 + off).

How it is computed, without any per-block sorting: every diagonal's range has the block's width w, so
with the offsets sorted descending two neighbours merge exactly when their gap is <= w. The groups
("runs") of merged offsets are therefore the same for every block of one width: only the full width and
the last, shorter block occur. A block's ranges are those runs shifted by q0 + off, minus the leading
runs that end at or before key 0. A column j lies in a range exactly when some offset falls in
[d, d + w) with d = q0 + off - j: a table over d per width (from a prefix count over offsets), so each
(block, column) costs one byte read.

The per-head work (sort, runs, the covered tables) is `_prepare` in torch for the "torch" backend and
`_prepare_triton` (the two sorts, then one Triton launch) otherwise, O(heads x (NS + seqlen_k log NS));
the per-block work (the whole output) is done by one of three interchangeable backends: "torch" (the
reference), "triton" and "cuda" (csrc/vertical_slash_index.cu). All three give identical layouts;
entries past the counts are unspecified.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..._checks import check_positive_int, check_tensor
from ...layouts import VerticalSlashLayout
from ..._triton import count_below

__all__ = ["build_vertical_slash_index", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton", "cuda")
_IDS = (torch.int32, torch.int64)
_PAD = -(1 << 30)  # run-table padding: below every offset, so -run_lo stays ascending past the runs
_PAD_C = tl.constexpr(_PAD)


@dataclass
class _Tables:
    """Per-head tables shared by the backends. Class 0 = full blocks, class 1 = the last block."""

    run_hi: torch.Tensor  # int32 [2, B, H, NS] largest offset of each run (descending runs)
    run_lo: torch.Tensor  # int32 [2, B, H, NS] smallest offset of each run
    run_count: torch.Tensor  # int32 [2, B, H]
    covered: torch.Tensor  # uint8 [2, B, H, seqlen_k + BQ]: at d + BQ - 1, is some offset in [d, d + width)
    verticals: torch.Tensor  # int32 [B, H, NV] sorted ascending (repeats kept)
    max_ranges: int
    max_columns: int


def _check_inputs(vertical, slash, seqlen_q, seqlen_k, block_size_q, backend):
    check_tensor("vertical_indices", vertical, ndim=3, dtypes=_IDS)
    check_tensor("slash_indices", slash, ndim=3, dtypes=_IDS, device=vertical.device)
    if vertical.shape[:2] != slash.shape[:2]:
        raise ValueError(
            f"slash_indices: expected leading shape [batch, heads] = {tuple(vertical.shape[:2])} "
            f"(that of vertical_indices), got {tuple(slash.shape)}"
        )
    if vertical.shape[2] == 0 or slash.shape[2] == 0:
        raise ValueError(
            f"vertical_indices, slash_indices: expected at least one entry per head, "
            f"got shapes {tuple(vertical.shape)} and {tuple(slash.shape)}"
        )
    check_positive_int("seqlen_q", seqlen_q)
    check_positive_int("seqlen_k", seqlen_k)
    check_positive_int("block_size_q", block_size_q)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def _runs(desc: torch.Tensor, width: int):
    """Runs of offsets sorted descending whose neighbours are <= width apart: (hi, lo, count)."""
    ns = desc.shape[-1]
    gap = desc[..., :-1] - desc[..., 1:]
    edge = gap > width
    ones = torch.ones_like(desc[..., :1], dtype=torch.bool)
    first = torch.cat([ones, edge], -1)
    last = torch.cat([edge, ones], -1)
    run_id = first.long().cumsum(-1) - 1
    slot = torch.full_like(desc, ns)
    hi = torch.full((*desc.shape[:-1], ns + 1), _PAD, dtype=torch.int32, device=desc.device)
    lo = hi.clone()
    hi.scatter_(-1, torch.where(first, run_id, slot), desc)
    lo.scatter_(-1, torch.where(last, run_id, slot), desc)
    return hi[..., :ns], lo[..., :ns], first.sum(-1, dtype=torch.int32)


def _covered(desc: torch.Tensor, seqlen_k: int, bq: int, last_width: int) -> torch.Tensor:
    """uint8 [2, B, H, seqlen_k + bq]; entry d + bq - 1 of class c: an offset lies in [d, d + width_c),
    for d in [1 - bq, seqlen_k)."""
    present = torch.zeros(*desc.shape[:-1], seqlen_k + 1, dtype=torch.int32, device=desc.device)
    present.scatter_(-1, desc.long() + 1, 1)
    below = torch.nn.functional.pad(present.cumsum(-1, dtype=torch.int32), (bq, bq))  # below[x + bq]
    d = torch.arange(1 - bq, seqlen_k + 1, device=desc.device)
    tables = []
    for width in (bq, last_width):
        hi = (d + width).clamp(0, seqlen_k) + bq
        lo = d.clamp(0, seqlen_k) + bq
        tables.append((below[..., hi] > below[..., lo]).to(torch.uint8))
    return torch.stack(tables).contiguous()


def _check_ranges(vmin, vmax, smin, smax, seqlen_k: int) -> None:
    if vmin < 0 or vmax >= seqlen_k:
        raise ValueError(f"vertical_indices: expected key ids in [0, {seqlen_k}) (seqlen_k), got [{vmin}, {vmax}]")
    if smin < 0 or smax >= seqlen_k:
        raise ValueError(
            f"slash_indices: expected diagonal offsets in [0, {seqlen_k}) (seqlen_k), got [{smin}, {smax}]"
        )


def _prepare(vertical, slash, seqlen_q: int, seqlen_k: int, block_size_q: int) -> _Tables:
    verticals = vertical.to(torch.int32).sort(-1).values.contiguous()
    desc = slash.to(torch.int32).sort(-1, descending=True).values.contiguous()
    last_width = seqlen_q - (math.ceil(seqlen_q / block_size_q) - 1) * block_size_q
    full, last = _runs(desc, min(block_size_q, seqlen_q)), _runs(desc, last_width)
    distinct = (verticals[..., 1:] != verticals[..., :-1]).sum(-1) + 1
    # One device sync for the range checks and both output widths.
    stats = torch.stack([
        verticals[..., 0].min(), verticals[..., -1].max(), desc[..., -1].min(), desc[..., 0].max(),
        torch.maximum(full[2].max(), last[2].max()), distinct.max().to(torch.int32),
    ]).tolist()
    vmin, vmax, smin, smax, max_ranges, max_columns = stats
    _check_ranges(vmin, vmax, smin, smax, seqlen_k)
    return _Tables(
        run_hi=torch.stack([full[0], last[0]]).contiguous(),
        run_lo=torch.stack([full[1], last[1]]).contiguous(),
        run_count=torch.stack([full[2], last[2]]).contiguous(),
        covered=_covered(desc, seqlen_k, block_size_q, last_width),
        verticals=verticals,
        max_ranges=max_ranges,
        max_columns=max_columns,
    )


@triton.jit
def _covered_part(desc, NS, d, seqlen_k, width, STEPS: tl.constexpr):
    """Per lane: does some offset lie in [d, d + width) (clipped to [0, seqlen_k))? desc is read from its
    end (stride -1: ascending) by the block-sparse plan's binary search."""
    lo_x = tl.minimum(tl.maximum(d, 0), seqlen_k)
    hi_x = tl.minimum(tl.maximum(d + width, 0), seqlen_k)
    below = count_below(desc + NS - 1, -1, tl.zeros_like(hi_x) + NS, hi_x, hi_x >= 0, STEPS)
    largest = tl.load(desc + NS - tl.maximum(below, 1))  # the largest offset below hi_x, where below > 0
    return (below > 0) & (largest >= lo_x) & (lo_x < hi_x)


@triton.jit
def _runs_of(desc, NS, width, RUN_HI, RUN_LO, lane, CHUNK: tl.constexpr):
    """Runs of the descending offsets whose neighbours are <= width apart, written as (hi, lo) from slot
    0, padding after them; returns their count."""
    carry = 0
    c0 = 0
    while c0 < NS:
        i = c0 + lane
        live = i < NS
        x = tl.load(desc + i, mask=live, other=0)
        prev = tl.load(desc + i - 1, mask=live & (i > 0), other=0)
        nxt = tl.load(desc + i + 1, mask=i + 1 < NS, other=0)
        first = live & ((i == 0) | (prev - x > width))
        last = live & ((i == NS - 1) | (x - nxt > width))
        run = carry + tl.cumsum(first.to(tl.int32), 0) - 1  # at a run's last entry: that run's id
        tl.store(RUN_HI + run, x, mask=first)
        tl.store(RUN_LO + run, x, mask=last)
        carry += tl.sum(first.to(tl.int32), 0)
        c0 += CHUNK
    c0 = carry
    while c0 < NS:
        i = c0 + lane
        tl.store(RUN_HI + i, _PAD_C, mask=i < NS)
        tl.store(RUN_LO + i, _PAD_C, mask=i < NS)
        c0 += CHUNK
    return carry


@triton.jit(do_not_specialize=("NS", "NV", "seqlen_k", "width_full", "width_last"))
def _prepare_kernel(DESC, VERT, RUN_HI, RUN_LO, RUN_COUNT, COVERED, STATS,
                    BH, NS, NV, seqlen_k, width_full, width_last,
                    BQ: tl.constexpr, CHUNK: tl.constexpr, PER_PROGRAM: tl.constexpr, STEPS: tl.constexpr):
    """`_prepare`'s per-head tables in one launch. Grid (heads, parts of the covered tables): every
    program fills PER_PROGRAM x CHUNK entries of both covered tables; part 0 also the runs of both
    widths and the head's stats (-min vertical, max vertical, -min offset, max offset, max runs,
    distinct verticals: one max over heads gives every range check and output width)."""
    bh = tl.program_id(0)
    part = tl.program_id(1)
    lane = tl.arange(0, CHUNK)
    desc = DESC + bh.to(tl.int64) * NS
    n_cov = seqlen_k + BQ
    for step in tl.static_range(PER_PROGRAM):
        e = (part * PER_PROGRAM + step) * CHUNK + lane
        live = e < n_cov
        d = e - BQ + 1
        full = _covered_part(desc, NS, d, seqlen_k, BQ, STEPS)
        last = _covered_part(desc, NS, d, seqlen_k, width_last, STEPS)
        tl.store(COVERED + bh.to(tl.int64) * n_cov + e, full.to(tl.uint8), mask=live)
        tl.store(COVERED + (BH + bh).to(tl.int64) * n_cov + e, last.to(tl.uint8), mask=live)
    if part == 0:
        n_full = _runs_of(desc, NS, width_full, RUN_HI + bh.to(tl.int64) * NS, RUN_LO + bh.to(tl.int64) * NS,
                          lane, CHUNK)
        n_last = _runs_of(desc, NS, width_last, RUN_HI + (BH + bh).to(tl.int64) * NS,
                          RUN_LO + (BH + bh).to(tl.int64) * NS, lane, CHUNK)
        tl.store(RUN_COUNT + bh, n_full)
        tl.store(RUN_COUNT + BH + bh, n_last)
        vert = VERT + bh.to(tl.int64) * NV
        distinct = 0
        c0 = 0
        while c0 < NV:
            i = c0 + lane
            live = i < NV
            x = tl.load(vert + i, mask=live, other=0)
            prev = tl.load(vert + i - 1, mask=live & (i > 0), other=0)
            distinct += tl.sum((live & ((i == 0) | (x != prev))).to(tl.int32), 0)
            c0 += CHUNK
        row = STATS + bh * 6
        tl.store(row, -tl.load(vert))
        tl.store(row + 1, tl.load(vert + NV - 1))
        tl.store(row + 2, -tl.load(desc + NS - 1))
        tl.store(row + 3, tl.load(desc))
        tl.store(row + 4, tl.maximum(n_full, n_last))
        tl.store(row + 5, distinct)


_PREP_CHUNK = 1024
_PREP_PER_PROGRAM = 4


def _prepare_triton(vertical, slash, seqlen_q: int, seqlen_k: int, block_size_q: int,
                    assume_sorted: bool = False) -> _Tables:
    """`_prepare` as one Triton launch after the two sorts (GPU or TRITON_INTERPRET=1): the same tables,
    about ten launches instead of some forty small torch ops (those were most of the index phase's host
    time at 128K). assume_sorted: both inputs are sorted ascending already, so a flip replaces the sorts."""
    if assume_sorted:
        verticals = vertical.to(torch.int32).contiguous()
        desc = slash.to(torch.int32).flip(-1).contiguous()
    else:
        verticals = vertical.to(torch.int32).sort(-1).values.contiguous()
        desc = slash.to(torch.int32).sort(-1, descending=True).values.contiguous()
    b, h, ns = desc.shape
    nv = verticals.shape[-1]
    last_width = seqlen_q - (math.ceil(seqlen_q / block_size_q) - 1) * block_size_q
    dev = desc.device
    run_hi = torch.empty(2, b, h, ns, dtype=torch.int32, device=dev)
    run_lo = torch.empty_like(run_hi)
    run_count = torch.empty(2, b, h, dtype=torch.int32, device=dev)
    covered = torch.empty(2, b, h, seqlen_k + block_size_q, dtype=torch.uint8, device=dev)
    stats = torch.empty(b * h, 6, dtype=torch.int32, device=dev)
    per_part = _PREP_CHUNK * _PREP_PER_PROGRAM
    steps = max(1, math.ceil(math.log2(ns + 1)))
    _prepare_kernel[(b * h, triton.cdiv(seqlen_k + block_size_q, per_part))](
        desc, verticals, run_hi, run_lo, run_count, covered, stats, b * h, ns, nv, seqlen_k,
        min(block_size_q, seqlen_q), last_width, BQ=block_size_q, CHUNK=_PREP_CHUNK,
        PER_PROGRAM=_PREP_PER_PROGRAM, STEPS=steps, num_warps=4)
    neg_vmin, vmax, neg_smin, smax, max_ranges, max_columns = stats.amax(0).tolist()  # one device sync
    _check_ranges(-neg_vmin, vmax, -neg_smin, smax, seqlen_k)
    return _Tables(run_hi=run_hi, run_lo=run_lo, run_count=run_count, covered=covered, verticals=verticals,
                 max_ranges=max_ranges, max_columns=max_columns)


def _outputs(tables: _Tables, nqb: int):
    b, h = tables.verticals.shape[:2]
    dev = tables.verticals.device

    def new(*shape):
        return torch.empty(*shape, dtype=torch.int32, device=dev)

    return (new(b, h, nqb), new(b, h, nqb, tables.max_ranges), new(b, h, nqb, tables.max_ranges),
            new(b, h, nqb), new(b, h, nqb, tables.max_columns))


# ----------------------------------------------------------------------------------------------- torch


def _torch_ranges(tables: _Tables, cls: int, q0, q1, off: int, out) -> None:
    """Ranges of the blocks [q0, q1) (all of class cls), written into out's block slice."""
    counts, starts, ends = out
    hi, lo, n = tables.run_hi[cls].long(), tables.run_lo[cls].long(), tables.run_count[cls].long()
    limit = (q1 + off).expand(*n.shape, -1).contiguous()  # runs with lo >= limit end at or before key 0
    dead = torch.searchsorted((-lo).contiguous(), -limit, right=True)
    r = torch.arange(tables.max_ranges, device=hi.device)
    g = (dead.unsqueeze(-1) + r).clamp(max=hi.shape[-1] - 1)
    hi_g = hi.unsqueeze(2).expand(*g.shape[:3], -1).gather(-1, g)
    lo_g = lo.unsqueeze(2).expand(*g.shape[:3], -1).gather(-1, g)
    counts.copy_(n.unsqueeze(-1) - dead)
    starts.copy_((q0[:, None] + off - hi_g).clamp(min=0))
    ends.copy_(q1[:, None] + off - lo_g)


def _torch_columns(tables: _Tables, q0, q1, off: int, bq: int, counts, cols) -> None:
    j = tables.verticals.long().unsqueeze(2)  # [B, H, 1, NV]
    width = (q1 - q0)[:, None]
    d = q0[:, None] + off - j  # the offset of the diagonal through (q0, j)
    seen = d >= 1 - width
    cls = (torch.arange(q0.shape[0], device=j.device) == q0.shape[0] - 1).long()[:, None]
    table = tables.covered.long()  # [2, B, H, seqlen_k + bq]
    at = (d + bq - 1).clamp(min=0)
    covered = torch.where(cls == 0, table[0].gather(-1, at.flatten(2)).view(d.shape),
                          table[1].gather(-1, at.flatten(2)).view(d.shape)) > 0
    repeat = torch.zeros_like(j, dtype=torch.bool)
    repeat[..., 1:] = j[..., 1:] == j[..., :-1]
    keep = seen & ~covered & ~repeat
    counts.copy_(keep.sum(-1))
    slot = torch.where(keep, keep.long().cumsum(-1) - 1, cols.shape[-1])
    padded = torch.zeros(*keep.shape[:3], cols.shape[-1] + 1, dtype=torch.int32, device=cols.device)
    padded.scatter_(-1, slot, j.expand_as(keep).int())
    cols.copy_(padded[..., :-1])


def _build_torch(tables: _Tables, seqlen_q, seqlen_k, bq, nqb, out) -> None:
    range_counts, starts, ends, col_counts, cols = out
    off = seqlen_k - seqlen_q
    dev = tables.verticals.device
    q0 = torch.arange(nqb, device=dev) * bq
    q1 = (q0 + bq).clamp(max=seqlen_q)
    for cls, blocks in ((0, slice(0, nqb - 1)), (1, slice(nqb - 1, nqb))):
        if blocks.stop == blocks.start:
            continue
        part = (range_counts[:, :, blocks], starts[:, :, blocks], ends[:, :, blocks])
        _torch_ranges(tables, cls, q0[blocks], q1[blocks], off, part)
    _torch_columns(tables, q0, q1, off, bq, col_counts, cols)


# ---------------------------------------------------------------------------------------------- triton


@triton.jit(do_not_specialize=("NS", "NV", "nqb", "max_ranges", "max_columns", "seqlen_q", "seqlen_k"))
def _index_kernel(RUN_HI, RUN_LO, RUN_COUNT, COVERED, VERT,
                  R_COUNT, R_START, R_END, C_COUNT, C_IDX,
                  BH, NS, NV, nqb, max_ranges, max_columns, seqlen_q, seqlen_k,
                  BQ: tl.constexpr, CHUNK: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    off = seqlen_k - seqlen_q
    q0 = qb * BQ
    q1 = tl.minimum(q0 + BQ, seqlen_q)
    width = q1 - q0
    cls = (qb == nqb - 1).to(tl.int32)  # full blocks share class 0; the last block has its own runs
    table = (cls * BH + bh).to(tl.int64) * NS
    n_runs = tl.load(RUN_COUNT + cls * BH + bh)
    out_block = bh.to(tl.int64) * nqb + qb
    lane = tl.arange(0, CHUNK)

    # Leading runs that end at or before key 0 are dropped; the rest are shifted by q0 + off.
    limit = q1 + off
    # while loops: under NumPy 2 the Triton interpreter takes no runtime scalar as a range() bound.
    dead = 0
    g0 = 0
    while g0 < n_runs:
        live = g0 + lane < n_runs
        lo = tl.load(RUN_LO + table + g0 + lane, mask=live, other=0)
        dead += tl.sum((live & (lo >= limit)).to(tl.int32), 0)
        g0 += CHUNK
    g0 = dead
    while g0 < n_runs:
        g = g0 + lane
        g0 += CHUNK
        live = g < n_runs
        hi = tl.load(RUN_HI + table + g, mask=live, other=0)
        lo = tl.load(RUN_LO + table + g, mask=live, other=0)
        dst = out_block * max_ranges + (g - dead)
        tl.store(R_START + dst, tl.maximum(q0 + off - hi, 0), mask=live)
        tl.store(R_END + dst, limit - lo, mask=live)
    tl.store(R_COUNT + out_block, n_runs - dead)

    # Columns: seen by some row, in no range, first of their repeats. Sorted, so the columns that some
    # row sees come first: stop at the first chunk that starts past the block's last row.
    covered = COVERED + (cls * BH + bh).to(tl.int64) * (seqlen_k + BQ) + BQ - 1
    vert = VERT + bh.to(tl.int64) * NV
    last_key = q1 - 1 + off
    kept = 0
    c0 = 0
    while (c0 < NV) & (tl.load(vert + tl.minimum(c0, NV - 1)) <= last_key):
        c = c0 + lane
        inside = c < NV
        j = tl.load(vert + c, mask=inside, other=0)
        prev = tl.load(vert + c - 1, mask=inside & (c > 0), other=-1)
        d = q0 + off - j
        seen = inside & (j <= last_key)
        hit = tl.load(covered + d, mask=seen, other=1)
        keep = seen & (hit == 0) & (j != prev)
        slot = kept + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(C_IDX + out_block * max_columns + slot, j, mask=keep)
        kept += tl.sum(keep.to(tl.int32), 0)
        c0 += CHUNK
    tl.store(C_COUNT + out_block, kept)


def _build_triton(tables: _Tables, seqlen_q, seqlen_k, bq, nqb, out) -> None:
    range_counts, starts, ends, col_counts, cols = out
    b, h, nv = tables.verticals.shape
    ns = tables.run_hi.shape[-1]
    _index_kernel[(nqb, b * h)](
        tables.run_hi, tables.run_lo, tables.run_count, tables.covered, tables.verticals,
        range_counts, starts, ends, col_counts, cols,
        b * h, ns, nv, nqb, tables.max_ranges, tables.max_columns, seqlen_q, seqlen_k,
        BQ=bq, CHUNK=256, num_warps=4,
    )


def _build_cuda(tables: _Tables, seqlen_q, seqlen_k, bq, nqb, out) -> None:
    from ... import _cuda

    ext = _cuda.load()
    if ext is None:
        raise RuntimeError(
            "backend='cuda': the CUDA extension sparse_attn._C is not available "
            f"({_cuda.load_error()}); use backend='triton' or 'torch'"
        )
    ext.vertical_slash_index(tables.run_hi, tables.run_lo, tables.run_count, tables.covered, tables.verticals,
                             *out, seqlen_q, seqlen_k, bq)


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend != "auto":
        return backend
    if device.type == "cuda":
        from ... import _cuda

        return "cuda" if _cuda.load() is not None else "triton"
    return "triton" if os.environ.get("TRITON_INTERPRET") == "1" else "torch"


def build_vertical_slash_index(
    vertical_indices: torch.Tensor,
    slash_indices: torch.Tensor,
    seqlen_q: int,
    seqlen_k: int,
    block_size_q: int = 64,
    *,
    backend: str = "auto",
    assume_sorted: bool = False,
) -> VerticalSlashLayout:
    """The VerticalSlashLayout of the given key columns and diagonals (see the module docstring).

    vertical_indices: int32/int64 [B, H, NV] key ids in [0, seqlen_k), any order, repeats allowed.
    slash_indices: int32/int64 [B, H, NS] diagonal offsets in [0, seqlen_k); offset o holds the pairs
    (i, i + seqlen_k - seqlen_q - o), so o = 0 is the main (bottom-right) diagonal.
    backend: "torch", "triton", "cuda" (sparse_attn._C), or "auto": cuda where the extension loads and
    the tensors are on a GPU, else triton on a GPU or under TRITON_INTERPRET=1, else torch.
    Widths: max_ranges <= NS and max_columns <= NV (one device sync decides them).
    assume_sorted: every row of both inputs is sorted ascending already (as estimate_vertical_slash returns
    them), so the Triton / CUDA paths skip their two sorts (~0.3 ms of host time at 128K). Unsorted rows then
    give a wrong index: nothing checks it (a check would cost what it saves). The torch backend always sorts.
    """
    _check_inputs(vertical_indices, slash_indices, seqlen_q, seqlen_k, block_size_q, backend)
    backend = _pick_backend(backend, vertical_indices.device)
    if backend == "cuda" and vertical_indices.device.type != "cuda":
        raise ValueError(f"backend='cuda': expected tensors on a CUDA device, got {vertical_indices.device}")
    # the per-head tables: one Triton launch on a GPU (or the interpreter); torch for backend="torch" (the
    # reference path end to end) and on a CPU without the interpreter
    kernels = vertical_indices.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if backend != "torch" and kernels:
        tables = _prepare_triton(vertical_indices, slash_indices, seqlen_q, seqlen_k, block_size_q,
                               assume_sorted=bool(assume_sorted))
    else:
        tables = _prepare(vertical_indices, slash_indices, seqlen_q, seqlen_k, block_size_q)
    nqb = math.ceil(seqlen_q / block_size_q)
    out = _outputs(tables, nqb)
    build = {"torch": _build_torch, "triton": _build_triton, "cuda": _build_cuda}[backend]
    build(tables, seqlen_q, seqlen_k, block_size_q, nqb, out)
    return VerticalSlashLayout(*out, block_size_q, seqlen_q, seqlen_k, validate=False)
