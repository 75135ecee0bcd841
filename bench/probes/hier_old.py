"""The hierarchical kernels as they were before the 2026-12-06 rework (one program per query head and query
block, the block-mean queries by torch, unchunked decode scores), frozen here so that
bench/probes/hier_speed.py times old and new in one GPU run. Triton path only; delete once decided."""
import math

import torch
import triton
import triton.language as tl

from sparse_attn._triton import INTERPRETED
from sparse_attn.estimators.a_shape import per_head
from sparse_attn.estimators.block_sparse import pool_blocks
from sparse_attn.estimators.hierarchical import _check_local, _pow2
from sparse_attn.layouts import BlockLayout, PageSelection


@triton.jit
def _branch_keys(score, start, live):
    """int64 sort keys: the score's order-preserving bits above, (2^32 - 1 - start) below, so a descending
    sort puts higher scores first and, among equal scores, lower starts first; dead branches lowest."""
    bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True)  # -0.0 ties with 0.0
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = (bits.to(tl.int64) << 32) | (0xFFFFFFFF - start.to(tl.int64))
    return tl.where(live, key, -9223372036854775808)


@triton.jit
def _keep_best(score, start, live, m, M: tl.constexpr):
    """The best m of the 2M branches by _branch_keys: [M] starts in key order, kept, and their scores (read
    back from the keys, so a kept branch's left half needs no new score)."""
    srt = tl.sort(_branch_keys(score, start, live), descending=True)
    top, _ = tl.split(tl.permute(tl.reshape(srt, [2, M]), [1, 0]))
    keep = (tl.arange(0, M) < m) & (top != -9223372036854775808)
    bits = (top >> 32).to(tl.int32)
    best = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.float32, bitcast=True)
    return (0xFFFFFFFF - (top & 0xFFFFFFFF)).to(tl.int32), keep, best


@triton.jit
def _block_units(QB, KB, p, ok, s_kn, D: tl.constexpr, BD: tl.constexpr):
    """qbar . kbar[p] where ok (else -inf): the score of the branches starting at key blocks p."""
    acc = tl.zeros(p.shape, tl.float32)
    for c in tl.static_range(D // BD):
        d = c * BD + tl.arange(0, BD)
        qc = tl.load(QB + d)
        kc = tl.load(KB + p.to(tl.int64)[:, None] * s_kn + d[None, :], mask=ok[:, None], other=0.0)
        acc += tl.sum(kc.to(tl.float32) * qc[None, :], 1)
    return tl.where(ok, acc, float("-inf"))


@triton.jit
def _roots(n, m, hi, M: tl.constexpr):
    """The first level: root width w (the smallest power of two with n <= 2 m w), the number of splits
    log2(w), and the roots' starts and liveness (none unless there are more than m candidates)."""
    per = (n + 2 * m - 1) // (2 * m)
    w = 1
    splits = 0
    for _ in tl.static_range(31):
        grow = w < per
        w = tl.where(grow, w * 2, w)
        splits += grow.to(tl.int32)
    j = tl.arange(0, 2 * M)
    start = 1 + j * w
    return w, splits, start, (n > m) & (j < 2 * m) & (start < hi)


@triton.jit
def _prefill_kernel(QBAR, KBAR, TOPK, IDX, CNT, s_qb, s_qh, s_qn, s_kb, s_kh, s_kn, s_ib, s_ih, s_in,
                    Hq, G, sq, sk, nk, bs, local,
                    M: tl.constexpr, LOCAL: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    i = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    m = tl.load(TOPK + h)
    last = tl.minimum(i * bs + bs, sq) - 1 + (sk - sq)  # last key the block's rows may see
    diag = tl.minimum(tl.where(last >= 0, last // bs, -1), nk - 1)
    hi = tl.maximum(diag - local + 1, 1)  # candidates [1, hi); local blocks [hi, diag]
    n = tl.where(diag >= 1, hi - 1, 0)
    QB = QBAR + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + i.to(tl.int64) * s_qn
    KB = KBAR + b.to(tl.int64) * s_kb + (h // G).to(tl.int64) * s_kh
    size, splits, start, live = _roots(n, m, hi, M)
    score = _block_units(QB, KB, start, live, s_kn, D, BD)
    for _ in range(splits):
        top, keep, best = _keep_best(score, start, live, m, M)
        size = size // 2
        right = top + size
        right_live = keep & (right < hi)
        start = tl.interleave(top, right)
        live = tl.interleave(keep, right_live)
        score = tl.interleave(best, _block_units(QB, KB, right, right_live, s_kn, D, BD))
    top, keep, _ = _keep_best(score, start, live, m, M)
    search = n > m
    r = tl.arange(0, M)
    chosen = tl.where(search, tl.where(keep, top, 2147483647), tl.where(r < n, 1 + r, 2147483647))
    chosen = tl.sort(chosen)
    n_chosen = tl.where(search, m, n)
    row = IDX + b.to(tl.int64) * s_ib + h.to(tl.int64) * s_ih + i.to(tl.int64) * s_in
    tl.store(row, 0, mask=diag >= 0)
    tl.store(row + 1 + r, chosen, mask=r < n_chosen)
    t = tl.arange(0, LOCAL)
    n_local = tl.where(diag >= 1, diag - hi + 1, 0)
    tl.store(row + 1 + n_chosen + t, hi + t, mask=t < n_local)
    tl.store(CNT + bh * tl.num_programs(0) + i, tl.where(diag >= 0, 1 + n_chosen + n_local, 0))


@triton.jit
def _page_units(KMIN, KMAX, SLOTS, qpos, qneg, p, ok, s_mp, D: tl.constexpr):
    """Quest's bound of pages p where ok (else -inf): the score of the branches starting there."""
    d = tl.arange(0, D)
    slot = tl.load(SLOTS + p, mask=ok, other=0).to(tl.int64)
    at = slot[:, None] * s_mp + d[None, :]
    mn = tl.load(KMIN + at, mask=ok[:, None], other=0.0).to(tl.float32)
    mx = tl.load(KMAX + at, mask=ok[:, None], other=0.0).to(tl.float32)
    return tl.where(ok, tl.sum(mx * qpos[None, :] + mn * qneg[None, :], 1), float("-inf"))


@triton.jit
def _decode_kernel(Q, KMIN, KMAX, STABLE, SEQLENS, PAGES, CNT, s_qb, s_qh, s_mp, s_mh, s_sb, s_pb, s_ph,
                   Hkv, m, local, ps,
                   G: tl.constexpr, M: tl.constexpr, LOCAL: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // Hkv
    h = bh % Hkv
    d = tl.arange(0, D)
    qpos = tl.zeros([D], tl.float32)
    qneg = tl.zeros([D], tl.float32)
    for g in tl.static_range(G):
        q = tl.load(Q + b.to(tl.int64) * s_qb + (h * G + g).to(tl.int64) * s_qh + d).to(tl.float32)
        qpos += tl.maximum(q, 0.0)
        qneg += tl.minimum(q, 0.0)
    npages = (tl.load(SEQLENS + b) + ps - 1) // ps
    hi = tl.maximum(npages - local, 1)  # candidates [1, hi); local pages [hi, npages)
    n = tl.where(npages >= 2, hi - 1, 0)
    SLOTS = STABLE + b.to(tl.int64) * s_sb
    KN = KMIN + h.to(tl.int64) * s_mh
    KX = KMAX + h.to(tl.int64) * s_mh
    size, splits, start, live = _roots(n, m, hi, M)
    score = _page_units(KN, KX, SLOTS, qpos, qneg, start, live, s_mp, D)
    for _ in range(splits):
        top, keep, best = _keep_best(score, start, live, m, M)
        size = size // 2
        right = top + size
        right_live = keep & (right < hi)
        start = tl.interleave(top, right)
        live = tl.interleave(keep, right_live)
        score = tl.interleave(best, _page_units(KN, KX, SLOTS, qpos, qneg, right, right_live, s_mp, D))
    top, keep, _ = _keep_best(score, start, live, m, M)
    search = n > m
    r = tl.arange(0, M)
    chosen = tl.where(search, tl.where(keep, top, 2147483647), tl.where(r < n, 1 + r, 2147483647))
    n_chosen = tl.where(search, m, n)
    row = PAGES + b.to(tl.int64) * s_pb + h.to(tl.int64) * s_ph
    tl.store(row, 0, mask=npages >= 1)
    tl.store(row + 1 + r, chosen, mask=r < n_chosen)
    t = tl.arange(0, LOCAL)
    n_local = tl.where(npages >= 2, npages - hi, 0)
    tl.store(row + 1 + n_chosen + t, hi + t, mask=t < n_local)
    tl.store(CNT + bh, tl.minimum(npages, 1) + n_chosen + n_local)


def hierarchical_layout(q, k, top_k, *, block_size: int = 64, local: int = 1) -> BlockLayout:
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"q: expected a multiple of k's {hkv} heads, got {hq}")
    local = _check_local(local)
    bs = block_size
    nq, nk = -(-sq // bs), -(-sk // bs)
    m = per_head("top_k", top_k, hq, minimum=1).clamp(max=nk)
    width = max(1, min(nk, 1 + int(m.max()) + local))
    qbar = pool_blocks(q, bs)  # [B, Hq, nq, D] float32
    # The block-mean keys in k's dtype on the GPU (half the bytes the search gathers), float32 on the CPU.
    # (k's dtype also when compiled on a CPU for sm_90, as bench/probes/hier_sass.py does)
    kbar = pool_blocks(k, bs).to(k.dtype if k.is_cuda or not INTERPRETED else torch.float32)  # [B, Hkv, nk, D]
    idx = torch.full((b, hq, nq, width), -1, dtype=torch.int32, device=q.device)
    counts = torch.empty(b, hq, nq, dtype=torch.int32, device=q.device)
    _prefill_kernel[(nq, b * hq)](
        qbar, kbar, m.to(torch.int32).to(q.device), idx, counts, *qbar.stride()[:3], *kbar.stride()[:3],
        *idx.stride()[:3], hq, hq // hkv, sq, sk, nk, bs, local,
        M=_pow2(int(m.max())), LOCAL=_pow2(local), D=d, BD=math.gcd(d, 32), num_warps=4)
    return BlockLayout(counts, idx, bs, bs, sq, sk, validate=False)


def hierarchical_pages(q, cache, summaries, *, top_k: int, local: int = 1) -> PageSelection:
    if q.dim() == 4:
        q = q[:, :, 0]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k: expected an int >= 1 (pages the search picks), got {top_k!r}")
    local = _check_local(local)
    b, hq, d = q.shape
    hkv, ps = cache.num_kv_heads, cache.page_size
    m = min(top_k, cache.max_pages)
    width = max(1, min(cache.max_pages, 1 + m + local))
    pages = torch.empty(b, hkv, width, dtype=torch.int32, device=q.device)
    counts = torch.empty(b, hkv, dtype=torch.int32, device=q.device)
    _decode_kernel[(b * hkv,)](
        q, summaries.kmin, summaries.kmax, summaries.table, cache.seqlens, pages, counts, q.stride(0), q.stride(1),
        summaries.kmin.stride(0), summaries.kmin.stride(1), summaries.table.stride(0), pages.stride(0),
        pages.stride(1), hkv, m, local, ps,
        G=hq // hkv, M=_pow2(m), LOCAL=_pow2(local), D=d, num_warps=4)
    return PageSelection(pages, counts, ps)
