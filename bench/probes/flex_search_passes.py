"""Probe (CPU): how many passes over its data each of FlexPrefill's threshold searches makes on the methods
benchmark's inputs, from a numpy model of the Triton kernels' search (snapped bisection, first step at
(total - need) / n, passes until the bracket fits the register copy).

    python bench/probes/flex_search_passes.py --seqlen 131072 --data structured mixed

A few heads (8 query / 2 kv, D=128) of the benchmark's inputs, in float32 on the CPU. Per query-aware head: the
passes over each band of 16 query blocks before every row's bracket holds <= 64 candidates (the kernel also
makes one pass of products, one that normalizes, one copy, one emission reading three tiles), and the element
visits against the earlier selection kernel (62 row-wide reductions per row of 2048). Per vertical-slash head:
the passes of the gamma search over the 2 x Sk columns and diagonals and of the budget's count search over the
columns before their brackets hold <= 4096.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import methods_inputs  # noqa: E402
from sparse_attn.estimators.block_sparse import pool_blocks  # noqa: E402
from sparse_attn.estimators.flexprefill.select import (decide_query_aware, last_block_scores,  # noqa: E402
                                                       pooled_block_probs)


def passes(c: np.ndarray, need: float, least: int, cap: int, first=None) -> int:
    """Passes of the snapped bisection for the largest v with mass(c >= v) >= need and count(c >= v) >= least,
    until the bracket holds <= cap candidates or closes."""
    bits = c.view(np.int32)
    lo, hi, n_in, n = bits.min(), bits.max(), None, 0
    while lo < hi and (n_in is None or n_in > cap):
        mid = lo + (hi - lo + 1) // 2
        if n == 0 and first is not None and lo < first <= hi:
            mid = first
        v = np.int32(mid).view(np.float32)
        ge = c >= v
        ok = c[ge].sum(dtype=np.float32) >= need and ge.sum() >= least
        if ok:
            n_in = int((ge & (c <= np.int32(hi).view(np.float32))).sum())
            lo = c[ge].min().view(np.int32)
        else:
            n_in = int(((c < v) & (c >= np.int32(lo).view(np.float32))).sum())
            hi = c[c < v].max().view(np.int32)
        n += 1
    return n


def floor_bits(c: np.ndarray, need) -> int:
    return int(np.float32((c.sum(dtype=np.float32) - need) / len(c)).view(np.int32))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=131072)
    p.add_argument("--data", nargs="+", default=["structured", "mixed"])
    p.add_argument("--gamma", type=float, default=0.9)
    a = p.parse_args(argv)
    bs, d, heads, kv_heads = 64, 128, 8, 2
    scale = d ** -0.5
    min_budget = min(1024, a.seqlen // 32)
    for data in a.data:
        q, k, _ = methods_inputs(a.seqlen, torch.bfloat16, heads=heads, kv_heads=kv_heads, data=data, device="cpu")
        q, k = q.float(), k.float()
        v, s = last_block_scores(q, k, block_size=bs, scale=scale, backend="torch")
        qa = decide_query_aware(q, k, v, torch.full((heads,), 0.1), block_size=bs, scale=scale)[0].tolist()
        print(f"\n## {data}, S={a.seqlen}: query-aware heads {[h for h in range(heads) if qa[h]]}")
        qp, kp = pool_blocks(q, bs), pool_blocks(k, bs)
        nq = qp.shape[2]
        for h in range(heads):
            if not qa[h]:
                vv, ss = v[0, h].numpy(), s[0, h].numpy()
                c = np.concatenate([vv[1:], ss[1:]])
                need = np.float32(a.gamma - vv[0] - ss[0])
                print(f"vertical-slash head {h}: gamma search {passes(c, need, 0, 4096, floor_bits(c, need))} passes "
                      f"over 2 x Sk, budget search {passes(vv[1:], -1.0, min_budget - 1, 4096)} over Sk")
                continue
            probs = pooled_block_probs(qp[:, h:h + 1], kp, torch.tensor([h // (heads // kv_heads)]), 0, nq,
                                       block_size=bs, seqlen_q=a.seqlen, seqlen_k=a.seqlen, scale=scale)[0, 0].numpy()
            per_band, new, old = [], 0, 0
            for b0 in range(0, nq, 16):
                worst = 0
                for r in range(b0, min(nq, b0 + 16)):
                    if r < 2:
                        continue
                    row = probs[r, :r + 1]
                    c, need, least = row[1:r], np.float32(a.gamma - row[0] - row[r]), min_budget // bs - 2
                    if (need <= 0 and least <= 0) or c.sum() < need or least >= len(c):
                        continue
                    worst = max(worst, passes(c, need, least, 64, floor_bits(c, need) if need > 0 else None))
                per_band.append(worst)
                new += (worst + 6) * 16 * min(nq, b0 + 16)
                old += 62 * 16 * nq
            print(f"query-aware head {h}: passes a band mean {np.mean(per_band):.1f} max {max(per_band)}; "
                  f"element visits against the earlier kernel {new / old:.3f}")


if __name__ == "__main__":
    main()
