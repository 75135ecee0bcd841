"""Probe: what the vertical-slash attention call's time is made of, on the methods benchmark's per-head layout:
the whole call (plan + kernel, a synchronize before each, as bench_methods.py times it), the plan alone, the
call with the plan cached (kernel + its host launch), and the kernel launched back to back (host time hidden).
Scratch measurement for bench/NOTES_vertical_slash.md, not a benchmark of record.

    python bench/probe_attention_call.py --seqlens 131072
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from bench_methods import parse_args as methods_args  # noqa: E402
from probe_vs_hopper import gluon_plan, per_head_layout  # noqa: E402
from sparse_attn.ops.reference import AttentionInputs  # noqa: E402
from sparse_attn.ops.vertical_slash import kernel as vs  # noqa: E402


def timed(fn, repeats: int, batch: int = 1):
    """Median ms per call over `repeats` event pairs, each around `batch` calls, a synchronize before each
    pair; also the median host ms per pair (time until the last call returns)."""
    fn()
    gpu, host = [], []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a.record()
        for _ in range(batch):
            fn()
        b.record()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        gpu.append(a.elapsed_time(b) / batch)
    return statistics.median(gpu), statistics.median(host)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqlens", type=int, nargs="+", default=[131072])
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    args = methods_args([])
    for s in a.seqlens:
        q, k, v, layout = per_head_layout(args, s)
        shapes = AttentionInputs(q, k, v)
        out = torch.empty_like(q)

        def call():
            vs.forward(q, k, v, layout, out, None, shapes, causal=True, scale=None)

        real_plan = vs._plan
        rows = [("whole call (plan + kernel)", *timed(call, a.repeats))]
        plan = gluon_plan(layout)
        vs._plan = lambda *x, **y: plan
        try:
            rows.append(("call, plan cached", *timed(call, a.repeats)))
            rows.append(("call, plan cached, 5 back to back", *timed(call, a.repeats, batch=5)))
        finally:
            vs._plan = real_plan
        rows.append(("plan alone", *timed(lambda: gluon_plan(layout), a.repeats)))
        rows.append(("whole call again", *timed(call, a.repeats)))
        print(f"\nS={s}: attention call on the per-head layout (ms; host = until the last call returned)")
        print("| what | GPU ms per call | host ms |")
        print("|---|---|---|")
        for label, g, h in rows:
            print(f"| {label} | {g:.3f} | {h:.3f} |")
        del q, k, v, layout, out, plan
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
