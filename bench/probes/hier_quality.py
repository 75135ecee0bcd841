"""How good is the hierarchical search? Against the exact top-k key blocks of the dense attention mass.

    python bench/probes/hier_quality.py --lengths 8192 --top-k 16 64 --heads 8 --kv-heads 2 --device cpu

On the methods benchmark's structured inputs (bench/common.methods_inputs, seed 0), per query head:
- the dense causal softmax mass of every (query block, key block) (sparse_attn.profiler.block_mass, in
  row chunks); the exact selection keeps, per query block, the sink block, the `local` last visible blocks
  and the top_k candidate blocks of largest mass;
- overlap: |hierarchical's searched blocks & the exact top_k| / top_k, over the query blocks that search
  (more candidates than top_k);
- mass: the share of each query block's rows' mass the layout keeps, mean over query blocks (recall), for
  the hierarchical layout, the exact selection (the ceiling at this budget) and block_sparse's mean-pool
  top-k at the same number of blocks; and the hierarchical search with 1 (HiP's fixed first position),
  2 and 4 sampled blocks per branch (the representative rule; the package uses SAMPLES).
Prints a table per length; writes JSON to --out. The search runs its torch path here (same selection as the
kernel); on CPU 8K takes about a minute with 8 heads.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import methods_inputs, out_dir, print_table, write_json  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192])
    ap.add_argument("--top-k", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--local", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from sparse_attn.estimators import hierarchical as hier
    from sparse_attn.estimators.block_sparse import block_topk_layout, estimate_block_topk, pool_blocks
    from sparse_attn.profiler import block_mass

    bs, local = args.block_size, args.local
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rows, record = [], []
    for s in args.lengths:
        q, k, _ = methods_inputs(s, dtype, heads=args.heads, kv_heads=args.kv_heads, device=args.device)
        t0 = time.time()
        mass = block_mass(q, k, block_size=bs)  # [Hq, nq, S]
        nq, nk = mass.shape[1], -(-s // bs)
        mass = torch.nn.functional.pad(mass, (0, nk * bs - s)).unflatten(-1, (nk, bs)).sum(-1).double()
        row_count = (torch.arange(nq) * bs + bs).clamp(max=s) - torch.arange(nq) * bs
        mass = mass / row_count.view(1, -1, 1).to(mass)  # each query block's rows: sums to 1 over key blocks
        print(f"{s}: dense block mass in {time.time() - t0:.1f} s", flush=True)
        diag = torch.arange(nq)
        hi = (diag - local + 1).clamp(min=1)
        blocks = torch.arange(nk)
        cand = (blocks[None, :] >= 1) & (blocks[None, :] < hi[:, None])  # [nq, nk]
        forced = (blocks[None, :] == 0) | ((blocks[None, :] >= hi[:, None]) & (blocks[None, :] <= diag[:, None]))
        searching = cand.sum(-1) > 0
        qbar, kbar = pool_blocks(q, bs).double().cpu(), pool_blocks(k, bs).double().cpu()
        g = args.heads // args.kv_heads
        units = torch.einsum("hqd,hkd->hqk", qbar[0], kbar[0].repeat_interleave(g, 0))  # [Hq, nq, nk] (probe only)
        for top_k in args.top_k:
            search = searching & (cand.sum(-1) > top_k)
            exact_sel = torch.zeros(args.heads, nq, nk, dtype=torch.bool)
            top = torch.where(cand, mass, -1.0).topk(min(top_k, nk), -1).indices
            exact_sel.scatter_(-1, top, True)
            exact_sel &= cand
            exact_keep = exact_sel | forced

            def kept(mask):
                return (mass * mask).sum(-1)  # [Hq, nq]

            def hier_mask(samples):
                rows_hi = hi.repeat(args.heads)
                flat = units.reshape(-1, nk)
                chosen = hier.search_torch(lambda rr, uu: flat[rr].gather(1, uu).float(), rows_hi,
                                           torch.full_like(rows_hi, top_k), samples=samples)
                sel = torch.zeros(args.heads * nq, nk + 1, dtype=torch.bool)
                sel.scatter_(1, chosen.clamp(max=nk), True)
                return sel[:, :nk].view(args.heads, nq, nk) & cand

            layout = hier.hierarchical_layout(q.cpu().float(), k.cpu().float(), top_k, block_size=bs, local=local,
                                              use_triton=False)
            lay = layout.to_block_mask()[0]
            bsp = block_topk_layout(estimate_block_topk(q.cpu().float(), k.cpu().float(), top_k=top_k + 1 + local,
                                                        block_size=bs), s, s, bs).to_block_mask()[0]
            variants = {n: hier_mask(n) for n in args.samples}
            for h in range(args.heads):
                def mean(x):
                    return float(x[h][search].mean()) if search.any() else float("nan")
                ov = {n: mean((sel & exact_sel).sum(-1).double() / top_k) for n, sel in variants.items()}
                row = {"S": s, "top_k": top_k, "head": h,
                       "overlap": mean((lay & exact_sel).sum(-1).double() / top_k),
                       "mass": float(kept(lay)[h].mean()), "exact_mass": float(kept(exact_keep)[h].mean()),
                       "block_sparse_mass": float(kept(bsp)[h].mean()),
                       **{f"overlap_s{n}": v for n, v in ov.items()},
                       **{f"mass_s{n}": float(kept(sel | forced)[h].mean()) for n, sel in variants.items()},
                       "density": float(layout.head_density()[0, h])}
                rows.append(row)
            record.append({"S": s, "top_k": top_k})
            print(f"{s} top_k={top_k}: done at {time.time() - t0:.1f} s", flush=True)
    cols = ["S", "top_k", "head", "overlap", "mass", "exact_mass", "block_sparse_mass",
            *[f"overlap_s{n}" for n in args.samples], *[f"mass_s{n}" for n in args.samples], "density"]
    print_table(rows, cols, {c: "{:.3f}" for c in cols[3:]})
    means = []
    for s in args.lengths:
        for top_k in args.top_k:
            sub = [r for r in rows if r["S"] == s and r["top_k"] == top_k]
            means.append({"S": s, "top_k": top_k, "head": "mean",
                          **{c: sum(r[c] for r in sub) / len(sub) for c in cols[3:]}})
    print_table(means, cols, {c: "{:.3f}" for c in cols[3:]})
    write_json(out_dir(args.out) / "hier_quality.json", {"args": vars(args), "rows": rows, "means": means})


if __name__ == "__main__":
    main()
