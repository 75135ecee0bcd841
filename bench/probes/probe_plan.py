"""Probe: the vertical-slash plan's tile-list kernel (`kernel._tiles_kernel`) under other launch parameters
(ranges per step, tiles per step, warps), on the methods benchmark's per-head layout; each variant's lists
are checked against the default's. Scratch measurement for bench/NOTES_vertical_slash.md.

    python bench/probe_plan.py --seqlens 131072 1048576
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from bench_methods import parse_args as methods_args  # noqa: E402
from probe_attention_call import timed  # noqa: E402
from probe_vs_hopper import gluon_plan, per_head_layout  # noqa: E402
from sparse_attn.ops.vertical_slash import kernel as vs  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqlens", type=int, nargs="+", default=[131072])
    a = p.parse_args()
    args = methods_args([])
    for s in a.seqlens:
        layout = per_head_layout(args, s)[3]
        h = layout.num_heads
        cu = (layout.range_counts,) * 2
        counts, first_tile, t_start, t_end = gluon_plan(layout)
        nqb = layout.num_query_blocks
        whole = timed(lambda: gluon_plan(layout), 5)[0]
        print(f"\nS={s}: {t_start.numel()} tiles; whole plan {whole:.3f} ms")
        print("| LANES | TL | warps | tiles kernel ms | equal |")
        print("|---|---|---|---|---|")
        for lanes, tl_, warps in ((64, 16, 4), (32, 16, 4), (32, 8, 2), (32, 16, 1), (16, 16, 1), (64, 8, 2),
                                  (32, 32, 4), (16, 8, 1)):
            ts, te = torch.full_like(t_start, -1), torch.full_like(t_end, -1)

            def launch():
                vs._tiles_kernel[(nqb, h)](
                    layout.range_counts, layout.range_starts, layout.range_ends, *cu, counts, first_tile, ts, te,
                    h, nqb, layout.max_ranges, s, s, LANES=lanes, TL=tl_, NC=vs.COUNTS_PER_BLOCK,
                    num_warps=warps, BM=64, BN=64, CAUSAL=True, VARLEN=False, SPLIT=False, HP=1)

            try:
                ms = timed(launch, 5)[0]
                same = bool(torch.equal(ts, t_start) and torch.equal(te, t_end))
                print(f"| {lanes} | {tl_} | {warps} | {ms:.3f} | {same} |", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"| {lanes} | {tl_} | {warps} | failed: {type(e).__name__}: {str(e)[:120]} | |", flush=True)
        del layout, counts, first_tile, t_start, t_end
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
