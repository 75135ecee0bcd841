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

from bench_methods import make_inputs, parse_args as methods_args  # noqa: E402
from sparse_attn import dispatch  # noqa: E402
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
        q, k, v = make_inputs(args, s, torch.bfloat16)
        configs = [{"pattern": "vertical_slash", "vertical_size": 1000, "slash_size": 6096}] * q.shape[1]
        est = dispatch.estimate_pattern("vertical_slash", q, k, configs, share_heads=1, causal=True, scale=None,
                                        block_size=64, last_q=64)
        layout = dispatch.build_pattern("vertical_slash", est, q, k, configs, block_size=64)
        shapes = AttentionInputs(q, k, v)
        out = torch.empty_like(q)

        def call():
            vs.forward(q, k, v, layout, out, None, shapes, causal=True, scale=None)

        real_plan = vs._plan
        rows = [("whole call (plan + kernel)", *timed(call, a.repeats))]
        plan = real_plan(layout, (layout.range_counts,) * 2, (s, s), q.shape[1], 64, True, False, split=False)
        vs._plan = lambda *x, **y: plan  # the Gluon path's plan (BN 64, range order)
        try:
            rows.append(("call, plan cached", *timed(call, a.repeats)))
            rows.append(("call, plan cached, 5 back to back", *timed(call, a.repeats, batch=5)))
        finally:
            vs._plan = real_plan
        rows.append(("plan alone", *timed(lambda: real_plan(layout, (layout.range_counts,) * 2, (s, s), q.shape[1],
                                                             64, True, False, split=False), a.repeats)))
        rows.append(("whole call again", *timed(call, a.repeats)))
        print(f"\nS={s}: attention call on the per-head layout (ms; host = until the last call returned)")
        print("| what | GPU ms per call | host ms |")
        print("|---|---|---|")
        for label, g, h in rows:
            print(f"| {label} | {g:.3f} | {h:.3f} |")
        del q, k, v, layout, out, est, plan
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
