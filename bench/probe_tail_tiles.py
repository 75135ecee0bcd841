"""Probe (CPU, no GPU needed): how much of the vertical-slash kernel's range-tile work the ranges' short
last tiles take, on the methods benchmark's kind of input (structured, RoPE, sinks; only the last 64
queries are made, since the estimator reads no others). Scratch measurement for
bench/NOTES_vertical_slash.md, not a benchmark of record.

    python bench/probe_tail_tiles.py --seqlen 131072

Prints: ranges per block, the range tiles (64 keys) a plan cuts and the share of their key slots in use, the
partial tiles, and the tiles left if the tails of ranges wider than a tile were gathered 64 keys to a tile
with the columns (what kernel.SPILL_KEYS does, for tails of at most SPILL_KEYS keys), plus the commonest
range widths. At 1M the torch index builder needs more memory than 24 GB.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sparse_attn.estimators.vertical_slash import estimate_vertical_slash  # noqa: E402
from sparse_attn.ops.vertical_slash.index import build_vertical_slash_index  # noqa: E402

BN = 64


def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1]
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos[:, None].float() * inv
    x1, x2 = x[..., ::2].float(), x[..., 1::2].float()
    return torch.stack([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1).flatten(-2)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=131072)
    p.add_argument("--spill", type=int, default=32, help="largest tail gathered (kernel.SPILL_KEYS)")
    a = p.parse_args()
    s, h, hk, d, last = a.seqlen, 32, 8, 128, 64
    torch.manual_seed(0)
    u = torch.randn(hk, 1, d) * 4  # as bench_methods.make_inputs: a shared direction per kv head, sinks
    k = torch.randn(hk, s, d) + u
    k[:, :4] += u
    k = rope(k, torch.arange(s))
    q = rope(torch.randn(h, last, d) + u.repeat_interleave(h // hk, 0), torch.arange(s - last, s))
    choice = estimate_vertical_slash(q[None], k[None], vertical_size=1000, slash_size=6096, last_q=last,
                                     backend="torch")
    layout = build_vertical_slash_index(choice[0], choice[1], s, s, BN, backend="torch")
    n = layout.range_counts[0].long()
    nqb = s // BN
    reach = torch.arange(1, nqb + 1) * BN  # causal: a block's rows see keys below its end
    live = torch.arange(layout.max_ranges)[None, None, :] < n[..., None]
    width = ((torch.minimum(layout.range_ends[0].long(), reach[None, :, None]) - layout.range_starts[0].long())
             .clamp(min=0) * live)
    tiles = (width + BN - 1) // BN
    rest = width % BN
    tail = (width > BN) & (rest > 0) & (rest <= a.spill)  # (the plan also spares ranges that cross the diagonal)
    print(f"S={s}: {n.float().mean():.1f} ranges per block (max {layout.max_ranges})")
    print(f"range tiles {int(tiles.sum())}, key slots in use {width.sum() / (BN * tiles.sum()):.3f}")
    print(f"partial tiles {int((live & (rest > 0)).sum())}, of ranges wider than a tile "
          f"{int((live & (rest > 0) & (width > BN)).sum())}")
    cols = int(((layout.column_counts[0] + BN - 1) // BN).sum())
    gathered = int(((layout.column_counts[0] + (rest * tail).sum(-1) + BN - 1) // BN).sum())
    print(f"tiles now: {int(tiles.sum())} range + {cols} column = {int(tiles.sum()) + cols}")
    print(f"tails <= {a.spill} keys gathered: {int(tiles.sum() - tail.sum())} range + {gathered} gathered = "
          f"{int(tiles.sum() - tail.sum()) + gathered}")
    hist = torch.bincount(width[live].clamp(max=10 * BN))
    top = sorted(((int(c), w) for w, c in enumerate(hist.tolist()) if c), reverse=True)[:10]
    print("commonest widths (count, keys):", top)


if __name__ == "__main__":
    main()
