"""Probe: what bounds the vertical-slash attention kernel (issue 4's speed bar)? A scratch measurement,
not a benchmark of the package: it times stripped-down copies of the range-tile loop on the real layout.

    python bench/probe_vs_bound.py --seqlens 131072

For the benchmark's structured inputs (bench_methods.make_inputs) it builds the vertical-slash layout
(1000 / 6096), then times, over the same flat tile list the product kernel walks (range tiles only):
  full       loads + QK^T + online softmax + PV (what the product kernel does per range tile)
  nosoftmax  loads + QK^T + PV, P = S cast to bf16 (no max / exp / rescale)
  noload     full softmax and both GEMMs, but every tile reads keys [t % 64, t % 64 + 64): L1/L2 hot
  loadonly   the K/V loads, summed into the accumulator (no GEMM, no softmax)
and an L2 read-bandwidth probe (a 32 MB buffer read over and over by every SM). It also prints layout
statistics: ranges and tiles per block, the useful fraction of the computed tiles, and how much larger the
union of the key sets of the query heads sharing a kv head is than one head's set (sampled blocks).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

MODES = {"full": 0, "nosoftmax": 1, "noload": 2, "loadonly": 3}


@triton.jit
def _probe_kernel(Q, K, V, O, COUNTS, FIRST_TILE, T_START, T_END, nqb, group, num_heads, S, qk_scale,
                  BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, MODE: tl.constexpr):
    qb = nqb - 1 - tl.program_id(0) // group
    hk = tl.program_id(1)
    h = hk * group + tl.program_id(0) % group
    rows = qb * BM + tl.arange(0, BM)
    d = tl.arange(0, D)
    lane = tl.arange(0, BN)
    q = tl.load(Q + (h.to(tl.int64) * S + rows[:, None]) * D + d[None, :])
    Kb = K + hk.to(tl.int64) * S * D
    Vb = V + hk.to(tl.int64) * S * D
    block = h.to(tl.int64) * nqb + qb
    n_tiles = tl.load(COUNTS + block * 4)
    first = tl.load(FIRST_TILE + block)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for t in tl.range(first, first + n_tiles):
        start = tl.load(T_START + t)
        width = tl.load(T_END + t) - start
        if MODE == 2:
            start = t % 64
        inside = lane < width
        k = tl.load(Kb + (start.to(tl.int64) + lane[None, :]) * D + d[:, None], mask=inside[None, :], other=0.0)
        v = tl.load(Vb + (start.to(tl.int64) + lane[:, None]) * D + d[None, :], mask=inside[:, None], other=0.0)
        if MODE == 3:
            acc += (tl.sum(k.to(tl.float32), 1)[None, :] + tl.sum(v.to(tl.float32), 0)[None, :])
        elif MODE == 1:
            s = tl.dot(q, k)
            acc = tl.dot(s.to(v.dtype), v, acc)
        else:
            s = tl.dot(q, k)
            s = tl.where(inside[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(O + (h.to(tl.int64) * S + rows[:, None]) * D + d[None, :], out.to(O.dtype.element_ty))


@triton.jit
def _l2_kernel(X, OUT, n_chunks, passes, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([CHUNK], tl.float32)
    for i in tl.range(0, passes):
        c = (pid + i * 7919) % n_chunks
        acc += tl.load(X + c.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)).to(tl.float32)
    tl.store(OUT + pid * CHUNK + tl.arange(0, CHUNK), acc)


def l2_bandwidth() -> float:
    from common import bench_ms

    chunk = 8192  # bf16 elements: 16 KB per load
    x = torch.randn(32 * 2**20 // 2, device="cuda", dtype=torch.bfloat16)  # 32 MB: fits the 50 MB L2
    n_chunks = x.numel() // chunk
    progs, passes = 132 * 8, 256
    out = torch.empty(progs * chunk, device="cuda", dtype=torch.float32)
    ms = bench_ms(lambda: _l2_kernel[(progs,)](x, out, n_chunks, passes, CHUNK=chunk, num_warps=8))
    return progs * passes * chunk * 2 / ms / 1e9  # TB/s


def layout_stats(layout, bn: int, seqlen: int, group: int, sample: int = 48) -> dict:
    rc = layout.range_counts[0].long()  # [H, nqb]
    width = (layout.range_ends[0] - layout.range_starts[0]).clamp(min=0).long()
    live = torch.arange(layout.max_ranges, device=rc.device)[None, None, :] < rc[..., None]
    width = width * live
    tiles = ((width + bn - 1) // bn) * live
    stats = {"ranges_per_block": rc.float().mean().item(),
             "range_width": (width.sum() / live.sum().clamp(min=1)).item(),
             "range_tiles_per_block": tiles.sum(-1).float().mean().item(),
             "useful_in_range_tiles": (width.sum() / (tiles.sum() * bn)).item(),
             "columns_per_block": layout.column_counts[0].float().mean().item()}
    # union of the key sets of the heads of each kv group, on sampled blocks
    h, nqb = rc.shape
    blocks = torch.linspace(nqb // 8, nqb - 1, sample).long().tolist()
    ratio = []
    for qb in blocks:
        sets = torch.zeros(h, seqlen, dtype=torch.bool, device=rc.device)
        for hh in range(h):
            for r in range(int(rc[hh, qb])):
                sets[hh, int(layout.range_starts[0, hh, qb, r]):int(layout.range_ends[0, hh, qb, r])] = True
            c = int(layout.column_counts[0, hh, qb])
            sets[hh, layout.column_indices[0, hh, qb, :c].long()] = True
        per = sets.view(h // group, group, seqlen)
        for g2 in (2, group):
            u = per.view(h // g2, g2, seqlen).any(1).sum(-1).float()
            one = per.view(h // g2, g2, seqlen).sum(-1).float().mean(-1)
            ratio.append((g2, (u / one).mean().item()))
    for g2 in sorted({g for g, _ in ratio}):
        stats[f"union_{g2}_heads_vs_one"] = sum(r for g, r in ratio if g == g2) / sum(1 for g, _ in ratio if g == g2)
    return stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[131072])
    p.add_argument("--skip-timing-above", type=int, default=131072)
    args = p.parse_args(argv)
    from bench_methods import make_inputs, parse_args as methods_args
    from common import bench_ms
    from sparse_attn import dispatch
    from sparse_attn.ops.vertical_slash import kernel as vsk

    print(f"L2 read bandwidth (32 MB buffer, 1056 programs): {l2_bandwidth():.2f} TB/s", flush=True)
    margs = methods_args([])
    for s in args.seqlens:
        q, k, v = make_inputs(margs, s, torch.bfloat16)
        configs = [{"pattern": "vertical_slash", "vertical_size": 1000, "slash_size": 6096}] * q.shape[1]
        common = dict(causal=True, scale=None, block_size=64, last_q=64)
        est = dispatch.estimate_pattern("vertical_slash", q, k, configs, **common)
        layout = dispatch.build_pattern("vertical_slash", est, q, k, configs, block_size=64)
        stats = layout_stats(layout, 64, s, q.shape[1] // k.shape[1])
        print(f"S={s}: " + ", ".join(f"{n}={x:.3f}" for n, x in stats.items()), flush=True)
        if s > args.skip_timing_above:
            continue
        ms = bench_ms(lambda: vsk.vertical_slash_attention(q, k, v, layout))
        print(f"S={s}: product kernel (plan + ranges + columns) {ms:.2f} ms", flush=True)
        cu = (layout.range_counts, layout.range_counts)
        counts, first, ts, te = vsk._plan(layout, cu, (s, s), q.shape[1], 64, True, False, split=False)
        n_tiles = int(counts[..., 0].sum())
        flops = 4.0 * 64 * 64 * 128 * n_tiles
        out = torch.empty_like(q)
        nqb = layout.num_query_blocks
        group = q.shape[1] // k.shape[1]
        for mode, code in MODES.items():
            fn = lambda: _probe_kernel[(nqb * group, k.shape[1])](  # noqa: E731
                q, k, v, out, counts, first, ts, te, nqb, group, q.shape[1], s, 0.0883883 * 1.4427,
                BM=64, BN=64, D=128, MODE=code, num_warps=4, num_stages=3)
            ms = bench_ms(fn)
            gbs = n_tiles * 2 * 64 * 128 * 2 / ms / 1e9
            print(f"S={s}: {mode:>10}: {ms:7.2f} ms, {flops / ms / 1e9:5.0f} TFLOP/s of range tiles, "
                  f"K/V {gbs:5.2f} TB/s ({n_tiles} tiles)", flush=True)


if __name__ == "__main__":
    main()
