"""Triton kernels of the estimator's pooled side (GPU, or the interpreter), no torch glue between them:

- `pool_triton`: mean of each block of rows of q or k ([B, H, S, D], read strided in its own dtype), float32
  [B, H, nb, DP] (DP: D padded to a power of two with zeros); heads whose flag is 0 are skipped.
- `decide_triton`: rule 1 per (sequence, head): the mean of the last L queries against the pooled keys (float32
  products, float64 softmax), the last queries' true block distribution from their column mass, the
  Jensen-Shannon divergence, int8 flag "query-aware". Chunks of key blocks in parallel (logits, masses and
  each chunk's max / sum kept), then one program a head: the chunks' max and sum, then the divergence.
- `query_aware_triton`: rule 2, fused: per band of BM query blocks of a query-aware head the pooled scores
  against the key blocks the band sees (tensor cores in q's dtype, one pass: the scores with each row's
  running max and sum), written to a per-program scratch band (float32, read back while it is in L1 / L2)
  and made probabilities there by the selection's first pass, then the selection without sorting and the
  kept blocks' runs written as key ranges. Persistent programs (a few per SM) walk the (head, band) items,
  longest bands first; bands of other heads write a count of 0.

The selection of a row (`_select_band`): need = gamma - the forced mass (block 0 and the diagonal block), least
= the minimum budget less the forced blocks. The kept candidates are the larger of the gamma set and the
`least` largest, so one threshold serves both: the largest candidate value t with mass(c >= t) >= need and
count(c >= t) >= least, found by a bisection on the float bits that snaps both ends of its bracket to
candidate values after every step (it closes after about log2(candidates) passes, not 31; once every row's
bracket holds at most 64 candidates they are copied to registers and the passes end). Ties at t are
taken lower block first: while the kept mass is below need, and up to `least`. The kept blocks' runs come
out in block order from running counts (a block's neighbours are re-read): no sort, no keep mask in memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton import INTERPRETED, LOG2E  # noqa: F401  (importing it applies the interpreter fix)
from ..._triton import online_max_sum, softmax_terms

__all__ = ["pool_triton", "decide_triton", "query_aware_triton"]

_BM = 16  # query blocks per band (tl.dot's smallest M)
_BN = 64  # key blocks per tile of the pooled scores
_BT = 32  # key blocks per tile of the selection passes
_CAP = 64  # candidates per row a search keeps in registers once every row's bracket holds no more
_PROGRAMS_PER_SM = 4
_SCRATCH_ELEMENTS = 1 << 26  # float32 scratch cap (256 MiB): the number of programs shrinks past it
# The decision: key blocks a chunk program scores, and chunk sums the per-head program reads a step.
_DECIDE_CHUNK = 32
_DECIDE_STEP = 128


def _dot_code(dtype: torch.dtype) -> int:
    return {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype]


def _padded(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


@triton.jit(do_not_specialize=("seqlen", "n_blocks"))
def _pool_kernel(X, FLAG, OUT, seqlen, n_blocks, num_heads, s_xb, s_xh, s_xs,
                 BS: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, PER: tl.constexpr, HAS_FLAG: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    go = True
    if HAS_FLAG:
        go = tl.load(FLAG + bh) != 0
    if go:
        b = (bh // num_heads).to(tl.int64)
        h = (bh % num_heads).to(tl.int64)
        t = tl.arange(0, BS)
        d = tl.arange(0, DP)
        for i in tl.static_range(PER):
            blk = pid * PER + i
            rows = blk * BS + t
            x = tl.load(X + b * s_xb + h * s_xh + rows[:, None].to(tl.int64) * s_xs + d[None, :],
                        mask=((rows < seqlen) & (blk < n_blocks))[:, None] & (d < D)[None, :], other=0.0)
            n = tl.maximum(tl.minimum(BS, seqlen - blk * BS), 1)
            tl.store(OUT + (bh.to(tl.int64) * n_blocks + blk) * DP + d, tl.sum(x.to(tl.float32), 0) / n,
                     mask=(d < DP) & (blk < n_blocks))


def pool_triton(x: torch.Tensor, block_size: int, flag=None) -> torch.Tensor:
    """float32 [B, H, ceil(S / block_size), DP]: the mean of each block of x [B, H, S, D] (the last block: of the
    rows it has), zero columns past D; heads with flag[b, h] == 0 (flag int8 [B, H]) are left unwritten."""
    b, h, s, d = x.shape
    nb = -(-s // block_size)
    dp = _padded(d)
    out = torch.empty(b, h, nb, dp, dtype=torch.float32, device=x.device)
    per = 4
    _pool_kernel[(triton.cdiv(nb, per), b * h)](
        x, out if flag is None else flag, out, s, nb, h, x.stride(0), x.stride(1), x.stride(2), BS=block_size, D=d,
        DP=dp, PER=per, HAS_FLAG=flag is not None, num_warps=4)
    return out


@triton.jit(do_not_specialize=("seqlen_q", "seqlen_k", "nk", "n_parts", "length"))
def _decide_parts_kernel(Q, KP, V, LOGIT, TRUE, PART, seqlen_q, seqlen_k, nk, n_parts, num_heads, group, length,
                         scale, s_qb, s_qh, s_qs, BS: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                         LP: tl.constexpr, BJ: tl.constexpr):
    """One chunk of BJ key blocks of one (sequence, head): the pooled logits and the true block masses (kept for
    the divergence), and the chunk's logit max, sum of exponentials below it and mass (float64)."""
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    kv = (b * (num_heads // group) + h // group).to(tl.int64)
    t = tl.arange(0, LP)
    d = tl.arange(0, DP)
    rows = seqlen_q - length + t
    x = tl.load(Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + rows[:, None].to(tl.int64) * s_qs + d[None, :],
                mask=(t < length)[:, None] & (d < D)[None, :], other=0.0)
    qm = tl.sum(x.to(tl.float32), 0) / length
    j = c * BJ + tl.arange(0, BJ)
    s = _pooled_logits(KP + kv * nk * DP, qm, j, d, nk, scale, DP)
    mass = _block_mass(V + bh.to(tl.int64) * seqlen_k, j, tl.arange(0, BS), seqlen_k, length, BS)
    out = bh.to(tl.int64) * nk + j
    tl.store(LOGIT + out, s, mask=j < nk)
    tl.store(TRUE + out, mass, mask=j < nk)
    cm = tl.max(s, 0)  # finite: a chunk holds at least one block
    part = PART + (bh.to(tl.int64) * n_parts + c) * 3
    tl.store(part, cm)
    tl.store(part + 1, tl.sum(tl.where(j < nk, tl.exp(s - cm), 0.0), 0))
    tl.store(part + 2, tl.sum(mass, 0))


@triton.jit(do_not_specialize=("nk", "n_parts"))
def _decide_kernel(LOGIT, TRUE, PART, TAU, QA, nk, n_parts, num_heads, BP: tl.constexpr, BJ: tl.constexpr):
    """Rule 1's flag of one (sequence, head) from its chunks: the softmax's max and sum, then the divergence."""
    bh = tl.program_id(0)
    h = bh % num_heads
    m = tl.full((), -1e300, tl.float64)
    se = tl.zeros((), tl.float64)
    mass = tl.zeros((), tl.float64)
    for p0 in range(0, n_parts, BP):
        p = p0 + tl.arange(0, BP)
        part = PART + (bh.to(tl.int64) * n_parts + p) * 3
        cm = tl.load(part, mask=p < n_parts, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(cm, 0))
        cs = tl.load(part + 1, mask=p < n_parts, other=0.0)
        se = se * tl.exp(m - m_new) + tl.sum(tl.where(p < n_parts, cs * tl.exp(cm - m_new), 0.0), 0)
        m = m_new
        mass += tl.sum(tl.load(part + 2, mask=p < n_parts, other=0.0), 0)
    mass = tl.maximum(mass, 1e-30)
    jsd = tl.zeros((), tl.float64)
    for j0 in range(0, nk, BJ):
        j = j0 + tl.arange(0, BJ)
        at = bh.to(tl.int64) * nk + j
        s = tl.load(LOGIT + at, mask=j < nk, other=float("-inf"))
        pooled = tl.where(j < nk, tl.exp(s - m) / se, 0.0)
        true = tl.load(TRUE + at, mask=j < nk, other=0.0) / mass
        mid = tl.log(tl.maximum((pooled + true) / 2, 1e-300))
        kl_p = tl.where(pooled > 0, pooled * (tl.log(tl.maximum(pooled, 1e-300)) - mid), 0.0)
        kl_t = tl.where(true > 0, true * (tl.log(tl.maximum(true, 1e-300)) - mid), 0.0)
        jsd += tl.sum(0.5 * kl_p + 0.5 * kl_t, 0)
    tl.store(QA + bh, (jsd < tl.load(TAU + h).to(tl.float64)).to(tl.int8))


@triton.jit
def _pooled_logits(kbase, qm, j, d, nk, scale, DP: tl.constexpr):
    """float64 [BJ]: (mean query) . (pooled key block j) * scale, -inf past the last block."""
    kt = tl.load(kbase + j[:, None].to(tl.int64) * DP + d[None, :], mask=(j < nk)[:, None], other=0.0)
    s = tl.sum(kt * qm[None, :], 1).to(tl.float64) * scale
    return tl.where(j < nk, s, float("-inf"))


@triton.jit
def _block_mass(vbase, j, tok, seqlen_k, length, BS: tl.constexpr):
    """float64 [BJ]: the last queries' column mass (divided by their number) summed over key block j."""
    keys = j[:, None] * BS + tok[None, :]
    v = tl.load(vbase + keys, mask=keys < seqlen_k, other=0.0) / length
    return tl.sum(v, 1).to(tl.float64)


def decide_triton(q: torch.Tensor, kp: torch.Tensor, column_sums: torch.Tensor, tau: torch.Tensor, *,
                  block_size: int, length: int, scale: float) -> torch.Tensor:
    """int8 [B, Hq]: rule 1's flag (query-aware) from q [B, Hq, Sq, D], the pooled keys kp (pool_triton's, of k
    [B, Hkv, Sk, D]), the last `length` queries' column sums (float32 [B, Hq, Sk], not yet divided by length)
    and tau float32 [Hq]."""
    b, hq, sq, d = q.shape
    hkv, nk, dp = kp.shape[1], kp.shape[2], kp.shape[3]
    sk = column_sums.shape[-1]
    flag = torch.empty(b, hq, dtype=torch.int8, device=q.device)
    # Chunks of key blocks over many programs, then one short program a head over its chunks' sums: a single
    # program a head walking every block is latency-bound on long rows.
    bj = _DECIDE_CHUNK
    n_parts = triton.cdiv(nk, bj)
    logit = torch.empty(b * hq, nk, dtype=torch.float64, device=q.device)
    true = torch.empty_like(logit)
    part = torch.empty(b * hq, n_parts, 3, dtype=torch.float64, device=q.device)
    _decide_parts_kernel[(b * hq, n_parts)](
        q, kp, column_sums.contiguous(), logit, true, part, sq, sk, nk, n_parts, hq, hq // hkv, length, scale,
        q.stride(0), q.stride(1), q.stride(2), BS=block_size, D=d, DP=dp, LP=triton.next_power_of_2(length),
        BJ=bj, num_warps=4)
    _decide_kernel[(b * hq,)](logit, true, part, tau, flag, nk, n_parts, hq, BP=_DECIDE_STEP, BJ=1024,
                                 num_warps=4)
    return flag


@triton.jit
def _band_tile(P, row_off, live, nvis, j):
    """A tile of a band's probabilities: p [BM, BT] (0 where not visible), candidates and forced blocks."""
    vis = live[:, None] & (j[None, :] >= 0) & (j[None, :] < nvis[:, None])
    p = tl.load(P + row_off[:, None] + j[None, :], mask=vis, other=0.0)
    forced = vis & ((j[None, :] == 0) | (j[None, :] == nvis[:, None] - 1))
    return p, vis & (forced == 0), forced


@triton.jit
def _bisect(P, BUF, row_off, live, nvis, nvis_max, lo, hi, need, least, todo, first, BM: tl.constexpr,
            BT: tl.constexpr, CAP: tl.constexpr):
    """Per row where `todo`: the largest candidate value v in [lo, hi] (float bits of two candidate values)
    with mass(c >= v) >= need and count(c >= v) >= least; both ends snap to candidate values. The first
    step tries `first` (float bits) where it lies in (lo, hi], later ones the middle. Passes over the band
    while some row's bracket holds more than CAP candidates; then one pass copies each row's bracket to BUF
    (CAP floats a row, at BUF + r * CAP) with the mass and count above it, and the rest runs in registers.
    Returns the value's bits and, for the rows that ended in registers (in_regs), the mass and count of the
    candidates above it and the count equal to it."""
    todo = todo & (lo < hi)
    n_in = tl.where(todo, CAP + 1, 0)  # candidates in the bracket (not yet counted: more than CAP)
    n_wide = tl.sum(todo.to(tl.int32), 0)
    steps = 0
    while n_wide > 0:
        mid = lo + (hi - lo + 1) // 2
        if steps == 0:
            mid = tl.where((first > lo) & (first <= hi), first, mid)
        steps += 1
        v = mid.to(tl.float32, bitcast=True)[:, None]
        lo_v = lo.to(tl.float32, bitcast=True)[:, None]
        hi_v = hi.to(tl.float32, bitcast=True)[:, None]
        mass = tl.zeros([BM, BT], tl.float32)
        count = tl.zeros([BM, BT], tl.int32)
        n_low = tl.zeros([BM, BT], tl.int32)
        n_high = tl.zeros([BM, BT], tl.int32)
        up = tl.full([BM, BT], 2.0, tl.float32)
        down = tl.full([BM, BT], -1.0, tl.float32)
        for j0 in range(0, nvis_max, BT):
            p, cand, _ = _band_tile(P, row_off, live, nvis, j0 + tl.arange(0, BT))
            ge = cand & (p >= v)
            below = cand & (p < v)
            mass += tl.where(ge, p, 0.0)
            count += ge.to(tl.int32)
            n_low += (below & (p >= lo_v)).to(tl.int32)
            n_high += (ge & (p <= hi_v)).to(tl.int32)
            up = tl.minimum(up, tl.where(ge, p, 2.0))
            down = tl.maximum(down, tl.where(below, p, -1.0))
        ok = (tl.sum(mass, 1) >= need) & (tl.sum(count, 1) >= least)
        wide = n_in > CAP
        lo = tl.where(wide & ok, tl.min(up, 1).to(tl.int32, bitcast=True), lo)
        hi = tl.where(wide & (ok == 0), tl.max(down, 1).to(tl.int32, bitcast=True), hi)
        n_in = tl.where(wide, tl.where(ok, tl.sum(n_high, 1), tl.sum(n_low, 1)), n_in)
        n_in = tl.where(todo & (lo < hi), n_in, 0)
        n_wide = tl.sum((n_in > CAP).to(tl.int32), 0)
    todo = todo & (lo < hi)
    in_regs = todo
    mass_above = tl.zeros([BM], tl.float32)
    n_above = tl.zeros([BM], tl.int32)
    n_tie = tl.zeros([BM], tl.int32)
    if tl.sum(todo.to(tl.int32), 0) > 0:
        lo_v = lo.to(tl.float32, bitcast=True)[:, None]
        hi_v = hi.to(tl.float32, bitcast=True)[:, None]
        r = tl.arange(0, BM)
        above_mass = tl.zeros([BM, BT], tl.float32)
        above_count = tl.zeros([BM, BT], tl.int32)
        taken = tl.zeros([BM], tl.int32)
        for j0 in range(0, nvis_max, BT):
            p, cand, _ = _band_tile(P, row_off, live, nvis, j0 + tl.arange(0, BT))
            above = cand & (p > hi_v)
            above_mass += tl.where(above, p, 0.0)
            above_count += above.to(tl.int32)
            inside = (todo[:, None] & cand & (p >= lo_v) & (p <= hi_v)).to(tl.int32)
            slot = taken[:, None] + tl.cumsum(inside, 1) - 1
            tl.store(BUF + r[:, None] * CAP + slot, p, mask=(inside != 0) & (slot < CAP))
            taken += tl.sum(inside, 1)
        tl.debug_barrier()  # the copies, written by every thread, are read by every thread
        c = tl.arange(0, CAP)
        inside = c[None, :] < taken[:, None]
        buf = tl.load(BUF + r[:, None] * CAP + c[None, :], mask=inside, other=-1.0)
        above_mass = tl.sum(above_mass, 1)
        above_count = tl.sum(above_count, 1)
        n_todo = tl.sum(todo.to(tl.int32), 0)
        while n_todo > 0:
            mid = lo + (hi - lo + 1) // 2
            v = mid.to(tl.float32, bitcast=True)[:, None]
            ge = inside & (buf >= v)
            ok = ((above_mass + tl.sum(tl.where(ge, buf, 0.0), 1) >= need)
                  & (above_count + tl.sum(ge.to(tl.int32), 1) >= least))
            lo = tl.where(todo & ok, tl.min(tl.where(ge, buf, 2.0), 1).to(tl.int32, bitcast=True), lo)
            hi = tl.where(todo & (ok == 0),
                          tl.max(tl.where(inside & (buf < v), buf, -1.0), 1).to(tl.int32, bitcast=True), hi)
            todo = todo & (lo < hi)
            n_todo = tl.sum(todo.to(tl.int32), 0)
        t = lo.to(tl.float32, bitcast=True)[:, None]
        mass_above = above_mass + tl.sum(tl.where(inside & (buf > t), buf, 0.0), 1)
        n_above = above_count + tl.sum((inside & (buf > t)).to(tl.int32), 1)
        n_tie = tl.sum((inside & (buf == t)).to(tl.int32), 1)
        tl.debug_barrier()  # before BUF is written again
    return lo, mass_above, n_above, n_tie, in_regs


@triton.jit
def _above(P, row_off, live, nvis, nvis_max, t, BM: tl.constexpr, BT: tl.constexpr):
    """Per row: mass and count of the candidates > t, count of those == t."""
    mass = tl.zeros([BM, BT], tl.float32)
    n_above = tl.zeros([BM, BT], tl.int32)
    n_tie = tl.zeros([BM, BT], tl.int32)
    for j0 in range(0, nvis_max, BT):
        p, cand, _ = _band_tile(P, row_off, live, nvis, j0 + tl.arange(0, BT))
        above = cand & (p > t[:, None])
        mass += tl.where(above, p, 0.0)
        n_above += above.to(tl.int32)
        n_tie += (cand & (p == t[:, None])).to(tl.int32)
    return tl.sum(mass, 1), tl.sum(n_above, 1), tl.sum(n_tie, 1)


@triton.jit
def _kept(p, cand, forced, t, quota, before):
    """Kept: forced, above t, or a tie at t with fewer than quota ties before it; and the ties (int32)."""
    tie = cand & (p == t[:, None])
    return forced | (cand & (p > t[:, None])) | (tie & (before < quota[:, None])), tie.to(tl.int32)


@triton.jit
def _select_band(P, BUF, row_off, live, nvis, nvis_max, gamma, min_blocks, STARTS, ENDS, out_off, width,
                 block_size, seqlen_k, shift, inv, BM: tl.constexpr, BT: tl.constexpr, CAP: tl.constexpr,
                 NORMALIZE: tl.constexpr):
    """Rule 2's selection for a band of rows of probabilities (row r at P + row_off[r], its first nvis[r]
    blocks visible, the last of them the diagonal): the kept blocks' runs as key ranges at
    STARTS / ENDS + out_off[r] (at most `width`, the rest not written). Returns the runs per row. BUF: BM x CAP
    floats of scratch. NORMALIZE: P holds log2-domain scores, made probabilities in place by the first pass
    (exp2(s - shift) * inv, per row)."""
    forced_mass = tl.zeros([BM, BT], tl.float32)
    total = tl.zeros([BM, BT], tl.float32)
    n_cand = tl.zeros([BM, BT], tl.int32)
    n_forced = tl.zeros([BM, BT], tl.int32)
    c_max = tl.full([BM, BT], -1.0, tl.float32)
    c_min = tl.full([BM, BT], 2.0, tl.float32)
    for j0 in range(0, nvis_max, BT):
        j = j0 + tl.arange(0, BT)
        p, cand, forced = _band_tile(P, row_off, live, nvis, j)
        if NORMALIZE:
            vis = cand | forced
            p = tl.where(vis, tl.exp2(p - shift[:, None]) * inv[:, None], 0.0)
            tl.store(P + row_off[:, None] + j[None, :], p, mask=vis)
        forced_mass += tl.where(forced, p, 0.0)
        total += tl.where(cand, p, 0.0)
        n_cand += cand.to(tl.int32)
        n_forced += forced.to(tl.int32)
        c_max = tl.maximum(c_max, tl.where(cand, p, -1.0))
        c_min = tl.minimum(c_min, tl.where(cand, p, 2.0))
    if NORMALIZE:
        tl.debug_barrier()  # the probabilities, written by every thread, are read by every thread
    need = gamma - tl.sum(forced_mass, 1)
    total = tl.sum(total, 1)
    n_cand = tl.sum(n_cand, 1)
    n_forced = tl.sum(n_forced, 1)
    lo = tl.min(c_min, 1).to(tl.int32, bitcast=True)
    hi = tl.max(c_max, 1).to(tl.int32, bitcast=True)
    least = min_blocks - n_forced  # the minimum budget, in candidates
    every = ((gamma + tl.zeros_like(need)) >= 1) | (total < need) | (least >= n_cand)
    nothing = (need <= 0) & (least <= 0)
    # The kept candidates are the larger of the gamma set and the `least` largest: both are the candidates
    # above a threshold (plus some ties at it), so the kept set's threshold is the largest v that satisfies
    # both mass(c >= v) >= need and count(c >= v) >= least: one search.
    searched = live & (every == 0) & (nothing == 0)
    # below (total - need) / n no value can be the gamma threshold (the candidates under it hold less than
    # total - need): a first step there leaves, on a peaked row, a bracket of the few values above it
    floor = tl.where(need > 0, (total - need) / tl.maximum(n_cand, 1), 0.0).to(tl.int32, bitcast=True)
    t, mass_above, n_above, n_tie, in_regs = _bisect(P, BUF, row_off, live, nvis, nvis_max, lo, hi, need, least,
                                                     searched, floor, BM, BT, CAP)
    t = t.to(tl.float32, bitcast=True)
    if tl.sum((searched & (in_regs == 0)).to(tl.int32), 0) > 0:  # a row closed its bracket on > CAP ties
        full_mass, full_above, full_tie = _above(P, row_off, live, nvis, nvis_max, t, BM, BT)
        mass_above = tl.where(in_regs, mass_above, full_mass)
        n_above = tl.where(in_regs, n_above, full_above)
        n_tie = tl.where(in_regs, n_tie, full_tie)
    # ties at t: the gamma rule takes them one by one while the kept mass is below need (none when the mass
    # above t reaches it: then t is the budget's threshold), the budget up to `least`
    ties = tl.where(mass_above < need, (need - mass_above) / tl.where(t > 0, t, 1.0), 0.0)
    ties = tl.where(mass_above < need, tl.maximum(tl.minimum(tl.ceil(ties), 1e9).to(tl.int32), 1), 0)
    quota = tl.minimum(tl.maximum(ties, least - n_above), n_tie)
    thr = tl.where(every, -1.0, tl.where(nothing, 2.0, t))
    quota = tl.where(every | nothing, 0, quota)
    # runs of kept blocks, in block order: a run starts where the previous block is not kept
    runs = tl.zeros([BM], tl.int32)
    ties_seen = tl.zeros([BM], tl.int32)
    for j0 in range(0, nvis_max, BT):
        j = j0 + tl.arange(0, BT)
        p, cand, forced = _band_tile(P, row_off, live, nvis, j)
        tie = (cand & (p == thr[:, None])).to(tl.int32)
        before = ties_seen[:, None] + tl.cumsum(tie, 1) - tie  # ties at thr before this block
        keep, _ = _kept(p, cand, forced, thr, quota, before)
        p_prev, cand_prev, forced_prev = _band_tile(P, row_off, live, nvis, j - 1)
        tie_prev = (cand_prev & (p_prev == thr[:, None])).to(tl.int32)
        keep_prev, _ = _kept(p_prev, cand_prev, forced_prev, thr, quota, before - tie_prev)
        p_next, cand_next, forced_next = _band_tile(P, row_off, live, nvis, j + 1)
        keep_next, _ = _kept(p_next, cand_next, forced_next, thr, quota, before + tie)
        first = (keep & (keep_prev == 0)).to(tl.int32)
        last = keep & (keep_next == 0)
        run = runs[:, None] + tl.cumsum(first, 1) - 1
        fits = run < width
        tl.store(STARTS + out_off[:, None] + run, j[None, :] * block_size, mask=(first != 0) & fits)
        tl.store(ENDS + out_off[:, None] + run, tl.minimum((j[None, :] + 1) * block_size, seqlen_k),
                 mask=last & fits)
        runs += tl.sum(first, 1)
        ties_seen += tl.sum(tie, 1)
    return runs


@triton.jit(do_not_specialize=("n_work", "n_bands", "nq", "nk", "seqlen_q", "seqlen_k", "min_blocks", "width"))
def _query_aware_kernel(QP, KP, GAMMA, QA, SCR, COUNTS, STARTS, ENDS, STATS,
                        n_work, n_bands, n_heads, num_heads, group, nq, nk, seqlen_q, seqlen_k, block_size, min_blocks,
                        width, scale_log2, BM: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, DP: tl.constexpr,
                        DOT: tl.constexpr, CAP: tl.constexpr):
    pid = tl.program_id(0)
    scratch = SCR + pid.to(tl.int64) * BM * (nk + CAP)  # the band's probabilities, then BM x CAP for _bisect
    r = tl.arange(0, BM)
    d = tl.arange(0, DP)
    row_off = r.to(tl.int64) * nk
    offset = seqlen_k - seqlen_q
    w = pid
    while w < n_work:
        bh = w % n_heads
        band = n_bands - 1 - w // n_heads  # the longest bands (of every head) first
        qb = band * BM + r
        live = qb < nq
        last = tl.minimum(qb * block_size + block_size, seqlen_q) - 1 + offset
        nvis = tl.where(live & (last >= 0), tl.minimum(tl.maximum(last, 0) // block_size + 1, nk), 0)
        out_row = bh.to(tl.int64) * nq + qb
        if tl.load(QA + bh) != 0:
            h = bh % num_heads
            kv = (bh // num_heads) * (num_heads // group) + h // group
            q = tl.load(QP + out_row[:, None] * DP + d[None, :], mask=live[:, None], other=0.0)
            kbase = KP + kv.to(tl.int64) * nk * DP
            nvis_max = tl.max(nvis, 0)
            if DOT == 1:
                q = q.to(tl.bfloat16)
            elif DOT == 2:
                q = q.to(tl.float16)
            m_i = tl.full([BM], float("-inf"), tl.float32)
            l_i = tl.zeros([BM], tl.float32)
            # one pass of products: the scores go to the scratch with each row's running max and sum; the
            # selection's first pass turns them into probabilities in place
            for j0 in range(0, nvis_max, BN):
                s = _band_logits(q, kbase, j0, d, nvis, nvis_max, scale_log2, BN, DP, DOT)
                j = j0 + tl.arange(0, BN)
                tl.store(scratch + row_off[:, None] + j[None, :], s, mask=j[None, :] < nvis[:, None])
                m_i, l_i = online_max_sum(m_i, l_i, s)
            safe, inv = softmax_terms(m_i, l_i)
            tl.debug_barrier()  # the band's scores, written by every thread, are read by every thread
            runs = _select_band(scratch, scratch + BM * nk, row_off, live, nvis, nvis_max, tl.load(GAMMA + h),
                                min_blocks, STARTS, ENDS, out_row * width, width, block_size, seqlen_k, safe, inv, BM,
                                BT, CAP, True)
            tl.debug_barrier()  # before the next band overwrites the scratch
        else:
            runs = tl.zeros([BM], tl.int32)
        tl.store(COUNTS + out_row, runs, mask=live)
        tl.atomic_max(STATS, tl.max(runs, 0))
        w += tl.num_programs(0)


@triton.jit
def _band_logits(q, kbase, j0, d, nvis, nvis_max, scale_log2, BN: tl.constexpr, DP: tl.constexpr, DOT: tl.constexpr):
    """log2-domain scores [BM, BN] of the band's pooled queries against key blocks j0 .. j0 + BN, -inf where
    a row does not see the block."""
    j = j0 + tl.arange(0, BN)
    k = tl.load(kbase + j[:, None].to(tl.int64) * DP + d[None, :], mask=(j < nvis_max)[:, None], other=0.0)
    if DOT == 0:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    elif DOT == 1:
        s = tl.dot(q, tl.trans(k.to(tl.bfloat16)))
    else:
        s = tl.dot(q, tl.trans(k.to(tl.float16)))
    return tl.where(j[None, :] < nvis[:, None], s * scale_log2, float("-inf"))


def query_aware_triton(qp: torch.Tensor, kp: torch.Tensor, gamma: torch.Tensor, flag: torch.Tensor,
                       stats: torch.Tensor, *, block_size: int, seqlen_q: int, seqlen_k: int, scale: float,
                       min_blocks: int, width: int, dtype: torch.dtype):
    """Rule 2 for the heads with flag 1 (int8 [B, Hq]): (counts int32 [B, Hq, nq], starts, ends int32
    [B, Hq, nq, width]) from the pooled queries qp [B, Hq, nq, DP] and keys kp [B, Hkv, nk, DP] (pool_triton's)
    and gamma float32 [Hq]; the scores in `dtype` (float32: exact products). Rows of other heads get count 0.
    Runs past `width` are counted, not written; stats[0] (int32) is raised to the most runs of a row."""
    b, hq, nq, dp = qp.shape
    hkv, nk = kp.shape[1], kp.shape[2]
    n_bands = triton.cdiv(nq, _BM)
    n_work = b * hq * n_bands
    n_sm = torch.cuda.get_device_properties(qp.device).multi_processor_count if qp.is_cuda else 1
    programs = max(1, min(n_work, _PROGRAMS_PER_SM * n_sm, _SCRATCH_ELEMENTS // (_BM * (nk + _CAP))))
    scratch = torch.empty(programs, _BM, nk + _CAP, dtype=torch.float32, device=qp.device)
    counts = torch.empty(b, hq, nq, dtype=torch.int32, device=qp.device)
    starts = torch.empty(b, hq, nq, width, dtype=torch.int32, device=qp.device)
    ends = torch.empty_like(starts)
    _query_aware_kernel[(programs,)](
        qp, kp, gamma, flag, scratch, counts, starts, ends, stats, n_work, n_bands, b * hq, hq, hq // hkv, nq, nk,
        seqlen_q, seqlen_k, block_size, min_blocks, width, scale * LOG2E, BM=_BM, BN=_BN, BT=_BT, DP=dp,
        DOT=_dot_code(dtype), CAP=_CAP, num_warps=4, num_stages=2, maxnreg=128)
    return counts, starts, ends
