"""Probe: spilled range tails (kernel.SPILL_KEYS, _range_split) on the methods benchmark's per-head
vertical-slash layout: per setting, the plan's range tiles and gathered tiles, and the attention call's time
(plan + kernel, CUDA events, median of --repeats; the settings alternate within each repeat so that all see
the same power state of the GPU), and the output's largest difference from the first setting's. Each
setting's plan is the library's (kernel.make_plan: same backend, heads per program, launch configuration)
with its tile lists cut at that spill.

    python bench/probes/probe_spill.py --seqlens 131072 1048576 --spill 0 16 32 63
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
from sparse_attn.ops.reference import AttentionInputs  # noqa: E402
from sparse_attn.ops.vertical_slash import kernel as vs  # noqa: E402


def choices(q, k, v, layout, shapes):
    """(backend, heads per program, launch config, tma) of kernel.make_plan's plan for these causal,
    unpacked inputs (its tile lists are dropped)."""
    base = vs.make_plan(q, k, v, layout, shapes, causal=True)
    return base.backend, base.heads, base.config, base.tma


def spill_plan(q, layout, shapes, spill: int, chosen):
    """The plan kernel.make_plan makes (with `chosen`, see choices) but with its tile lists cut at `spill`
    spilled keys: what it gives with kernel.SPILL_KEYS = spill."""
    backend, heads, config, tma = chosen
    group = shapes.num_heads // shapes.num_kv_heads
    tiles = vs._tile_lists(layout, (layout.range_counts,) * 2, (shapes.max_seqlen_q, shapes.max_seqlen_k),
                           shapes.num_heads, config["BN"], True, False,
                           split=bool(config.get("wide_unmasked", False)), hp=heads, group=group, spill=spill)
    return vs.Plan(*tiles, backend, heads, config, tma, layout, vs.plan_signature(q, shapes, True))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[131072])
    p.add_argument("--spill", type=int, nargs="+", default=[0, 16, 32, 63])
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}")
    print("| S | spill | range tiles | gathered tiles | all tiles | attention ms | max |diff| |")
    print("|---|---|---|---|---|---|---|")
    for s in a.seqlens:
        q, k, v = methods_inputs(s)
        layout = vs_layout(q, k)
        shapes = AttentionInputs(q, k, v)
        chosen = choices(q, k, v, layout, shapes)
        bn = chosen[2]["BN"]
        if not all(0 <= x < bn for x in a.spill):
            raise SystemExit(f"--spill: expected values in [0, {bn}) (the {chosen[0]} kernel's BN)")
        rows, diffs, times = {}, {}, {x: [] for x in a.spill}
        first_out = None
        for spill in a.spill:
            counts = spill_plan(q, layout, shapes, spill, chosen).counts.long()
            rows[spill] = (int(counts[..., 0].sum()), int(((counts[..., 2] + bn - 1) // bn).sum()))
            del counts
        for it in range(a.repeats + 1):
            for spill in a.spill:
                out = torch.empty_like(q)

                def call():  # the attention call: plan (at this spill) + kernel
                    vs.forward(q, k, v, layout, out, None, shapes, causal=True, scale=None,
                               plan=spill_plan(q, layout, shapes, spill, chosen))

                ms = event_ms(call)
                if it > 0:
                    times[spill].append(ms)
                elif first_out is None:
                    first_out, diffs[spill] = out, 0.0
                else:
                    diffs[spill] = max((out[:, h:h + 4].float() - first_out[:, h:h + 4].float()).abs().max().item()
                                       for h in range(0, out.shape[1], 4))
                del out
        for spill in a.spill:
            diff = diffs[spill]
            tiles, gathered = rows[spill]
            print(f"| {s} | {spill} | {tiles} | {gathered} | {tiles + gathered} | "
                  f"{statistics.median(times[spill]):.2f} | {diff:.2e} |", flush=True)
        del q, k, v, layout, first_out


if __name__ == "__main__":
    main()
