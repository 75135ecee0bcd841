"""XAttention pattern: key blocks chosen per query block by strided antidiagonal scoring, kept up to a
cumulative share `tau` of the estimated attention mass.

Scoring, per query head: queries and keys are cut into groups of `stride` consecutive tokens; a query group
r is the concatenation q[rS], q[rS+1], .., q[rS+S-1] and a key group c the concatenation k[cS+S-1], ..,
k[cS] (reversed), so one dot product of the two sums the S products on an antidiagonal of the S x S tile
(r, c). Those sums, times scale / S, are softmaxed over the key groups each query group may see (causal,
bottom-right), summed over the tiles of each (query block, key block) and averaged over the block's query
groups: an estimate of the attention mass the block's rows give each key block, at 1 / S of the cost of
the scores. Then per query block, with the first and the diagonal (last visible) key block always kept,
the other visible blocks are taken by decreasing estimate (ties: lower block id first) until the kept
estimate reaches tau; tau >= 1 keeps every visible block.

Work and memory: the scores are made a chunk of query groups and one kv head's query heads at a time, and
reduced to the chunk's block scores before the next, so no S x S (or S x S / stride) tensor is built. On
CUDA (backend "triton") one fused kernel does it per band of query blocks: the antidiagonal sums as
`stride` matrix products of query rows with reversed key rows, the softmax over key groups (a first pass
for each row's max and sum, a second for the probabilities) and the sums per key block, so the strided
scores never reach memory; the torch path is its reference.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._triton import LOG2E, online_max_sum, softmax_terms
from ..layouts import BlockLayout
from ..patterns import Param, Pattern, register_pattern

__all__ = ["antidiagonal_block_scores", "xattention_select", "PATTERN"]

# Elements of one chunk of strided scores (float32): 2**26 is 256 MiB.
_CHUNK_ELEMENTS = 1 << 26
# Query blocks a selection chunk holds at least: at 1M tokens the element budget alone allowed 32, so each
# scoring launch ran one program per SM and the selection took 512 launches and sorts in a row.
_MIN_CHUNK_BLOCKS = 128


def _check(block_size: int, stride: int) -> None:
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride: expected a positive int, got {stride!r}")
    if block_size % stride:
        raise ValueError(f"stride: expected a divisor of block_size ({block_size}), got {stride}")


def _groups(x: torch.Tensor, stride: int, reverse: bool) -> torch.Tensor:
    """[.., S, D] -> [.., ceil(S / stride), stride * D]: each group of `stride` tokens concatenated (zero
    padded at the end), in reverse order within the group if `reverse`."""
    s = x.shape[-2]
    pad = -s % stride
    x = F.pad(x, (0, 0, 0, pad)).unflatten(-2, (-1, stride))
    if reverse:
        x = x.flip(-2)
    return x.flatten(-2)


@triton.jit
def _antidiagonal_tile(qbase, kbase, c, grp, valid, last, d, sq, sk, nkg, s_qm, s_kn, S: tl.constexpr,
                       QBP: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """(antidiagonal sums [query groups, key groups c], which of them count): query row g*S + t meets key
    row c*S + S - 1 - t, summed over t."""
    s = tl.zeros([QBP, BN], tl.float32)
    for t in range(S):  # a runtime loop: one pair of operand tiles in shared memory at a time
        qr = grp * S + t
        qv = tl.load(qbase + qr[:, None].to(tl.int64) * s_qm + d[None, :], mask=(valid & (qr < sq))[:, None],
                     other=0.0)
        kr = c * S + S - 1 - t
        kv = tl.load(kbase + kr[:, None].to(tl.int64) * s_kn + d[None, :], mask=(kr < sk)[:, None], other=0.0)
        s += tl.dot(qv, tl.trans(kv), input_precision=PREC)
    ok = (c < nkg)[None, :] & valid[:, None]
    if CAUSAL:
        ok = ok & (c[None, :] * S <= last[:, None])
    return s, ok


@triton.jit(do_not_specialize=("qb0", "qb1", "sq", "sk", "nkg", "s_ob", "s_oh", "s_om"))
def _antidiagonal_kernel(Q, K, OUT, qb0, qb1, sq, sk, nkg, scale_log2, s_qb, s_qh, s_qm, s_kb, s_kh, s_kn,
                         s_ob, s_oh, s_om, num_heads, group, S: tl.constexpr, PER: tl.constexpr, QB: tl.constexpr,
                         BN: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    hk = h // group
    m = tl.arange(0, QB * PER)
    qblock = qb0 + pid * QB + m // PER
    grp = qblock * PER + m % PER  # query groups, PER per block
    valid = (qblock < qb1) & (grp * S < sq)
    last = tl.minimum(grp * S + S, sq) - 1 + (sk - sq)
    d = tl.arange(0, D)
    qbase = Q + b * s_qb + h * s_qh
    kbase = K + b * s_kb + hk * s_kh
    # Key groups past the last one any row sees hold no mass (zeros, written by the caller): not scored.
    stop = tl.minimum(nkg, tl.max(tl.where(valid, last, 0), 0) // S + 1) if CAUSAL else nkg
    m_i = tl.full([QB * PER], float("-inf"), tl.float32)
    l_i = tl.zeros([QB * PER], tl.float32)
    for c0 in range(0, stop, BN):
        c = c0 + tl.arange(0, BN)
        s, ok = _antidiagonal_tile(qbase, kbase, c, grp, valid, last, d, sq, sk, nkg, s_qm, s_kn, S, QB * PER, BN,
                                   CAUSAL, PREC)
        m_i, l_i = online_max_sum(m_i, l_i, tl.where(ok, s * scale_log2, float("-inf")))
    safe, inv = softmax_terms(m_i, l_i)
    rows = tl.minimum(PER, tl.cdiv(sq - (qb0 + pid * QB + tl.arange(0, QB)) * (PER * S), S))  # groups per block
    rows = tl.maximum(rows, 1).to(tl.float32)
    for c0 in range(0, stop, BN):
        c = c0 + tl.arange(0, BN)
        s, ok = _antidiagonal_tile(qbase, kbase, c, grp, valid, last, d, sq, sk, nkg, s_qm, s_kn, S, QB * PER, BN,
                                   CAUSAL, PREC)
        p = tl.where(ok, tl.exp2(s * scale_log2 - safe[:, None]) * inv[:, None], 0.0)
        per_block = tl.sum(tl.reshape(p, [QB * PER, BN // PER, PER]), 2)  # [rows, key blocks of the tile]
        per_query = tl.sum(tl.reshape(per_block, [QB, PER, BN // PER]), 1) / rows[:, None]
        qi = pid * QB + tl.arange(0, QB)
        kb = c0 // PER + tl.arange(0, BN // PER)
        tl.store(OUT + b * s_ob + h * s_oh + qi[:, None].to(tl.int64) * s_om + kb[None, :], per_query,
                 mask=(qb0 + qi < qb1)[:, None] & (kb * PER < nkg)[None, :])


def _scores_triton(q, k, block_size: int, stride: int, scale: float, causal: bool, qb0: int, qb1: int):
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    nk = -(-sk // block_size)
    per = block_size // stride
    nkg = -(-sk // stride)
    dp = max(16, triton.next_power_of_2(d))
    if dp != d or q.stride(-1) != 1 or k.stride(-1) != 1:  # tl.dot needs a power-of-two width; zeros add nothing
        q, k = F.pad(q, (0, dp - d)), F.pad(k, (0, dp - d))
    out = torch.zeros(b, hq, qb1 - qb0, nk, dtype=torch.float32, device=q.device)  # causal: unseen blocks 0
    qblocks = max(1, 64 // per)  # 64 query groups a program: matrix-unit tiles, each key tile read for 64 rows
    bn = max(64, per)
    grid = (triton.cdiv(qb1 - qb0, qblocks), b * hq)
    _antidiagonal_kernel[grid](
        q, k, out, qb0, qb1, sq, sk, nkg, scale * LOG2E, q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2), out.stride(0), out.stride(1), out.stride(2), hq, hq // hkv,
        S=stride, PER=per, QB=qblocks, BN=bn, D=dp, CAUSAL=causal,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=1)
    return out


def antidiagonal_block_scores(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 64, stride: int = 8,
                              scale: Optional[float] = None, causal: bool = True, qb0: int = 0,
                              qb1: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """float32 [B, Hq, qb1 - qb0, nk]: the estimated attention mass of query blocks [qb0, qb1) on each key
    block (each row sums to 1 over the blocks it may see). q [B, Hq, Sq, D], k [B, Hkv, Sk, D] (GQA).
    backend: "triton" (the fused kernel; CUDA or the interpreter), "torch", or "auto" (triton on CUDA)."""
    _check(block_size, stride)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "triton":
        nq = -(-q.shape[2] // block_size)
        scale = (q.shape[-1] ** -0.5 if scale is None else float(scale)) / stride
        return _scores_triton(q, k, block_size, stride, scale, causal, qb0, nq if qb1 is None else qb1)
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    nq, nk = -(-sq // block_size), -(-sk // block_size)
    qb1 = nq if qb1 is None else qb1
    scale = (d ** -0.5 if scale is None else float(scale)) / stride
    per = block_size // stride  # groups per block
    cdt = q.dtype if q.is_cuda else torch.float32
    kg = _groups(k.to(cdt), stride, reverse=True)  # [B, Hkv, nkg, S*D]
    nkg = kg.shape[2]
    col_first = torch.arange(nkg, device=q.device) * stride  # first key of each key group
    off = sk - sq
    rows_per_chunk = max(per, (_CHUNK_ELEMENTS // max(1, b * g * nkg)) // per * per)
    out = torch.empty(b, hq, qb1 - qb0, nk, dtype=torch.float32, device=q.device)
    for r0 in range(qb0 * block_size, min(qb1 * block_size, sq), rows_per_chunk * stride):
        r1 = min(r0 + rows_per_chunk * stride, qb1 * block_size, sq)
        qg = _groups(q[:, :, r0:r1].to(cdt), stride, reverse=False)  # [B, Hq, rows, S*D]
        rows = qg.shape[2]
        s = torch.matmul(qg.unflatten(1, (hkv, g)), kg.unsqueeze(2).transpose(-1, -2)).float() * scale
        s = s.flatten(1, 2)  # [B, Hq, rows, nkg]
        last_row = torch.clamp(r0 + (torch.arange(rows, device=q.device) + 1) * stride, max=r1) - 1
        visible = col_first[None, :] <= (last_row[:, None] + off if causal else sk - 1)
        p = torch.softmax(s.masked_fill_(~visible, float("-inf")), dim=-1).nan_to_num_(0.0)
        del s
        # Sum over each key block's groups, then over each query block's groups.
        p = F.pad(p, (0, nk * per - nkg)).unflatten(-1, (nk, per)).sum(-1)  # [B, Hq, rows, nk]
        first_block = r0 // block_size
        row_block = (r0 + torch.arange(rows, device=q.device) * stride) // block_size - first_block
        nb = int(row_block[-1]) + 1
        blocks = torch.zeros(b, hq, nb, nk, dtype=torch.float32, device=q.device)
        blocks.index_add_(2, row_block, p)
        counts = torch.bincount(row_block, minlength=nb).clamp(min=1).float()
        out[:, :, first_block - qb0: first_block - qb0 + nb] = blocks / counts[:, None]
    return out


def xattention_select(q: torch.Tensor, k: torch.Tensor, tau, *, block_size: int = 64, stride: int = 8,
                      scale: Optional[float] = None, causal: bool = True, backend: str = "auto") -> BlockLayout:
    """The XAttention layout (see the module docstring). tau: a float, or one per query head. backend: that
    of antidiagonal_block_scores."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    nq, nk = -(-sq // block_size), -(-sk // block_size)
    tau = torch.as_tensor(tau, dtype=torch.float64).flatten().cpu()
    tau = (tau.expand(hq) if tau.numel() == 1 else tau).to(q.device).float().view(1, hq, 1, 1)
    off = sk - sq
    blocks = torch.arange(nk, device=q.device)
    chunk = max(_MIN_CHUNK_BLOCKS, _CHUNK_ELEMENTS // max(1, b * hq * nk * 4))
    counts, ids = [], []
    for qb0 in range(0, nq, chunk):
        qb1 = min(nq, qb0 + chunk)
        score = antidiagonal_block_scores(q, k, block_size=block_size, stride=stride, scale=scale, causal=causal,
                                          qb0=qb0, qb1=qb1, backend=backend)
        last_key = (torch.arange(qb0, qb1, device=q.device) * block_size + block_size).clamp(max=sq) - 1 + off
        diag = torch.div(last_key, block_size, rounding_mode="floor").clamp(max=nk - 1)  # -1: sees nothing
        if not causal:
            diag = torch.full_like(diag, nk - 1)
        visible = blocks[None, :] <= diag[:, None]  # [chunk, nk]
        forced = visible & ((blocks[None, :] == 0) | (blocks[None, :] == diag[:, None]))
        # Order: forced first, then by decreasing score, ties to the lower id (a stable sort over ids).
        key = torch.where(forced, float("inf"), torch.where(visible, score, float("-inf")))
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices
        mass = torch.gather(torch.where(visible, score, 0.0).expand_as(key), -1, order).cumsum(-1)
        ranked_visible = torch.gather(visible.expand_as(key), -1, order)
        before = F.pad(mass[..., :-1], (1, 0))  # mass kept before each entry
        take = ranked_visible & ((before < tau) | (tau >= 1) | torch.gather(forced.expand_as(key), -1, order))
        n = take.sum(-1)
        # Kept as wide as this chunk's longest list (not nk): the whole call's lists stay O(kept blocks).
        chosen = torch.where(take, order, nk).sort(-1).values[..., : max(1, int(n.max()))]
        counts.append(n.to(torch.int32))
        ids.append(chosen.to(torch.int32))
    width = max(c.shape[-1] for c in ids)
    counts_t = torch.cat(counts, 2)
    ids_t = torch.cat([F.pad(c, (0, width - c.shape[-1]), value=nk) for c in ids], 2)
    ids_t = torch.where(ids_t < nk, ids_t, -1).to(torch.int32)
    return BlockLayout(counts_t.contiguous(), ids_t.contiguous(), block_size, block_size, sq, sk, validate=False)


def _estimate(q, k, budgets, *, causal: bool, scale, block_size: int, stride: int = 8):
    return xattention_select(q, k, budgets["tau"], block_size=block_size, stride=stride, scale=scale, causal=causal)


def _build(layout, q, k, budgets, *, causal: bool, block_size: int, stride: int = 8) -> BlockLayout:
    return layout


def _taus(seqlen: int, block_size: int) -> List[Dict[str, Any]]:
    return [{"tau": t} for t in (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)]


PATTERN = register_pattern(Pattern(
    name="xattention",
    summary="XAttention: key blocks by strided antidiagonal scores, kept up to a cumulative share tau",
    layout=BlockLayout,
    budgets=(Param("tau", float, 0.9, 1e-6, 1.0, doc="share of the estimated mass each query block keeps"),),
    options=(Param("stride", int, 8, 1, 64, doc="antidiagonal stride: tokens per scoring group (divides block_size)"),),
    estimate=_estimate,
    build=_build,
    full_budget=lambda seqlen_q, seqlen_k, block_size: {"tau": 1.0},
    candidates=_taus,
    sweep=_taus,
    # One score per stride x stride tile: 2 * D * S^2 / stride FLOPs, 1 / stride of dense causal attention's.
    estimator_cost=lambda seqlen, *, block_size, stride=8, **options: 1.0 / stride,
    speed_tflops=467.0,  # the block-sparse kernel's measured rate
    causal_only=False,
    color="tab:brown",
))
