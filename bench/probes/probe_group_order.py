"""Probe: does the order of a block's ranges change how often the four query heads of a kv head share a
K/V tile in L2?

    python bench/probes/probe_group_order.py --seqlens 1048576 [--once]

At 1M the per-head kernel reads ~1 TB from DRAM per call (L2 hit rate ~61 %) although the four heads of a
group choose mostly the same diagonals: each head walks its ranges in key order, so a range the heads share
comes up at a different point of each head's walk (after however many ranges of its own that head has) and
the heads read it tens of tiles apart, beyond what the L2 keeps. Variants, timed alternately in one
process, attention call (plan + Gluon kernel) only:
- per-head: the benchmark's layout as built, in key order (the library's shared-first order switched off);
- product: the same layout through the library's plan with its shared-first order (kernel._group_order)
  switched on at this length: what `sparse_attention` runs;
- shared-first: the same ranges reordered here in torch (the probe's first form of the order) by how many
  of the group's other heads also cover the range's middle key (3, 2, 1, 0), in key order within each
  class, so the heads start on what they share together; same attention, the online softmax summed in
  another order;
- core-first: each shared range cut into the part every head of the group covers there (identical tiles
  in all four heads) and its remainders; cores first, then the rest, each in key order; same keys per head;
- group copy: every head of a group given its group's first head's ranges and columns (another attention:
  timing only), the ceiling of sharing;
- shared only: each head's ranges that every other head of the group covers at their middle key, alone
  (another attention: timing and DRAM only): what the shared part costs when nothing else is read.
--once: one call per variant, to run under ncu.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH.parent), str(BENCH)]  # sparse_attn from the repository, common from bench/

import torch  # noqa: E402

from common import event_ms, methods_inputs, vs_layout  # noqa: E402
from sparse_attn.layouts import VerticalSlashLayout  # noqa: E402
from sparse_attn.ops.reference import AttentionInputs  # noqa: E402
from sparse_attn.ops.vertical_slash import kernel as vs  # noqa: E402


BLOCK = 64


def tiles_per_block(layout) -> float:
    """Mean 64-key tiles per (head, query block), range tiles and column tiles together."""
    live = torch.arange(layout.range_starts.shape[-1], device=layout.device) < layout.range_counts[..., None]
    lens = torch.where(live, layout.range_ends - layout.range_starts, 0).clamp(min=0).to(torch.int64)
    ranges = ((lens + BLOCK - 1) // BLOCK).sum(-1)
    cols = (layout.column_counts.to(torch.int64) + BLOCK - 1) // BLOCK
    return float((ranges + cols).double().mean())


def _with(layout, **tensors):
    fields = dict(range_counts=layout.range_counts, range_starts=layout.range_starts, range_ends=layout.range_ends,
                  column_counts=layout.column_counts, column_indices=layout.column_indices)
    fields.update(tensors)
    return VerticalSlashLayout(**fields, block_size_q=layout.block_size_q, seqlen_q=layout.seqlen_q,
                               seqlen_k=layout.seqlen_k, validate=False)


def _live(layout):
    """Which entries of range_starts / range_ends are ranges (not padding)."""
    return torch.arange(layout.max_ranges, device=layout.device) < layout.range_counts[..., None]


def _covering(layout, group: int):
    """For each pair (a, o) of different query heads of one group: whether head o has a range holding the
    middle key of each of head a's ranges (same query block), and that range's start and end. Yields
    (a, hit, start_o, end_o)."""
    starts, ends, counts = layout.range_starts, layout.range_ends, layout.range_counts
    live = _live(layout)
    big = torch.iinfo(torch.int32).max
    search = torch.where(live, starts, big).contiguous()
    mid = torch.where(live, (starts + ends) // 2, big)
    for g0 in range(0, starts.shape[1], group):
        for a in range(g0, g0 + group):
            for o in range(g0, g0 + group):
                if o == a:
                    continue
                idx = torch.searchsorted(search[:, o].contiguous(), mid[:, a].contiguous(), right=True) - 1
                safe = idx.clamp(min=0)
                e_o = ends[:, o].gather(-1, safe)
                hit = (idx >= 0) & (safe < counts[:, o, :, None]) & (e_o > mid[:, a])
                yield a, hit, starts[:, o].gather(-1, safe), e_o


def shared_first(layout, group: int):
    starts, ends, counts = layout.range_starts, layout.range_ends, layout.range_counts
    live = _live(layout)
    cover = torch.zeros_like(starts)
    for a, hit, _, _ in _covering(layout, group):
        cover[:, a] += hit.to(cover.dtype)
    key = ((group - 1 - cover).to(torch.int64) << 32) | starts.to(torch.int64)
    key = torch.where(live, key, torch.iinfo(torch.int64).max)
    order = key.argsort(dim=-1, stable=True)
    shares = {c: float(((cover == c) & live).sum()) / float(live.sum()) for c in range(group)}
    reordered = _with(layout, range_starts=starts.gather(-1, order).contiguous(),
                      range_ends=ends.gather(-1, order).contiguous())
    # the ranges every other head covers, alone (listed first by the order above)
    only = _with(reordered, range_counts=((cover == group - 1) & live).sum(-1).to(counts.dtype))
    return reordered, shares, only


def core_first(layout, group: int):
    """Each range that every other head of the group covers at its middle key is cut into the part all the
    group's heads cover there (the core: the same tiles in every head) and what is left either side; each
    block lists the cores first, then everything else, each in key order. Same keys per head."""
    starts, ends, counts = layout.range_starts, layout.range_ends, layout.range_counts
    live = _live(layout)
    lo, hi = starts.clone(), ends.clone()
    shared = live.clone()
    for a, hit, s_o, e_o in _covering(layout, group):
        shared[:, a] &= hit
        lo[:, a] = torch.maximum(lo[:, a], torch.where(hit, s_o, lo[:, a]))
        hi[:, a] = torch.minimum(hi[:, a], torch.where(hit, e_o, hi[:, a]))
    lo, hi = torch.where(shared, lo, starts), torch.where(shared, hi, ends)
    # three pieces per range: left [start, lo), core [lo, hi), right [hi, end); a range not shared is all "left"
    p_start = torch.stack([starts, lo, hi], -1).flatten(-2)
    p_end = torch.stack([torch.where(shared, lo, ends), hi, ends], -1).flatten(-2)
    is_core = torch.stack([torch.zeros_like(shared), shared, torch.zeros_like(shared)], -1).flatten(-2)
    keep = live.repeat_interleave(3, -1) & (p_end > p_start)
    keep &= is_core | ~torch.stack([torch.zeros_like(shared), ~shared, ~shared], -1).flatten(-2)
    key = ((~is_core).to(torch.int64) << 32) | p_start.to(torch.int64)
    key = torch.where(keep, key, torch.iinfo(torch.int64).max)
    order = key.argsort(dim=-1, stable=True)
    n = keep.sum(-1)
    width = int(n.max())
    order = order[..., :width]
    return _with(layout, range_counts=n.to(counts.dtype), range_starts=p_start.gather(-1, order).contiguous(),
                 range_ends=p_end.gather(-1, order).contiguous())


def group_copy(layout, group: int):
    out = {}
    for name in ("range_counts", "range_starts", "range_ends", "column_counts", "column_indices"):
        t = getattr(layout, name)
        first = t[:, ::group]
        out[name] = first.repeat_interleave(group, 1).contiguous()
    return _with(layout, **out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[1048576])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", nargs="+", default=["per-head", "product", "shared-first", "group copy"],
                   choices=["per-head", "product", "shared-first", "core-first", "group copy", "shared only"])
    p.add_argument("--once", action="store_true")
    a = p.parse_args(argv)
    default_min = vs.GROUP_ORDER_MIN_KEYS
    for s in a.seqlens:
        q, k, v = methods_inputs(s)
        group = q.shape[1] // k.shape[1]
        layout = vs_layout(q, k)
        shapes = AttentionInputs(q, k, v)
        reordered, shares, only = shared_first(layout, group)
        make = {"per-head": lambda: layout, "product": lambda: layout, "shared-first": lambda: reordered,
                "core-first": lambda: core_first(layout, group), "group copy": lambda: group_copy(layout, group),
                "shared only": lambda: only}
        variants = {name: make[name]() for name in a.variants}
        print(f"S={s}: ranges whose middle key 3/2/1/0 other heads of the group also cover: "
              + " / ".join(f"{100 * shares[c]:.1f} %" for c in (3, 2, 1, 0)), flush=True)
        order_ms = statistics.median(event_ms(lambda: vs._group_order(layout, group)) for _ in range(5))
        print(f"  kernel._group_order alone: {order_ms:.2f} ms", flush=True)
        # two output buffers (at 1M each is 8.6 GB): the per-head layout's, and one the others share
        outs = {"per-head": torch.full_like(q, float("nan")), "other": torch.full_like(q, float("nan"))}

        def call(name):
            # "product": the library's own plan, which orders ranges shared-first from GROUP_ORDER_MIN_KEYS
            # keys on; every other variant runs with that order off
            vs.GROUP_ORDER_MIN_KEYS = min(default_min, s) if name == "product" else 1 << 62
            try:
                vs.forward(q, k, v, variants[name], outs["per-head" if name == "per-head" else "other"], None,
                           shapes, causal=True, scale=None, backend="gluon")
            finally:
                vs.GROUP_ORDER_MIN_KEYS = default_min

        times = {name: [] for name in variants}
        for r in range(1 if a.once else a.rounds + 1):
            for name in variants:
                ms = event_ms(lambda: call(name))
                if r > 0 or a.once:
                    times[name].append(ms)
        base = statistics.median(times["per-head"])
        for name in variants:
            ms = statistics.median(times[name])
            if name != "per-head":
                outs["other"].fill_(float("nan"))
                call(name)
            diff = max((outs["other"][:, h].float() - outs["per-head"][:, h].float()).abs().max().item()
                       for h in range(q.shape[1])) if name != "per-head" else 0.0
            tiles = tiles_per_block(variants[name])
            print(f"  {name:>13} {ms:9.2f} ms  x{base / ms:5.3f} of per-head  {tiles:6.1f} tiles/blk  max|diff| "
                  f"vs per-head {diff:.2e}  ({' '.join(f'{t:.1f}' for t in times[name])})", flush=True)
        del q, k, v, layout, variants, outs, reordered, only
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
