"""Probe: where each phase of a method's call spends its time, kernel by kernel (torch.profiler), next to the
phase's wall time and its host time.

    python bench/probes/profile_phases.py --seqlens 131072 --methods vertical_slash [--timeline] [--cprofile]

--methods: specs "name" or "name:key=value,..." (common.parse_method_spec), e.g. the methods benchmark's
record configurations "a_shape:window=4096", "vertical_slash", "vertical_slash:share_heads=2",
"block_sparse:density=0.05", "minference".

Same inputs and phases as the methods benchmark (common.method_phases: estimate, index, attention; a method
that is not one pattern, the per-head mixture "minference", is one phase "call": the public call). Per phase:
wall ms (CUDA events, a synchronize around the phase, median of --repeats passes of all phases in order); GPU
ms and host ms of the phase repeated on the same input (common.gpu_host_ms: where the host time reaches the
GPU time the phase is host-bound); the summed GPU time of its kernels in one profiled pass and the gap to the
wall time; and the kernels that take the most GPU time.

Caveat: on a power-capped GPU a long kernel can read several per cent lower in the profiled pass than in the
timed passes (the vertical-slash attention kernel at 128K on the H100: 38.3-38.9 against ~41-42 ms), which
inflates the gap of a phase that one long kernel dominates; the host ms column measures host time directly.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH.parent), str(BENCH)]  # sparse_attn from the repository, common from bench/

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from common import (  # noqa: E402
    gpu_host_ms, kernel_ms, method_call, method_phases, methods_inputs, parse_method_spec, time_phases,
)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[131072])
    p.add_argument("--methods", nargs="+", default=["vertical_slash"], help='specs "name" or "name:key=value,..."')
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--cprofile", action="store_true", help="also each phase's Python time under cProfile")
    p.add_argument("--timeline", action="store_true", help="also each phase's kernels in order, with GPU gaps")
    a = p.parse_args(argv)
    try:
        methods = [parse_method_spec(text) for text in a.methods]
    except ValueError as e:
        p.error(f"--methods: {e}")
    for s in a.seqlens:
        q, k, v = methods_inputs(s)
        for label, name, kwargs in methods:
            phases = method_phases(name, kwargs, q, k, v) or [("call", method_call(name, kwargs, q, k, v))]
            walls = time_phases(phases, warmup=1, repeats=a.repeats)[0]  # its last result is not kept alive
            rows, kernels, result = [], {}, None
            for ph, fn in phases:
                prev = result
                gpu, host = gpu_host_ms(lambda: fn(prev), a.repeats)
                kernels[ph] = kernel_ms(lambda: fn(prev))
                result = fn(prev)
                rows.append((ph, gpu, host))
            print(f"\n## {label}, S={s}")
            print("| phase | wall ms (median) | GPU ms (repeated) | host ms | GPU kernels ms | launches | gap ms |")
            print("|---|---|---|---|---|---|---|")
            for ph, gpu, host in rows:
                kms = sum(ms for ms, _ in kernels[ph].values())
                n = sum(c for _, c in kernels[ph].values())
                print(f"| {ph} | {walls[ph]:.3f} | {gpu:.3f} | {host:.3f} | {kms:.3f} | {n} | {walls[ph] - kms:.3f} |")
            for ph, _, _ in rows:
                print(f"\n{ph}: top kernels")
                for kname, (ms, n) in sorted(kernels[ph].items(), key=lambda kv: -kv[1][0])[: a.top]:
                    print(f"  {ms:9.3f} ms  x{n:<4d} {kname[:70]}")
            del result
            if a.timeline:
                timeline(phases)
            if a.cprofile:
                python_profile(phases, a.top)


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
