"""How good is the hierarchical search? Against the exact top-k key blocks of the dense attention mass.

    python bench/probes/hier_quality.py --lengths 8192 --top-k 16 64 --heads 8 --kv-heads 2 --device cpu

On the methods benchmark's structured inputs (bench/common.methods_inputs, seed 0), per query head:
- the dense causal softmax mass of every (query block, key block) (sparse_attn.profiler.block_mass, in
  row chunks); the exact selection keeps, per query block, the sink block, the `local` last visible blocks
  and the top_k candidate blocks of largest mass;
- overlap: |hierarchical's searched blocks & the exact top_k| / top_k, over the query blocks that search
  (more candidates than top_k);
- pooled_overlap: the same for the exhaustive top_k of the search's own unit scores (the block-mean query
  against each candidate's key summary, see sparse_attn.estimators.hierarchical: what the search
  approximates); search_vs_pooled: hierarchical's overlap with that exhaustive pooled top_k (the search's
  own loss);
- miss: the share of each query block's rows' mass the layout drops (1 - recall), mean over query blocks,
  for the hierarchical layout, the exact selection (the floor at this budget), the pooled exhaustive
  top_k, the exhaustive top_k of the block-mean dot alone (mean_rule_miss: the unit score before
  2026-12-06) and block_sparse's mean-pool top-k at the same number of blocks; and overlap / miss of the
  search with 1 (HiP's fixed first position), 2 and 4 sampled blocks per branch (the representative
  rule; the package uses SAMPLES).
Prints a table per length; writes JSON to --out. The search runs its torch path here (same selection as the
kernel); on CPU 8K takes about a minute with 8 heads.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
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
    ap.add_argument("--data", nargs="+", choices=("structured", "smollm2"), default=["structured"])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 14, 20, 26],
                    help="smollm2: the layers whose q / k are scored")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    rows = []
    for s in args.lengths:
        t0 = time.time()
        for label, q, k in inputs(args, s):
            rows += evaluate(q, k, args, s, label)
            print(f"{s} {label}: done at {time.time() - t0:.1f} s", flush=True)
    cols = ["S", "data", "top_k", "head", "overlap", "pooled_overlap", "search_vs_pooled", "miss", "exact_miss",
            "pooled_miss", "mean_rule_miss", "block_sparse_miss", *[f"overlap_s{n}" for n in args.samples],
            *[f"miss_s{n}" for n in args.samples], "density"]
    fmt = {c: "{:.2e}" if "miss" in c else "{:.3f}" for c in cols[4:]}
    print_table(rows, cols, fmt)
    means = []
    for key in dict.fromkeys((r["S"], r["data"], r["top_k"]) for r in rows):
        sub = [r for r in rows if (r["S"], r["data"], r["top_k"]) == key]
        means.append({"S": key[0], "data": key[1], "top_k": key[2], "head": "mean",
                      **{c: sum(r[c] for r in sub) / len(sub) for c in cols[4:]}})
    print_table(means, cols, fmt)
    write_json(out_dir(args.out) / "hier_quality.json", {"args": vars(args), "rows": rows, "means": means})
    return 0


def inputs(args, s):
    """(label, q, k) per input set at length s: the structured benchmark inputs; SmolLM2's q / k after RoPE
    on a pass-key prompt (key at depth 0.5), at --layers."""
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if "structured" in args.data:
        q, k, _ = methods_inputs(s, dtype, heads=args.heads, kv_heads=args.kv_heads, device=args.device)
        yield "structured", q, k
    if "smollm2" in args.data:
        from sparse_attn.models import load_model, passkey_prompt
        from sparse_attn.profiler import capture_qk

        model, tok = load_model(device=args.device)
        prompt = passkey_prompt(tok, s, 0.5, seed=7)
        captured = {}

        def keep(layer, q, k, scaling):
            if layer in args.layers:
                captured[layer] = (q.detach().float(), k.detach().float())

        with torch.no_grad(), capture_qk(model, keep):
            model(prompt.input_ids.to(args.device))
        del model
        for layer in sorted(captured):
            yield f"smollm2-L{layer}", *captured.pop(layer)


def evaluate(q, k, args, s, label):
    """The rows of one (q, k): per top_k and query head (see the module docstring)."""
    from sparse_attn.estimators import hierarchical as hier
    from sparse_attn.estimators.block_sparse import block_topk_layout, estimate_block_topk, pool_blocks
    from sparse_attn.profiler import block_mass

    bs, local = args.block_size, args.local
    hq, hkv, s = q.shape[1], k.shape[1], q.shape[2]
    mass = block_mass(q, k, block_size=bs)  # [Hq, nq, S]
    nq, nk = mass.shape[1], -(-s // bs)
    mass = torch.nn.functional.pad(mass, (0, nk * bs - s)).unflatten(-1, (nk, bs)).sum(-1).double().cpu()
    row_count = (torch.arange(nq) * bs + bs).clamp(max=s) - torch.arange(nq) * bs
    mass = mass / row_count.view(1, -1, 1).to(mass)  # each query block's rows: sums to 1 over key blocks
    diag = torch.arange(nq)
    hi = (diag - local + 1).clamp(min=1)
    blocks = torch.arange(nk)
    cand = (blocks[None, :] >= 1) & (blocks[None, :] < hi[:, None])  # [nq, nk]
    forced = (blocks[None, :] == 0) | ((blocks[None, :] >= hi[:, None]) & (blocks[None, :] <= diag[:, None]))
    qbar, kbar = pool_blocks(q, bs).double().cpu(), pool_blocks(k, bs).double().cpu()
    # The search's unit scores (query summaries . key block summaries), and the block-mean dot alone (the
    # rule before 2026-12-06) for comparison; probe only: [Hq, nq, nk].
    qsum = hier._query_summaries(qbar[0])
    ksum = hier._key_summaries_torch(k.cpu().float(), bs)[0].double()
    units = torch.einsum("hqd,hkd->hqk", qsum, ksum.repeat_interleave(hq // hkv, 0))  # single units
    d = q.shape[-1]
    upper = torch.einsum("hqd,hkd->hqk", qsum[..., :d], ksum[..., :d].repeat_interleave(hq // hkv, 0))  # branches
    mean_units = torch.einsum("hqd,hkd->hqk", qbar[0], kbar[0].repeat_interleave(hq // hkv, 0))
    qc, kc = q.cpu().float(), k.cpu().float()
    rows = []
    for top_k in args.top_k:
        search = cand.sum(-1) > top_k
        exact_sel = torch.zeros(hq, nq, nk, dtype=torch.bool)
        exact_sel.scatter_(-1, torch.where(cand, mass, -1.0).topk(min(top_k, nk), -1).indices, True)
        exact_sel &= cand
        pooled = torch.zeros_like(exact_sel)
        pooled.scatter_(-1, torch.where(cand, units, float("-inf")).topk(min(top_k, nk), -1).indices, True)
        pooled &= cand
        pooled_mean = torch.zeros_like(exact_sel)
        pooled_mean.scatter_(-1, torch.where(cand, mean_units, float("-inf")).topk(min(top_k, nk), -1).indices,
                             True)
        pooled_mean &= cand

        def kept(mask):
            return (mass * mask).sum(-1)  # [Hq, nq]

        def hier_mask(samples):
            rows_hi = hi.repeat(hq)
            flat, flat_upper = units.reshape(-1, nk), upper.reshape(-1, nk)

            def scores(rr, uu, single):
                return torch.where(single, flat[rr].gather(1, uu), flat_upper[rr].gather(1, uu)).float()

            chosen = hier.search_torch(scores, rows_hi,
                                       torch.full_like(rows_hi, top_k), samples=samples)
            sel = torch.zeros(hq * nq, nk + 1, dtype=torch.bool)
            sel.scatter_(1, chosen.clamp(max=nk), True)
            return sel[:, :nk].view(hq, nq, nk) & cand

        layout = hier.hierarchical_layout(qc, kc, top_k, block_size=bs, local=local, use_triton=False)
        lay = layout.to_block_mask()[0]
        bsp = block_topk_layout(estimate_block_topk(qc, kc, top_k=top_k + 1 + local, block_size=bs), s, s,
                                bs).to_block_mask()[0]
        variants = {n: hier_mask(n) for n in args.samples}
        density = layout.head_density()[0]
        for h in range(hq):
            def mean(x):
                return float(x[h][search].mean()) if search.any() else float("nan")

            rows.append({"S": s, "data": label, "top_k": top_k, "head": h,
                         "overlap": mean((lay & exact_sel).sum(-1).double() / top_k),
                         "pooled_overlap": mean((pooled & exact_sel).sum(-1).double() / top_k),
                         "search_vs_pooled": mean((lay & pooled).sum(-1).double() / top_k),
                         "miss": 1 - float(kept(lay)[h].mean()),
                         "exact_miss": 1 - float(kept(exact_sel | forced)[h].mean()),
                         "pooled_miss": 1 - float(kept(pooled | forced)[h].mean()),
                         "mean_rule_miss": 1 - float(kept(pooled_mean | forced)[h].mean()),
                         "block_sparse_miss": 1 - float(kept(bsp)[h].mean()),
                         **{f"overlap_s{n}": mean((sel & exact_sel).sum(-1).double() / top_k)
                            for n, sel in variants.items()},
                         **{f"miss_s{n}": 1 - float(kept(sel | forced)[h].mean()) for n, sel in variants.items()},
                         "density": float(density[h])})
    return rows


if __name__ == "__main__":
    main()
