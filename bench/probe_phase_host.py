"""Probe: each phase of a method's call timed twice, on the GPU (events, a synchronize before) and on the host
(until the phase's Python returned), median of --repeats: where the host time reaches the GPU time the phase
is host-bound. Scratch measurement for bench/NOTES_vertical_slash.md.

    python bench/probe_phase_host.py --seqlens 131072 --methods vertical_slash
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import bench_methods as bm  # noqa: E402
from probe_attention_call import timed  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqlens", type=int, nargs="+", default=[131072])
    p.add_argument("--methods", nargs="+", default=["vertical_slash"], choices=bm.METHODS)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    args = bm.parse_args(["--methods", *a.methods])
    for s in a.seqlens:
        q, k, v = bm.make_inputs(args, s, torch.bfloat16)
        for name in a.methods:
            phases, _ = bm.method_phases(name, args, q, k, v)
            print(f"\n{name}, S={s} (median of {a.repeats})\n| phase | GPU ms | host ms |\n|---|---|---|")
            result = None
            for ph, fn in phases:
                prev = result
                g, h = timed(lambda: fn(prev), a.repeats)
                result = fn(prev)
                print(f"| {ph} | {g:.3f} | {h:.3f} |", flush=True)
            del result, phases


if __name__ == "__main__":
    main()
