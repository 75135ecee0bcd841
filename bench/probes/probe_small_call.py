"""Probe: where the time of a small block-sparse call goes (8K tokens at 5-10 % density: ~0.15 ms of GPU
work).

    python bench/probes/probe_small_call.py

For our public call on a plan made once (`block_sparse.plan`, passed as plan=: one launch; fast launch of a
repeated signature), the same call without a plan (planned each call: two launches), our kernel entry
(`forward` on the same plan: no input checks, Triton's JIT dispatch every call) and FlexAttention on the same
mask: do_bench's median (what bench_block_sparse.py reports: L2 flushed, each call timed alone, so host time
that exceeds the flush shows), the host time per call (200 calls queued, no sync), and the GPU time of the
call replayed from a CUDA graph (no host work at all).
"""
import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH.parent), str(BENCH)]  # sparse_attn from the repository, common from bench/

import torch  # noqa: E402

from common import (  # noqa: E402
    bench_ms, flex_attention_fn, flex_block_mask, graph_replay_ms, host_us, random_causal_block_mask,
)
from sparse_attn.layouts import BlockLayout  # noqa: E402
from sparse_attn.ops.block_sparse import block_sparse_attention, plan as bs_plan  # noqa: E402
from sparse_attn.ops.block_sparse import kernel as bs_kernel  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=8192)
    p.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1])
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    s, h, hkv, d = a.seqlen, 32, 8, 128
    q = torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    print(f"{'density':>8} {'call':>22} {'do_bench us':>12} {'host us':>8} {'host+sync us':>12} {'graph us':>9}")
    for _ in range(a.rounds):
        for target in a.densities:
            mask = random_causal_block_mask(h, s, 128, target, gen)
            layout = BlockLayout.from_block_mask(mask, 128, 128, s, s)
            cfg = bs_kernel.default_config(d, q.dtype, 128, 128, layout.max_blocks, s)
            plan = bs_plan(q, k, v, layout, causal=True)  # made once, held by the caller
            calls = {
                "public, plan made once": lambda: block_sparse_attention(q, k, v, layout, causal=True, plan=plan),
                "public, plan each call": lambda: block_sparse_attention(q, k, v, layout, causal=True),
                "forward": lambda: bs_kernel.forward(q, k, v, layout, causal=True, scale=d ** -0.5, packed=False,
                                                     batch=1, max_seqlen_q=s, plan=plan, config=cfg),
                "flex": flex_attention_fn(q, k, v, flex_block_mask(mask, 128, s, s)),
            }
            for name, fn in calls.items():
                fn()
                b = bench_ms(fn) * 1e3
                hu, hs = host_us(fn)
                gu = graph_replay_ms(fn) * 1e3
                print(f"{layout.density(causal=True):8.3f} {name:>22} {b:12.1f} {hu:8.1f} {hs:12.1f} {gu:9.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
