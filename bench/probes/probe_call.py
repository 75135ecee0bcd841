"""Probe: a method timed as one `sparse_attention` call against the sum of its phases (a synchronize between
them), alternated so that the GPU's power state treats both alike; the caching allocator's device
allocations during each; and one profiled call's GPU idle gaps (with the kernels around them) and CUDA API
time. (Written when the methods benchmark, timing the call after all the phases' passes, read it 6-9 % slower
than the phases at 512K: that was the GPU's power state.)

    python bench/probes/probe_call.py --seqlens 131072 524288 [--method vertical_slash:share_heads=2]

--method: a method that runs one pattern, as a spec "name" or "name:key=value,..." (common.parse_method_spec;
the methods benchmark's record configurations, e.g. "vertical_slash", "vertical_slash:share_heads=2",
"a_shape:window=4096", "block_sparse:density=0.05"); not the per-head mixture, which has no phases.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH.parent), str(BENCH)]  # sparse_attn from the repository, common from bench/

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from common import event_ms, method_call, method_phases, methods_inputs, parse_method_spec  # noqa: E402
from sparse_attn.methods import get_method  # noqa: E402


def _device_allocs() -> int:
    st = torch.cuda.memory_stats()
    return st.get("num_device_alloc", 0) + st.get("num_alloc_retries", 0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[131072, 524288])
    p.add_argument("--method", default="vertical_slash", help='spec "name" or "name:key=value,..."')
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--gap-us", type=float, default=30.0, help="list GPU idle gaps longer than this")
    a = p.parse_args()
    try:
        label, name, kwargs = parse_method_spec(a.method)
    except ValueError as e:
        p.error(f"--method: {e}")
    if get_method(name).pattern is None:
        p.error(f"--method: {name!r} does not run one pattern, so it has no phases to sum")
    for s in a.seqlens:
        q, k, v = methods_inputs(s)
        phases = method_phases(name, kwargs, q, k, v)
        call = method_call(name, kwargs, q, k, v)

        def phase_sum():
            result, total = None, 0.0
            for _, fn in phases:
                box = {}
                total += event_ms(lambda fn=fn, prev=result: box.setdefault("r", fn(prev)))
                result = box["r"]
            return total

        phase_sum(), call(None)  # warm-up
        rows, allocs = [], {"phases": 0, "call": 0}
        for _ in range(a.repeats):
            n0 = _device_allocs()
            ps = phase_sum()
            n1 = _device_allocs()
            c = event_ms(lambda: call(None))
            allocs["phases"] += n1 - n0
            allocs["call"] += _device_allocs() - n1
            rows.append((ps, c))
        print(f"\n## {label}, S={s}: phases' sum vs one call, alternated ({a.repeats} pairs)")
        print("| pair | phases ms | call ms |\n|---|---|---|")
        for i, (ps, c) in enumerate(rows):
            print(f"| {i} | {ps:.2f} | {c:.2f} |")
        print(f"| median | {statistics.median(r[0] for r in rows):.2f} | {statistics.median(r[1] for r in rows):.2f} |")
        print(f"device allocations (cudaMalloc) during the timed passes: phases {allocs['phases']}, "
              f"call {allocs['call']}")

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            call(None)
            torch.cuda.synchronize()
        evs = prof.events()
        gpu = sorted((e for e in evs if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
        busy = sum(e.time_range.elapsed_us() for e in gpu) / 1e3
        span = (gpu[-1].time_range.end - gpu[0].time_range.start) / 1e3
        print(f"\nprofiled call: {len(gpu)} GPU ops, busy {busy:.2f} ms over a span of {span:.2f} ms")
        print("| gap us | after | before |\n|---|---|---|")
        for x, y in zip(gpu, gpu[1:]):
            gap = y.time_range.start - x.time_range.end
            if gap > a.gap_us:
                print(f"| {gap:.0f} | {x.name[:40]} | {y.name[:40]} |")
        api = defaultdict(lambda: [0.0, 0])
        for e in evs:
            if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("cuda"):
                api[e.name][0] += e.time_range.elapsed_us() / 1e3
                api[e.name][1] += 1
        print("CUDA API calls (host ms, count): " + ", ".join(
            f"{n} {ms:.2f} x{c}" for n, (ms, c) in sorted(api.items(), key=lambda kv: -kv[1][0])[:8]))
        del q, k, v, phases, call
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
