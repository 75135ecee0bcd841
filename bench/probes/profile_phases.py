"""Probe: where each phase of a method's call spends its time, kernel by kernel (torch.profiler), next to
the phase's wall time. Scratch measurement for bench/NOTES_vertical_slash.md, not a benchmark of record.

    python bench/profile_phases.py --seqlens 131072 --methods vertical_slash

Same inputs and phases as bench_methods.py. Per phase: wall ms (CUDA events, synchronize around the phase,
median of --repeats), the summed GPU time of its kernels, the gap between the two (host-bound time: the GPU
waits on launches or a sync), and the kernels that take the most GPU time.

Caveat (session 18): the kernel times come from one profiled pass, and on a power-capped GPU a long kernel
can read several percent lower there than in the timed passes (the vertical-slash attention kernel: 38.3-38.9
against ~41-42 ms), which inflates the gap of a phase that one long kernel dominates. For host time,
bench/probe_phase_host.py measures it directly.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bench_methods as bm  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[131072])
    p.add_argument("--methods", nargs="+", default=["vertical_slash"], choices=bm.METHODS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--cprofile", action="store_true", help="also each phase's Python time under cProfile")
    p.add_argument("--timeline", action="store_true", help="also each phase's kernels in order, with GPU gaps")
    a = p.parse_args(argv)
    args = bm.parse_args(["--methods", *a.methods])
    for s in a.seqlens:
        q, k, v = bm.make_inputs(args, s, torch.bfloat16)
        for name in a.methods:
            phases, _ = bm.method_phases(name, args, q, k, v)
            walls = {ph: [] for ph, _ in phases}
            kernels = {ph: defaultdict(lambda: [0.0, 0]) for ph, _ in phases}
            for it in range(1 + a.repeats):
                result = None
                for ph, fn in phases:
                    torch.cuda.synchronize()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    if it == a.repeats:  # the last pass is profiled, the others timed
                        with profile(activities=[ProfilerActivity.CUDA]) as prof:
                            result = fn(result)
                            torch.cuda.synchronize()
                        for e in prof.events():
                            if e.device_type == torch.autograd.DeviceType.CUDA:
                                row = kernels[ph][e.name[:70]]
                                row[0] += e.device_time / 1e3
                                row[1] += 1
                    else:
                        start.record()
                        result = fn(result)
                        end.record()
                        torch.cuda.synchronize()
                        if it > 0:
                            walls[ph].append(start.elapsed_time(end))
            print(f"\n## {name}, S={s}")
            print("| phase | wall ms (median) | GPU kernels ms | launches | gap ms |")
            print("|---|---|---|---|---|")
            for ph, _ in phases:
                gpu = sum(r[0] for r in kernels[ph].values())
                n = sum(r[1] for r in kernels[ph].values())
                wall = statistics.median(walls[ph])
                print(f"| {ph} | {wall:.3f} | {gpu:.3f} | {n} | {wall - gpu:.3f} |")
            for ph, _ in phases:
                print(f"\n{ph}: top kernels")
                top = sorted(kernels[ph].items(), key=lambda kv: -kv[1][0])[: a.top]
                for kname, (ms, n) in top:
                    print(f"  {ms:9.3f} ms  x{n:<4d} {kname}")
            if a.timeline:
                timeline(phases)
            if a.cprofile:
                python_profile(phases, a.top)
            del result


def timeline(phases):
    """Each phase once: its kernels in launch order with their start (us from the phase's first CPU op) and
    the idle GPU time before each."""
    result = None
    for ph, fn in phases:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            result = fn(result)
            torch.cuda.synchronize()
        evs = prof.events()
        t0 = min(e.time_range.start for e in evs)
        gpu = sorted((e for e in evs if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
        print(f"\n{ph}: timeline (us from the phase's first CPU event)")
        prev = None
        for e in gpu:
            gap = e.time_range.start - (prev if prev is not None else t0)
            print(f"  start {e.time_range.start - t0:9.1f}  gap {gap:8.1f}  dur {e.time_range.elapsed_us():8.1f}  "
                  f"{e.name[:60]}")
            prev = e.time_range.end
        print(f"  end of last CPU event {max(e.time_range.end for e in evs) - t0:9.1f}")
    del result


def python_profile(phases, top):
    import cProfile
    import io
    import pstats

    result = None
    for ph, fn in phases:
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        result = fn(result)
        torch.cuda.synchronize()
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(top + 10)
        print(f"\n{ph}: cProfile (cumulative)")
        print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:6000])
    del result


if __name__ == "__main__":
    main()
