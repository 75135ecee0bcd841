"""Probe: how many bytes the per-head vertical-slash attention must read from DRAM, from the structure of the
methods benchmark's index alone; to set against ncu's dram__bytes_read of the kernel. Scratch measurement for
bench/NOTES_vertical_slash.md.

    python bench/probe_dram_floor.py --seqlens 524288 1048576

The model. Block b (rows 64b .. 64b+63) reads key p through a range when its offset o = 64b - p lies in the
offsets its diagonals cover, and those offsets are the same for every block of a head (the diagonals are
per head, not per block). So a head's index is one set of offset intervals, read off its last query block,
which sees every diagonal. The kernel runs the query blocks of one kv head's group (4 query heads) together,
last blocks first, ~66 blocks at a time on 132 SMs. Key p is wanted by the group's blocks 64b = p + o for
every o in the group's offset set; two wants whose offsets differ by less than the reuse distance W (in
keys: the blocks running together plus what the L2 keeps, ~4-8K on an H100 at 1M) come from one DRAM
read, wants further apart each read DRAM again. So the DRAM bytes are (bytes of K and V per key) x the sum,
over the group's offset intervals merged across gaps < W, of the keys each merged cluster reaches,
(S - lo) x max(1, extent / W). Key columns are left out (1000 per head, read by every block: they stay in
L2), and so is what the L2 keeps between clusters further apart than W, so at lengths where a kv head's
K and V fit in L2 (128K: 64 MB against 50 MB) the model overstates.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from bench_methods import parse_args as methods_args  # noqa: E402
from probe_vs_hopper import per_head_layout  # noqa: E402

BLOCK = 64


def offset_intervals(layout, head: int):
    """The offsets o = 64b - p (as [lo, hi] closed intervals, sorted) that head's last query block reads
    through ranges."""
    b = layout.range_counts.shape[2] - 1
    n = int(layout.range_counts[0, head, b])
    starts = layout.range_starts[0, head, b, :n].tolist()
    ends = layout.range_ends[0, head, b, :n].tolist()
    return sorted((BLOCK * b - (e - 1), BLOCK * b - s) for s, e in zip(starts, ends))


def merge(intervals, gap: int):
    """Intervals merged where the space between them is below gap."""
    out = []
    for lo, hi in sorted(intervals):
        if out and lo - out[-1][1] <= gap:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


def dram_bytes(intervals, s: int, reuse: int, bytes_per_key: int) -> float:
    clusters = merge(intervals, reuse)
    keys = sum(max(0, s - max(lo, 0)) * max(1.0, (hi - lo) / reuse) for lo, hi in clusters)
    return keys * bytes_per_key


def tiles_per_block(layout) -> float:
    live = torch.arange(layout.range_starts.shape[-1], device=layout.device) < layout.range_counts[..., None]
    lens = torch.where(live, layout.range_ends - layout.range_starts, 0).clamp(min=0).to(torch.int64)
    ranges = ((lens + BLOCK - 1) // BLOCK).sum(-1)
    cols = (layout.column_counts.to(torch.int64) + BLOCK - 1) // BLOCK
    return float((ranges + cols).double().mean()), float(cols.double().mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[524288, 1048576])
    p.add_argument("--reuse", type=int, nargs="+", default=[1024, 4096, 8192])
    args = p.parse_args(argv)
    margs = methods_args([])
    group = margs.heads // margs.kv_heads
    bytes_per_key = 2 * margs.head_dim * 2  # K and V, 16-bit
    print(f"{'S':>8} {'tiles/blk':>9} {'col tiles':>9} {'ranges/head':>11} {'far/head':>8} "
          f"{'group ivals':>11} " + " ".join(f"{'GB W=' + str(w):>13}" for w in args.reuse))
    for s in args.seqlens:
        q, k, v, layout = per_head_layout(margs, s)
        del q, k, v
        tiles, cols = tiles_per_block(layout)
        per_head, far, groups = [], [], []
        for h in range(margs.heads):
            iv = offset_intervals(layout, h)
            per_head.append(len(iv))
            far.append(sum(1 for lo, _ in iv if lo > 16384))
        totals = {w: 0.0 for w in args.reuse}
        for g in range(margs.kv_heads):
            iv = [x for h in range(g * group, (g + 1) * group) for x in offset_intervals(layout, h)]
            groups.append(len(merge(iv, 0)))
            for w in args.reuse:
                totals[w] += dram_bytes(iv, s, w, bytes_per_key)
        print(f"{s:>8} {tiles:>9.1f} {cols:>9.1f} {sum(per_head) / len(per_head):>11.1f} "
              f"{sum(far) / len(far):>8.1f} {sum(groups) / len(groups):>11.1f} "
              + " ".join(f"{totals[w] / 1e9:>13.1f}" for w in args.reuse), flush=True)
        del layout
        torch.cuda.empty_cache()
    print("tiles/blk: 64-key tiles per (head, query block), columns included; ranges/head, far/head (offset "
          "> 16K): ranges of a head's last block; group ivals: the 4 heads' offset intervals merged; GB: the "
          "model's DRAM reads per call for reuse distance W keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
