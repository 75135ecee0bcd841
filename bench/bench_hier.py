"""Hierarchical pattern on the GPU, in one run: how its selection scales, the whole call against cuDNN with its
recall, and decode against SDPA and Quest.

    python bench/bench_hier.py --out bench/results     # defaults: the issue's sizes, about 4 min on an H100

1. Selection scaling: `hierarchical_layout` alone (block means + the one-launch search) at --seqlens on the
   methods benchmark's structured inputs (32 query / 8 kv heads, D=128, bf16, B=1), top_k --scale-top-k;
   median of CUDA-event times after warm-up, and each length's time over the previous one's at the same
   top_k (O(S log S): 2x the length costs a bit over 2x; the bar is 1M / 512K <= 2.3; the search's dot
   products alone grow 2.25x / 2.29x from 512K to 1M at top_k 32 / 64).
2. The call at each of --call-seqlens: per top_k in --call-top-k, the phases (selection = estimate + index,
   attention) and one public `sparse_attention` call, against SDPA cuDNN dense causal timed in the same run;
   the selection's share of the call, the speed-up, the density and the recall (the share of the dense
   softmax mass the layout keeps, mean and minimum over heads, sparse_attn.attention_recall; beyond 128K on
   16 sampled bands of 64 rows). Above --dense-max, cuDNN's time is the longest measured one scaled by the
   length squared (marked "dense_extrapolated"): one 1M cuDNN call takes ~16 s on an H100.
3. Decode at --decode-context, batch --decode-batch, a --decode-budget token budget: one query per sequence
   (the structured inputs' last query) against a paged copy of the structured cache (pages shuffled): SDPA
   flash dense decode, hierarchical (top_k = budget / page - 1 - local pages) and quest (budget, 64 sink
   and 64 window tokens), each its selection plus the paged split-K attention, timed from a CUDA graph after
   an L2 flush (capture proves there is no host sync) and eagerly; the selection alone; recall of each
   selection (softmax mass of the sequence's query heads on the tokens read).
Prefill blocks are --block-size tokens (64; at 128, top_k 32 is the same 4K tokens a query block as 64 at
64, over half the query and key blocks). Prints tables and writes bench_hier.json under --out. Needs CUDA.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import (bench_graph_ms, bench_ms, device_info, method_call, method_phases, methods_inputs,  # noqa: E402
                    out_dir, print_table, time_phases, write_json)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[32768, 131072, 524288, 1048576])
    p.add_argument("--scale-top-k", type=int, nargs="+", default=[32, 64])
    p.add_argument("--call-seqlens", type=int, nargs="+", default=[131072])
    p.add_argument("--dense-max", type=int, default=131072,
                   help="longest call length at which cuDNN runs; longer ones use it scaled by the length squared")
    p.add_argument("--call-top-k", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--decode-context", type=int, default=131072)
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--decode-budget", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=64, help="prefill: tokens per query / key block")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--local", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip", nargs="*", default=[], choices=("scaling", "call", "decode"))
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def event_median(fn, repeats: int, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def scaling(args):
    from sparse_attn.estimators.hierarchical import hierarchical_layout, search_plan

    rows = []
    for s in sorted(args.seqlens):
        q, k, _ = methods_inputs(s)
        for top_k in args.scale_top_k:
            fn = lambda: hierarchical_layout(q, k, top_k, block_size=args.block_size, local=args.local)  # noqa: E731
            ms = event_median(fn, args.repeats)
            layout = fn()
            nk = -(-s // args.block_size)
            row = {"seqlen": s, "block": args.block_size, "top_k": top_k, "select_ms": ms,
                   "levels": search_plan(nk - 1 - args.local, top_k)[1],
                   "density": float(layout.density()), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
            prev = [r for r in rows if r["top_k"] == top_k]
            if prev:
                row["x_prev"] = ms / prev[-1]["select_ms"]
            rows.append(row)
            print(row, flush=True)
            layout = fn = None
        q = k = None  # freed before the next length's inputs
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return rows


def cudnn_dense(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(kk=k, vv=v, gqa=True):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)

    try:
        run()
        return run
    except RuntimeError:  # cuDNN without GQA: k / v repeated outside the timed region
        g = q.shape[1] // k.shape[1]
        kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        return lambda: run(kk, vv, False)


def call(args):
    rows, dense_at = [], {}
    for s in sorted(args.call_seqlens):
        rows += call_at(args, s, dense_at)
    return rows


def call_at(args, s, dense_at):
    from sparse_attn import attention_recall
    from sparse_attn.recall import sampled_rows

    q, k, v = methods_inputs(s)
    if s <= args.dense_max:
        dense = cudnn_dense(q, k, v)
        dense_ms = time_phases([("dense", lambda _: dense())], 1, args.repeats)[0]["dense"]
        dense_at[s] = dense_ms
        extrapolated = False
    else:
        if not dense_at:
            raise SystemExit(f"--dense-max {args.dense_max}: no call length at or below it to scale cuDNN from")
        ref = max(dense_at)
        dense_ms, extrapolated = dense_at[ref] * (s / ref) ** 2, True
    rows, layouts = [], []
    for top_k in args.call_top_k:
        kwargs = {"top_k": top_k, "local": args.local, "block_size": args.block_size}
        phases = method_phases("hierarchical", kwargs, q, k, v)
        t = time_phases(phases, 1, args.repeats, call=method_call("hierarchical", kwargs, q, k, v))[0]
        layout = phases[1][1](phases[0][1](None))
        select = t["estimate"] + t["index"]
        total = select + t["attention"]
        layouts.append(layout)
        rows.append({"seqlen": s, "block": args.block_size, "top_k": top_k, "select_ms": select,
                     "attention_ms": t["attention"], "call_ms": t["call"], "select_frac": select / total,
                     "dense_ms": dense_ms, "dense_extrapolated": extrapolated, "speedup": dense_ms / total,
                     "call_speedup": dense_ms / t["call"], "density": float(layout.density())})
        print(rows[-1], flush=True)
    # Every row up to 128K; sampled bands of rows beyond (scoring every row would be a dense pass).
    sample = None if s <= 131072 else sampled_rows(s)
    recall = attention_recall(q, k, layouts, chunk_size=64, rows=sample)  # [len, B, Hq]
    for row, r in zip(rows, recall):
        row["recall"], row["recall_min"] = float(r.mean()), float(r.min())
        row["recall_rows"] = "all" if sample is None else "sampled"
    q = k = v = layouts = dense = None
    torch.cuda.empty_cache()
    return rows


def decode(args):
    from sparse_attn.estimators.hierarchical import hierarchical_pages
    from sparse_attn.estimators.quest import quest_select
    from sparse_attn.kvcache import PagedKVCache, PageSummaries
    from sparse_attn.ops.paged_decode import paged_decode_attention

    s, b, ps = args.decode_context, args.decode_batch, args.page_size
    q_all, k1, v1 = methods_inputs(s)
    hq, hkv, d = q_all.shape[1], k1.shape[1], k1.shape[3]
    q = q_all[:, :, -1].expand(b, -1, -1).contiguous()  # [B, Hq, D]
    q_all = None
    k, v = k1.expand(b, -1, -1, -1).contiguous(), v1.expand(b, -1, -1, -1).contiguous()
    per = s // ps
    gen = torch.Generator(device="cuda").manual_seed(0)
    perm = torch.randperm(b * per, device="cuda", generator=gen)
    kc = torch.empty(b * per, ps, hkv, d, device="cuda", dtype=k.dtype)
    vc = torch.empty_like(kc)
    kc[perm] = k.view(b, hkv, per, ps, d).permute(0, 2, 3, 1, 4).reshape(b * per, ps, hkv, d)
    vc[perm] = v.view(b, hkv, per, ps, d).permute(0, 2, 3, 1, 4).reshape(b * per, ps, hkv, d)
    cache = PagedKVCache(kc, vc, perm.view(b, per).to(torch.int32), torch.full((b,), s, dtype=torch.int32,
                                                                              device="cuda"), ps)
    summaries = PageSummaries.build(cache)
    scores = (q[0].float().view(hkv, hq // hkv, d) @ k1[0].float().transpose(-1, -2)).flatten(0, 1) * d ** -0.5
    p = torch.softmax(scores, -1)  # [Hq, S]: sequence 0's dense decode attention
    k1 = v1 = scores = None
    top_k = max(1, args.decode_budget // ps - 1 - args.local)
    selectors = {
        "hierarchical": lambda: hierarchical_pages(q, cache, summaries, top_k=top_k, local=args.local),
        "quest": lambda: quest_select(q, cache, summaries, budget=args.decode_budget, sink=64, window=64),
    }
    q4 = q[:, :, None]
    sdpa = lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)  # noqa: E731
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        base = {"us": 1e3 * bench_ms(sdpa), "gpu_us": 1e3 * bench_graph_ms(sdpa)}
    rows = [{"context": s, "batch": b, "kernel": "sdpa_flash", **base, "speedup": 1.0, "density": 1.0,
             "recall": 1.0}]
    for name, select in selectors.items():
        sel = select()
        mask = sel.token_mask(cache.seqlens, s)[0]  # [H or 1, S]
        recall = (p * mask.repeat_interleave(hq // mask.shape[0], 0)).sum(-1)
        step = lambda select=select: paged_decode_attention(q, cache, select())  # noqa: E731
        t = {"us": 1e3 * bench_ms(step), "gpu_us": 1e3 * bench_graph_ms(step)}
        rows.append({"context": s, "batch": b, "kernel": name, "budget": args.decode_budget, **t,
                     "select_gpu_us": 1e3 * bench_graph_ms(select), "speedup": base["gpu_us"] / t["gpu_us"],
                     "density": float(sel.density(cache.seqlens).mean()), "recall": float(recall.mean()),
                     "recall_min": float(recall.min())})
        print(rows[-1], flush=True)
    k = v = kc = vc = cache = summaries = None
    torch.cuda.empty_cache()
    return rows


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_hier.py needs a CUDA GPU (none found); nothing was measured.", file=sys.stderr)
        return 2
    info, t0 = device_info(), time.time()
    out = {"meta": {**info, "date": time.strftime("%Y-%m-%d"), "args": vars(args)}}
    if "scaling" not in args.skip:
        out["scaling"] = scaling(args)
    if "call" not in args.skip:
        out["call"] = call(args)
    if "decode" not in args.skip:
        out["decode"] = decode(args)
    out["meta"]["wall_s"] = time.time() - t0
    write_json(out_dir(args.out) / "bench_hier.json", out)
    print(f"\nHierarchical pattern, {info}; 32 q / 8 kv heads, D=128, bf16, structured inputs, "
          f"{args.block_size}-token blocks (prefill)")
    if "scaling" in out:
        print("\nselection alone (ms), x_prev: over the previous length")
        print_table(out["scaling"], ["seqlen", "top_k", "levels", "select_ms", "x_prev", "density", "peak_gib"],
                    {"select_ms": "{:.2f}", "x_prev": "{:.2f}", "density": "{:.4f}", "peak_gib": "{:.1f}"})
    if "call" in out:
        print("\none call vs SDPA cuDNN dense causal (ms); select_frac: selection / (selection + attention)")
        cols = ["seqlen", "top_k", "select_ms", "attention_ms", "call_ms", "dense_ms", "select_frac", "speedup",
                "call_speedup", "density", "recall", "recall_min"]
        print_table(out["call"], cols, {c: "{:.3f}" for c in cols[2:]})
    if "decode" in out:
        print("\ndecode step (us; gpu_us from a CUDA graph after an L2 flush; speedup = SDPA gpu_us / gpu_us)")
        cols = ["context", "batch", "kernel", "budget", "us", "gpu_us", "select_gpu_us", "speedup", "density",
                "recall", "recall_min"]
        print_table(out["decode"], cols, {c: "{:.3f}" if c in ("density", "recall", "recall_min") else "{:.1f}"
                                          for c in cols[4:]})
    print_bars(out)
    return 0


def print_bars(out) -> None:
    """The issue's bars, each with the figures it reads and PASS / FAIL."""
    lines = []
    for row in out.get("scaling", []):
        if row["seqlen"] == 1048576 and "x_prev" in row:
            lines.append((f"selection 1M / 512K <= 2.3 at top_k {row['top_k']}: {row['x_prev']:.2f}",
                          row["x_prev"] <= 2.3))
    for row in out.get("call", []):
        if row.get("dense_extrapolated"):
            lines.append((f"call at {row['seqlen']} top_k {row['top_k']} (recorded): {row['speedup']:.1f}x cuDNN "
                          f"scaled from a shorter length, selection {100 * row['select_frac']:.1f} %, recall "
                          f"{row['recall']:.3f} on sampled rows", None))
            continue
        ok = row["select_frac"] <= 0.10 and row["speedup"] >= 6 and row.get("recall", 0) >= 0.9
        lines.append((f"call at {row['seqlen']} top_k {row['top_k']}: selection {100 * row['select_frac']:.1f} % "
                       f"of the call (<= 10 %), {row['speedup']:.1f}x cuDNN (>= 6x), recall "
                       f"{row.get('recall', float('nan')):.3f} (>= 0.9)", ok))
    for row in out.get("decode", []):
        if row["kernel"] == "hierarchical":
            lines.append((f"decode {row['context']} batch {row['batch']}: {row['speedup']:.1f}x SDPA (>= 10x), "
                          f"selection {row['select_gpu_us']:.0f} us of {row['gpu_us']:.0f}", row["speedup"] >= 10))
    if lines:
        print("\nbars")
        for text, ok in lines:
            print(f"  {'----' if ok is None else 'PASS' if ok else 'FAIL'}  {text}")


if __name__ == "__main__":
    sys.exit(main())
