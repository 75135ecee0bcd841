"""Hierarchical selection speed under launch shapes the CPU machine cannot decide between, in one GPU run
(~5 min on an H100).

    python bench/probes/hier_speed.py --out bench/results

Prefill at --seqlen (methods_inputs: 32 q / 8 kv heads, D=128, bf16, 64-token blocks), per top_k: the whole
selection (block means + search) by CUDA-event median, for the module's default and for each shape h/w/c/r
(query heads of a GQA group per program, warps, elements per key chunk, register cap); `same`: the share of
(head, query block) rows whose counted blocks equal the default's (float order may flip a near-tie);
key_means_ms: the key block means alone (the rest is the search launch).
Decode at --decode-context, batch --decode-batch, top_k = 4096 / 64 - 2 = 62 (bench_hier's 4K budget), on a
shuffled paged copy of the structured cache: the selection from a CUDA graph after an L2 flush (bench_graph_ms,
as bench_hier reports select_gpu_us), the default and each (warps, chunk); `same` against the default.
The shapes are module constants of sparse_attn.estimators.hierarchical, set here between runs and restored.
Prints two tables; writes hier_speed.json under --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "bench" / "probes")]

import torch  # noqa: E402

from bench_hier import event_median  # noqa: E402
from common import bench_graph_ms, device_info, methods_inputs, out_dir, print_table, write_json  # noqa: E402

# (query heads per program, warps, chunk, register cap)
PREFILL_SHAPES = [(4, 4, 8, None), (4, 4, 16, None), (4, 4, 8, 168), (4, 4, 16, 168), (4, 8, 8, 128),
                  (2, 4, 8, None), (2, 4, 16, None)]
DECODE_SHAPES = [(w, c) for w in (4, 8, 16) for c in (32, 64, 128)]


def event_ms(fn) -> float:
    return event_median(fn, 10, warmup=3)


def rows_of(ids, counts):
    """[rows, width + 1]: each row's counted ids ascending, padded with int max, then its count (entries past
    a count are unspecified)."""
    live = torch.arange(ids.shape[-1], device=ids.device) < counts.unsqueeze(-1)
    ids = torch.where(live, ids.long(), torch.iinfo(torch.int64).max).sort(-1).values
    return torch.cat([ids, counts.long().unsqueeze(-1)], -1).flatten(0, -2)


def same(a, b) -> float:
    return float((a == b).all(-1).float().mean())


def set_prefill(hier, heads, warps, chunk, maxnreg):
    hier._PREFILL_HEADS, hier._PREFILL_WARPS, hier._PREFILL_CHUNK, hier._PREFILL_MAXNREG = heads, warps, chunk, maxnreg


def prefill(args, hier):
    q, k, _ = methods_inputs(args.seqlen)
    default = (hier._PREFILL_HEADS, hier._PREFILL_WARPS, hier._PREFILL_CHUNK, hier._PREFILL_MAXNREG)
    rows = []
    for top_k in args.top_k:
        ref = hier.hierarchical_layout(q, k, top_k, block_size=64)
        want = rows_of(ref.indices, ref.counts)
        means = event_ms(lambda: hier.key_summaries(k, 64, k.dtype))
        for shape in [default] + PREFILL_SHAPES:
            set_prefill(hier, *shape)
            heads, warps, chunk, maxnreg = shape
            lay = hier.hierarchical_layout(q, k, top_k, block_size=64)
            name = "default" if shape is default else f"h{heads} w{warps} c{chunk} r{maxnreg or '-'}"
            rows.append({"top_k": top_k, "kernels": name,
                         "ms": event_ms(lambda: hier.hierarchical_layout(q, k, top_k, block_size=64)),
                         "key_means_ms": means, "same": same(rows_of(lay.indices, lay.counts), want)})
            print(rows[-1], flush=True)
        set_prefill(hier, *default)
    return rows


def decode(args, hier):
    from sparse_attn.kvcache import PagedKVCache, PageSummaries

    s, b, ps = args.decode_context, args.decode_batch, 64
    q_all, k1, _ = methods_inputs(s)
    hkv, d = k1.shape[1], k1.shape[3]
    q = q_all[:, :, -1].expand(b, -1, -1).contiguous()
    q_all = None
    per = s // ps
    gen = torch.Generator(device="cuda").manual_seed(0)
    perm = torch.randperm(b * per, device="cuda", generator=gen)
    kc = torch.empty(b * per, ps, hkv, d, device="cuda", dtype=k1.dtype)
    kc[perm] = k1.expand(b, -1, -1, -1).reshape(b, hkv, per, ps, d).permute(0, 2, 3, 1, 4).reshape(-1, ps, hkv, d)
    k1 = None
    cache = PagedKVCache(kc, kc, perm.view(b, per).to(torch.int32),
                         torch.full((b,), s, dtype=torch.int32, device="cuda"), ps)
    summaries = PageSummaries.build(cache)
    top_k = 4096 // ps - 2
    default = (hier._DECODE_WARPS, hier._DECODE_CHUNK)
    ref = hier.hierarchical_pages(q, cache, summaries, top_k=top_k)
    want = rows_of(ref.pages, ref.counts)
    rows = []
    for warps, chunk in [default] + DECODE_SHAPES:
        hier._DECODE_WARPS, hier._DECODE_CHUNK = warps, chunk
        sel = hier.hierarchical_pages(q, cache, summaries, top_k=top_k)
        rows.append({"kernels": "default" if not rows else f"w{warps} c{chunk}", "us": 1e3 * bench_graph_ms(
            lambda: hier.hierarchical_pages(q, cache, summaries, top_k=top_k)),
            "same": same(rows_of(sel.pages, sel.counts), want)})
        print(rows[-1], flush=True)
    hier._DECODE_WARPS, hier._DECODE_CHUNK = default
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=131072)
    ap.add_argument("--top-k", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--decode-context", type=int, default=131072)
    ap.add_argument("--decode-batch", type=int, default=8)
    ap.add_argument("--skip", nargs="*", default=[], choices=("prefill", "decode"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("hier_speed.py needs a CUDA GPU; nothing was measured.", file=sys.stderr)
        return 2
    from sparse_attn.estimators import hierarchical

    out = {"meta": device_info()}
    if "prefill" not in args.skip:
        out["prefill"] = prefill(args, hierarchical)
        torch.cuda.empty_cache()
    if "decode" not in args.skip:
        out["decode"] = decode(args, hierarchical)
    write_json(out_dir(args.out) / "hier_speed.json", out)
    print(f"\nhierarchical selection, launch shapes; {out['meta']}")
    if "prefill" in out:
        print(f"\nprefill at {args.seqlen} (ms, CUDA events; same: rows equal to the default's)")
        print_table(out["prefill"], ["top_k", "kernels", "ms", "key_means_ms", "same"],
                    {"ms": "{:.3f}", "key_means_ms": "{:.3f}", "same": "{:.4f}"})
    if "decode" in out:
        print(f"\ndecode at {args.decode_context}, batch {args.decode_batch}, top_k 62 "
              "(us, CUDA graph after an L2 flush)")
        print_table(out["decode"], ["kernels", "us", "same"], {"us": "{:.1f}", "same": "{:.4f}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
