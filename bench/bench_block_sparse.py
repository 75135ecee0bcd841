"""Block-sparse attention kernel vs dense SDPA (flash, cuDNN) and FlexAttention on the same block mask.

    python bench/bench_block_sparse.py                       # S = 8K, 32K, 128K; densities 5..100 %
    python bench/bench_block_sparse.py --seqlens 8192 --variants 128,64,8,3 128,128,8,3

Random causal block layouts (diagonal block always kept), B=1, 32 query heads, 8 kv heads, D=128, bf16.
Effective TFLOP/s = 4 * D * (causal entries the layout computes, summed over heads) / time; dense
baselines count the whole causal triangle. Every contender is timed twice: "ms" is the eager call
(triton's do_bench: L2 flushed before each call, so host time beyond the flush counts), "gpu_ms" the same
call replayed from a CUDA graph after the same flush (GPU time only; what the kernels themselves take).
Prints a table; writes JSON and a PNG under --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    device_info, eager_and_graph_ms, flex_attention_fn, flex_block_mask, out_dir, plot_panels, print_table,
    random_causal_block_mask, repeat_kv, sdpa_dense_causal, write_json,
)
from sparse_attn.layouts import BlockLayout, causal_tile_entries  # noqa: E402
from sparse_attn.ops.block_sparse import block_sparse_attention, plan as bs_plan  # noqa: E402
from sparse_attn.ops.block_sparse import kernel as bs_kernel  # noqa: E402


COLUMNS = ["seqlen", "kernel", "density", "ms", "tflops", "vs_cudnn", "gpu_ms", "gpu_tflops", "max_diff_vs_ours"]
FORMATS = {"density": "{:.3f}", "ms": "{:.3f}", "tflops": "{:.1f}", "vs_cudnn": "{:.2f}", "gpu_ms": "{:.3f}",
           "gpu_tflops": "{:.1f}", "max_diff_vs_ours": "{:.1e}"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5, 1.0])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block", type=int, default=128, help="layout block size (query and key)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--variants", nargs="*", default=[],
                   help="extra kernel configs to time, each block_m,block_n,num_warps,num_stages[,warp_specialize]")
    p.add_argument("--variants-max-seqlen", type=int, default=32768, help="time --variants only up to this S")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--out", default=None, help="results folder (default $OUT or bench/results)")
    return p.parse_args()


def random_causal_layout(heads: int, seqlen: int, block: int, density: float, gen) -> tuple:
    """(block mask, BlockLayout): each visible key block kept with probability `density`, the diagonal block
    always."""
    mask = random_causal_block_mask(heads, seqlen, block, density, gen)
    return mask, BlockLayout.from_block_mask(mask, block, block, seqlen, seqlen)


def computed_entries(layout: BlockLayout, seqlen: int) -> float:
    total = causal_tile_entries(0, seqlen, 0, seqlen, 0).item()
    return float(layout.head_density(causal=True).sum().item()) * total


def time_one(fn, flops: float, rep_ms: int, graph: bool = True) -> dict:
    """common.eager_and_graph_ms (ms: the eager call; gpu_ms: replayed from a CUDA graph), with TFLOP/s."""
    out = eager_and_graph_ms(fn, rep_ms, graph)
    out["tflops"] = flops / out["ms"] * 1e-9
    if graph:
        out["gpu_tflops"] = flops / out["gpu_ms"] * 1e-9
    return out


def time_variant(spec: str, q, k, v, layout, plan, density: float, flops: float, ours, rep_ms: int) -> list:
    """One explicit kernel config; a config that does not compile (e.g. out of shared memory) is reported."""
    cfg = bs_kernel.Config(*(int(x) for x in spec.split(",")))
    s, d = q.shape[2], q.shape[3]
    fn = lambda: bs_kernel.forward(q, k, v, layout, causal=True, scale=d ** -0.5, packed=False,  # noqa: E731
                                   batch=1, max_seqlen_q=s, plan=plan, config=cfg)
    try:
        diff = (fn().float() - ours.float()).abs().max().item()
        timing = time_one(fn, flops, rep_ms, graph=False)
    except Exception as e:  # noqa: BLE001 - a failed variant must not end the sweep
        print(f"variant {spec}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return []
    return [{"seqlen": s, "kernel": f"ours[{spec}]", "density": density, **timing, "max_diff_vs_ours": diff}]


def run_seqlen(args, s: int, dtype, gen) -> list:
    h, hkv, d = args.heads, args.kv_heads, args.head_dim
    q = torch.randn(1, h, s, d, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(1, hkv, s, d, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(1, hkv, s, d, device="cuda", dtype=dtype, generator=gen)
    dense_flops = 4.0 * d * h * causal_tile_entries(0, s, 0, s, 0).item()
    kr, vr = repeat_kv(k, h // hkv), repeat_kv(v, h // hkv)
    rows = []
    dense = {}
    for backend in ("flash", "cudnn"):
        dense[backend] = time_one(sdpa_dense_causal(q, kr, vr, backend), dense_flops, args.rep_ms)
        rows.append({"seqlen": s, "kernel": f"sdpa_{backend}_dense", "density": 1.0, **dense[backend]})
    del kr, vr
    torch.cuda.empty_cache()
    for target in args.densities:
        mask, layout = random_causal_layout(h, s, args.block, target, gen)
        density = layout.density(causal=True)
        flops = 4.0 * d * computed_entries(layout, s)
        # The layout's launch plan is made once, like FlexAttention's BlockMask, and held by the caller.
        plan = bs_plan(q, k, v, layout, causal=True)
        ours_fn = lambda: block_sparse_attention(q, k, v, layout, causal=True, plan=plan)  # noqa: E731
        ours = ours_fn()
        rows.append({"seqlen": s, "kernel": "ours", "density": density, **time_one(ours_fn, flops, args.rep_ms)})
        for spec in args.variants if s <= args.variants_max_seqlen else []:
            rows += time_variant(spec, q, k, v, layout, plan, density, flops, ours, args.rep_ms)
        if not args.no_flex:
            flex = flex_attention_fn(q, k, v, flex_block_mask(mask, args.block, s, s))
            diff = (flex().float() - ours.float()).abs().max().item()
            rows.append({"seqlen": s, "kernel": "flex", "density": density, **time_one(flex, flops, args.rep_ms),
                         "max_diff_vs_ours": diff})
        del mask, layout, plan
    for r in rows:
        r["vs_cudnn"] = r["tflops"] / dense["cudnn"]["tflops"]
        if r.get("gpu_tflops") is not None and dense["cudnn"].get("gpu_tflops"):
            r["gpu_vs_cudnn"] = r["gpu_tflops"] / dense["cudnn"]["gpu_tflops"]
    print_table(rows, COLUMNS, FORMATS)  # as we go: a long sweep that times out still shows its rows
    return rows


def plot(rows: list, path: Path, title: str) -> None:
    panels, hlines = {}, {}
    for s in sorted({r["seqlen"] for r in rows}):
        name = f"S={s // 1024}K"
        panels[name] = {}
        for kernel in sorted({r["kernel"] for r in rows if r["seqlen"] == s and not r["kernel"].startswith("sdpa")}):
            pts = sorted((r["density"] * 100, r["tflops"]) for r in rows if r["seqlen"] == s and r["kernel"] == kernel)
            panels[name][kernel] = tuple(zip(*pts))
        hlines[name] = {r["kernel"]: r["tflops"] for r in rows if r["seqlen"] == s and r["kernel"].startswith("sdpa")}
    plot_panels(path, panels, hlines, "density (% of causal entries)", "effective TFLOP/s", title)


def main():
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    out = out_dir(args.out)
    info = device_info()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for s in args.seqlens:
        rows += run_seqlen(args, s, dtype, gen)
        torch.cuda.empty_cache()
    title = (f"block-sparse attention, {info['device']}, {info['date']}: B=1, {args.heads}/{args.kv_heads} heads, "
             f"D={args.head_dim}, {args.dtype}, block {args.block}")
    print(title)
    table = print_table(rows, COLUMNS, FORMATS)
    write_json(out / "bench_block_sparse.json", {"info": info, "args": vars(args), "rows": rows, "table": table})
    plot(rows, out / "bench_block_sparse.png", title)


if __name__ == "__main__":
    main()
