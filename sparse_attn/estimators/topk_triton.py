"""Top-k ids of score rows, returned in position order, in one Triton launch.

The vertical-slash estimator needs, per head, the ids of the `k` best key columns and the `k` best
diagonals, sorted by id (the index builder walks them in order). With torch that is a top-k and a sort per
kind, plus the writes that force the sink columns and the main diagonals in: a dozen launches and, at 128K,
~0.6 ms of host time for ~0.2 ms of GPU work. Here one program per row:

1. finds the k-th largest score exactly by radix selection: four passes over the row, each a 256-bin
   histogram of one byte of the scores' order-preserving integer keys, among the keys that share the bytes
   already chosen;
2. writes every id whose score is above that threshold, and the first ids (lowest positions) of those equal
   to it, in one ordered pass: a running prefix sum gives each kept id its output slot, so the ids come out
   ascending without a sort.

The first `n_forced` ids of a row are scored above every real score before selection (the sinks and the
main diagonals), earlier ids higher, as the torch path does. Ties at the threshold go to the lower ids.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["topk_ids_sorted"]

_BLOCK = 4096
_WARPS = 8


@triton.jit
def _row_keys(row, offs, n, n_forced, ceiling):
    """int32 keys of row[offs] whose signed order is the scores' order; the forced ids' raised scores."""
    x = tl.load(row + offs, mask=offs < n, other=0.0)
    x = tl.where(offs < n_forced, ceiling + 1.0 + (n_forced - offs).to(tl.float32), x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: larger magnitude, smaller key


@triton.jit
def _select_row(row, out, n, k, width, n_forced, ceiling, BLOCK: tl.constexpr):
    # 1. Radix selection of the k-th largest key, the top byte first. `hi` holds the bytes chosen so far
    # (as the arithmetic right shift of a matching key gives them), `k_rem` how many of the keys that match
    # them still have to be taken.
    k_rem = k
    hi = 0
    bins = tl.arange(0, 256)
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        hist = tl.zeros([256], tl.int32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            key = _row_keys(row, offs, n, n_forced, ceiling)
            if p == 0:
                digit = (key >> 24) + 128
                match = offs < n
            else:
                digit = (key >> shift) & 0xFF
                match = (offs < n) & ((key >> (shift + 8)) == hi)
            hist += tl.histogram(digit, 256, mask=match)
        at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # matching keys with this byte or a higher one
        chosen = tl.sum((at_least >= k_rem).to(tl.int32), 0) - 1
        k_rem -= tl.sum(tl.where(bins > chosen, hist, 0), 0)
        if p == 0:
            hi = chosen - 128
        else:
            hi = (hi << 8) | chosen
    # 2. Ordered compaction: keys above the threshold, and the first k_rem keys equal to it. A row whose
    # budget is below the output width starts with copies of its best id (id 0, the first forced one).
    pad = width - k
    for start in range(0, pad, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(out + offs, tl.zeros([BLOCK], tl.int32), mask=offs < pad)
    taken = pad
    ties_seen = 0
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        key = _row_keys(row, offs, n, n_forced, ceiling)
        valid = offs < n
        tie = (valid & (key == hi)).to(tl.int32)
        keep = (valid & (key > hi)) | ((tie != 0) & (tl.cumsum(tie, 0) + ties_seen <= k_rem))
        keep = keep.to(tl.int32)
        slot = taken + tl.cumsum(keep, 0) - 1
        tl.store(out + slot, offs, mask=(keep != 0) & (slot < width))
        taken += tl.sum(keep, 0)
        ties_seen += tl.sum(tie, 0)


@triton.jit
def _topk_kernel(S0, S1, O0, O1, K0, K1, n, width0, width1, n_forced0, n_forced1, ceiling, H,
                 UNIFORM: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (rows, 2): axis 1 picks the scores tensor. Uniform budgets are the widths themselves."""
    r = tl.program_id(0).to(tl.int64)
    if tl.program_id(1) == 0:
        k = width0
        if not UNIFORM:
            k = tl.load(K0 + r % H)
        _select_row(S0 + r * n, O0 + r * width0, n, k, width0, n_forced0, ceiling, BLOCK)
    else:
        k = width1
        if not UNIFORM:
            k = tl.load(K1 + r % H)
        _select_row(S1 + r * n, O1 + r * width1, n, k, width1, n_forced1, ceiling, BLOCK)


def topk_ids_sorted(scores, sizes, n_forced, ceiling: float, out=None):
    """Per row of each scores tensor, its top sizes[h] ids in ascending order, the first n_forced ids raised
    above `ceiling` (every real score is <= ceiling) before selection.

    scores: two float32 [B, H, N] tensors (contiguous, same shape); sizes: two int tensors [H] (the budget
    per head, 1 <= size <= N); n_forced: two ints. Returns two int32 [B, H, max(sizes)] tensors; a row
    whose budget is below the maximum starts with copies of id 0 (its best, forced, id), as
    `vertical_slash._topk_padded` pads with the best id. out: optional two int32 tensors of those shapes to
    write into (every entry is written).
    """
    s0, s1 = scores
    if s0.shape != s1.shape or s0.dtype != torch.float32 or s1.dtype != torch.float32:
        raise ValueError(f"scores: expected two float32 tensors of one shape, got {s0.dtype} {tuple(s0.shape)} "
                         f"and {s1.dtype} {tuple(s1.shape)}")
    if min(n_forced) < 1:
        raise ValueError(f"n_forced: expected >= 1 each (the padding repeats id 0), got {tuple(n_forced)}")
    b, h, n = s0.shape
    widths = [int(sz.max()) for sz in sizes]
    if min(int(sz.min()) for sz in sizes) < 1 or max(widths) > n:
        raise ValueError(f"sizes: expected budgets in [1, {n}], got {[sz.tolist() for sz in sizes]}")
    uniform = all(int(sz.min()) == w for sz, w in zip(sizes, widths))
    shapes = [(b, h, w) for w in widths]
    if out is None:
        outs = [torch.empty(shape, device=s0.device, dtype=torch.int32) for shape in shapes]
    else:
        outs = list(out)
        for o, shape in zip(outs, shapes):
            if tuple(o.shape) != shape or o.dtype != torch.int32 or not o.is_contiguous() or o.device != s0.device:
                raise ValueError(f"out: expected contiguous int32 tensors of shapes {shapes} on {s0.device}, got "
                                 f"{[(o.dtype, tuple(o.shape), o.device) for o in outs]}")
    # Budgets per head only where they differ (one small copy each); else the kernel takes the widths.
    ks = outs if uniform else [sz.to(device=s0.device, dtype=torch.int32) for sz in sizes]
    _topk_kernel[(b * h, 2)](
        s0.contiguous(), s1.contiguous(), outs[0], outs[1], ks[0], ks[1], n, widths[0], widths[1],
        min(n_forced[0], n), min(n_forced[1], n), float(ceiling), h,
        UNIFORM=uniform, BLOCK=min(_BLOCK, triton.next_power_of_2(n)), num_warps=_WARPS,
    )
    return outs[0], outs[1]
