"""Probe: where the time of a small block-sparse call goes (8K tokens at 5-10 % density: ~0.15 ms of GPU
work). Scratch measurement for bench/NOTES_block_sparse.md, not a benchmark of record.

    python bench/probe_small_call.py

For our public call, our kernel entry (`forward`, no input checks) and FlexAttention on the same mask:
do_bench's median (what bench_block_sparse.py reports: L2 flushed, each call timed alone, so host time
that exceeds the flush shows), the host time per call (200 calls queued, no sync), and the GPU time of
the call replayed from a CUDA graph (no host work at all).

Written 2026-11-23 after the suite showed the 8K / 6.5 % point host-bound; its runs before and after the
fast launch: bench/results/2026-11-23-h100-vs-pairs/run1_probe_small_call_before_fast_launch.txt and
bench/results/2026-11-23-h100-fastlaunch/probe_small_call.txt (NOTES_block_sparse.md v7).
"""
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from bench_block_sparse import random_causal_layout  # noqa: E402
from common import bench_ms, capture_graph, flex_attention_fn, flex_block_mask  # noqa: E402
from sparse_attn.ops.block_sparse import block_sparse_attention  # noqa: E402
from sparse_attn.ops.block_sparse import kernel as bs_kernel  # noqa: E402


def host_us(fn, n=200):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6, (time.perf_counter() - t0) / n * 1e6


def graph_us(fn, n=50):
    try:
        g = capture_graph(fn, warmup=3)
        g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n * 1e3
    except Exception as e:  # noqa: BLE001
        print("graph failed:", type(e).__name__, str(e)[:120])
        return float("nan")


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    s, h, hkv, d = 8192, 32, 8, 128
    q = torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    print(f"{'density':>8} {'call':>22} {'do_bench us':>12} {'host us':>8} {'host+sync us':>12} {'graph us':>9}")
    for rep in range(2):
        for target in (0.05, 0.1):
            mask, layout = random_causal_layout(h, s, 128, target, gen)
            cfg = bs_kernel.default_config(d, q.dtype, 128, 128, layout.max_blocks, s)
            calls = {
                "public": lambda: block_sparse_attention(q, k, v, layout, causal=True),
                "public, plan each call": lambda: (layout.__dict__.pop("_plan_cache", None),
                                                   block_sparse_attention(q, k, v, layout, causal=True)),
                "forward": lambda: bs_kernel.forward(q, k, v, layout, causal=True, scale=d ** -0.5, packed=False,
                                                     batch=1, max_seqlen_q=s, config=cfg),
                "flex": flex_attention_fn(q, k, v, flex_block_mask(mask, 128, s, s)),
            }
            for name, fn in calls.items():
                fn()
                b = bench_ms(fn) * 1e3
                hu, hs = host_us(fn)
                gu = graph_us(fn)
                print(f"{layout.density(causal=True):8.3f} {name:>22} {b:12.1f} {hu:8.1f} {hs:12.1f} {gu:9.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
