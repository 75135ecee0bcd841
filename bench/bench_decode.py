"""Decode benchmark: one attention layer, one new token per sequence against a long KV cache.

    python bench/bench_decode.py --contexts 8192 32768 131072 524288 --batches 1 8 32 --budgets 1024 2048 4096

32 query / 8 kv heads, D=128, bf16. Per (context, batch): torch SDPA dense decode (flash backend, GQA) on a
contiguous [B, Hkv, S, D] cache, and this package's paged kernels on the same tokens stored as a paged cache
([num_pages, page_size, Hkv, D], pages shuffled): dense (every page), `quest` at each budget (page scores from
the min / max summaries, top-k on the GPU, attention over the selected pages) and A-shape (sink + window
pages). Each is timed from a CUDA graph after an L2 flush (GPU time; capture also proves the step has no
host sync) and eagerly (host time included). "GB/s" is the bytes the step reads (selected K and V, the
summaries quest scores, the queries) over its GPU time. FlexAttention (torch.compile'd flex_attention, q of
one row, GQA) runs dense on the contiguous cache and, per budget, on quest's selected pages as a block mask
of page-sized key blocks over the same contiguous tokens (mask built outside the timing: compare with
`quest_attention_only`). FlashInfer is not in this image and is not timed. Prints a table and writes
bench_decode.json under --out. Needs CUDA.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import (bench_graph_ms, bench_ms, device_info, out_dir, parse_method_spec, print_table,  # noqa: E402
                    write_json)
from sparse_attn.estimators.a_shape import a_shape_pages  # noqa: E402
from sparse_attn.estimators.quest import quest_select  # noqa: E402
from sparse_attn.kvcache import PagedKVCache, PageSummaries  # noqa: E402
from sparse_attn.ops.paged_decode import paged_decode_attention  # noqa: E402

COLUMNS = ["context", "batch", "kernel", "budget", "us", "gpu_us", "speedup", "GB/s", "density", "max_err"]
FORMATS = {"us": "{:.1f}", "gpu_us": "{:.1f}", "speedup": "{:.2f}", "GB/s": "{:.0f}", "density": "{:.3f}",
           "max_err": "{:.1e}"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072, 524288])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--page-size", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--sink", type=int, default=64, help="quest / a_shape: first tokens always read")
    p.add_argument("--window", type=int, default=64, help="quest: last tokens always read")
    p.add_argument("--a-shape-window", type=int, default=4096, help="a_shape: last tokens read")
    p.add_argument("--decoders", nargs="*", default=[],
                   help="more decode sides, registry specs NAME:key=value,... (e.g. hierarchical:top_k=61): "
                        "each pattern's select with those budgets (its defaults for the rest), then the attention")
    p.add_argument("--max-cache-gib", type=float, default=24.0, help="skip (context, batch) with a larger KV")
    p.add_argument("--no-flex", action="store_true", help="skip the FlexAttention baselines")
    p.add_argument("--rep-ms", type=int, default=50)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def make_cache(b: int, s: int, args, dtype, gen):
    """(contiguous k, v [B, Hkv, S, D], paged cache of the same tokens with shuffled pages)."""
    hkv, d, ps = args.kv_heads, args.head_dim, args.page_size
    k = torch.randn(b, hkv, s, d, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(b, hkv, s, d, device="cuda", dtype=dtype, generator=gen)
    k[:, :, :4] += 3  # sinks: a few keys every query likes
    per = s // ps
    perm = torch.randperm(b * per, device="cuda", generator=gen)
    kc = torch.empty(b * per, ps, hkv, d, device="cuda", dtype=dtype)
    vc = torch.empty_like(kc)
    kc[perm] = k.view(b, hkv, per, ps, d).permute(0, 2, 3, 1, 4).reshape(b * per, ps, hkv, d)
    vc[perm] = v.view(b, hkv, per, ps, d).permute(0, 2, 3, 1, 4).reshape(b * per, ps, hkv, d)
    table = perm.view(b, per).to(torch.int32)
    lens = torch.full((b,), s, dtype=torch.int32, device="cuda")
    return k, v, PagedKVCache(kc, vc, table, lens, ps)


def timed(fn, args) -> dict:
    return {"us": 1e3 * bench_ms(fn, rep_ms=args.rep_ms), "gpu_us": 1e3 * bench_graph_ms(fn)}


def decoder_step(spec: str, q, cache, summaries):
    """(label, step fn, density) of a registry decode pattern given as a method spec: its select with the
    spec's budgets over the defaults, then the paged attention."""
    from sparse_attn.patterns import get_pattern

    label, name, kwargs = parse_method_spec(spec)
    pattern = get_pattern(name)
    if not pattern.decode:
        raise SystemExit(f"--decoders: {name!r} has no decode side")
    budgets = {p.name: kwargs.get(p.name, p.default) for p in pattern.budgets + pattern.options}
    select = lambda: pattern.select(q, cache, summaries if pattern.summaries else None, **budgets)  # noqa: E731
    return label, lambda: paged_decode_attention(q, cache, select()), float(select().density(cache.seqlens).mean())


def flex_decode(page_size: int):
    """(dense(q4, k, v), masked(q4, k, v, keep [B, Hkv, S] bool) -> (fn, kv block size)) on torch.compile'd
    FlexAttention, or None where it is missing."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    fa = torch.compile(flex_attention, dynamic=False)

    def dense(q4, k, v):
        return fa(q4, k, v, enable_gqa=True)[:, :, 0]

    def masked(q4, k, v, keep):
        b, hq, s = q4.shape[0], q4.shape[1], k.shape[2]
        group = hq // k.shape[1]

        def mask_mod(bi, h, q_idx, kv_idx):
            return keep[bi, h // group, kv_idx]

        for block in (page_size, 128):  # page-sized key blocks where Flex takes them
            try:
                bm = create_block_mask(mask_mod, b, hq, 1, s, device=q4.device, BLOCK_SIZE=(128, block))
                fn = lambda bm=bm: fa(q4, k, v, block_mask=bm, enable_gqa=True)[:, :, 0]  # noqa: E731
                fn()
                return fn, block
            except Exception as e:  # noqa: BLE001 - try the next block size
                print(f"flex: key blocks of {block} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return None, None

    return dense, masked


def run(args):
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    for s in args.contexts:
        for b in args.batches:
            kv_gib = 2 * b * hkv * s * d * 2 / 2**30
            if 2 * kv_gib > args.max_cache_gib:  # contiguous + paged copies
                print(f"skip S={s} B={b}: {2 * kv_gib:.1f} GiB of KV", flush=True)
                continue
            k, v, cache = make_cache(b, s, args, dtype, gen)
            q = torch.randn(b, hq, d, device="cuda", dtype=dtype, generator=gen)
            kv_bytes = 2 * b * hkv * s * d * 2
            q4 = q[:, :, None]
            sdpa = lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)  # noqa: E731
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                ref = sdpa()[:, :, 0].float()
                base = timed(sdpa, args)
            rows.append({"context": s, "batch": b, "kernel": "sdpa_flash", **base, "speedup": 1.0,
                         "GB/s": kv_bytes / base["gpu_us"] / 1e3, "density": 1.0})

            def add(name, budget, fn, bytes_read, density, exact):
                out = fn()
                t = timed(fn, args)
                err = (out.float() - ref).abs().max().item() if exact else None
                rows.append({"context": s, "batch": b, "kernel": name, "budget": budget, **t,
                             "speedup": base["gpu_us"] / t["gpu_us"], "GB/s": bytes_read / t["gpu_us"] / 1e3,
                             "density": density, "max_err": err})
                print(rows[-1], flush=True)

            def try_add(*a):
                try:
                    add(*a)
                except Exception as e:  # noqa: BLE001 - a baseline failing must not hide the others
                    print(f"{a[0]} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)

            add("paged_dense", None, lambda: paged_decode_attention(q, cache), kv_bytes, 1.0, True)
            flex = flex_decode(args.page_size) if not args.no_flex else None
            if flex is not None:
                try_add("flex_dense", None, lambda: flex[0](q4, k, v), kv_bytes, 1.0, True)
            summaries = PageSummaries.build(cache)
            summary_bytes = 2 * b * hkv * (s // args.page_size) * d * 2
            for budget in args.budgets:
                if budget >= s:
                    continue
                sel = quest_select(q, cache, summaries, budget=budget, sink=args.sink, window=args.window)
                dens = float(sel.density(cache.seqlens).mean())

                def step(sel_budget=budget):
                    chosen = quest_select(q, cache, summaries, budget=sel_budget, sink=args.sink, window=args.window)
                    return paged_decode_attention(q, cache, chosen)

                add("quest", budget, step, dens * kv_bytes + summary_bytes, dens, False)
                add("quest_attention_only", budget, lambda sel=sel: paged_decode_attention(q, cache, sel),
                    dens * kv_bytes, dens, False)
                if flex is not None:
                    keep = sel.token_mask(cache.seqlens, s)
                    want = paged_decode_attention(q, cache, sel).float()
                    try:
                        fn, block = flex[1](q4, k, v, keep)
                    except Exception as e:  # noqa: BLE001
                        fn, block = None, f"{type(e).__name__}: {str(e)[:120]}"
                    if fn is None:
                        print(f"flex_quest_attention_only {budget}: not run ({block})", flush=True)
                    else:
                        print(f"flex on quest's pages (key blocks of {block}): max |flex - ours| = "
                              f"{(fn().float() - want).abs().max().item():.2e}", flush=True)
                        try_add("flex_quest_attention_only", budget, fn, dens * kv_bytes, dens, False)
            sel = a_shape_pages(cache, sink=args.sink, window=args.a_shape_window)
            dens = float(sel.density(cache.seqlens).mean())
            add("a_shape", args.sink + args.a_shape_window,
                lambda: paged_decode_attention(q, cache, a_shape_pages(cache, sink=args.sink,
                                                                        window=args.a_shape_window)),
                dens * kv_bytes, dens, False)
            for spec in args.decoders:
                label, fn, dens = decoder_step(spec, q, cache, summaries)
                add(label, None, fn, dens * kv_bytes + summary_bytes, dens, False)
            del k, v, cache, summaries
            torch.cuda.empty_cache()
    return rows


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode.py needs a CUDA GPU (none found); nothing was measured.", file=sys.stderr)
        return 2
    rows = run(args)
    out = out_dir(args.out)
    info = device_info()
    write_json(out / "bench_decode.json", {"meta": {**info, "args": vars(args)}, "rows": rows})
    print(f"\nDecode, one layer, {args.heads} q / {args.kv_heads} kv heads, D={args.head_dim}, bf16, page size "
          f"{args.page_size}; {info}; us: eager, gpu_us: CUDA graph after an L2 flush; speedup = SDPA gpu_us / "
          f"gpu_us")
    print_table(rows, COLUMNS, FORMATS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
