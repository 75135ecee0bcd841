"""Probe: the SM clock and power while the vertical-slash attention kernel (on a plan made once) and cuDNN
dense causal run back to back for a few seconds, sampled by nvidia-smi every 50 ms; and the kernel's event
time with and without torch.profiler active.

    python bench/probes/probe_clocks.py --seqlen 131072 --seconds 3
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH.parent), str(BENCH)]  # sparse_attn from the repository, common from bench/

import torch  # noqa: E402

from common import gpu_host_ms, methods_inputs, repeat_kv, sdpa_dense_causal, vs_layout  # noqa: E402
from sparse_attn.ops.reference import AttentionInputs  # noqa: E402
from sparse_attn.ops.vertical_slash import kernel as vs  # noqa: E402

FIELDS = "clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.sw_power_cap,clocks_event_reasons.hw_slowdown"


def sampled(fn, seconds: float):
    """Run fn back to back for `seconds` while nvidia-smi samples; returns (calls, per-call ms, samples)."""
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits", "-lms", "50"],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
        if n % 4 == 0:
            torch.cuda.synchronize()
    b.record()
    torch.cuda.synchronize()
    smi.terminate()
    out = smi.communicate()[0]
    rows = [line.split(", ") for line in out.strip().splitlines() if line.count(",") == 4]
    return n, a.elapsed_time(b) / n, rows


def summary(rows):
    clk = [float(r[0]) for r in rows]
    pwr = [float(r[1]) for r in rows if r[1].replace(".", "").isdigit()]
    cap = sum(r[3].strip() == "Active" for r in rows)
    return (f"SM clock median {statistics.median(clk):.0f} MHz (min {min(clk):.0f}, max {max(clk):.0f}), power median "
            f"{statistics.median(pwr):.0f} W (max {max(pwr):.0f}), sw power cap active in {cap}/{len(rows)} samples, "
            f"temp {rows[-1][2]} C")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=131072)
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args()
    s = a.seqlen
    q, k, v = methods_inputs(s)
    layout = vs_layout(q, k)
    shapes = AttentionInputs(q, k, v)
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    plan = vs.make_plan(q, k, v, layout, shapes, causal=True)  # what the call plans (backend "auto")

    def kernel():
        vs.forward(q, k, v, layout, out, None, shapes, causal=True, scale=None, plan=plan)

    dense, label = sdpa_dense_causal(q, repeat_kv(k, group), repeat_kv(v, group), "cudnn"), "cuDNN causal"
    print(f"S={s}, {plan.backend} kernel")
    for name, fn in (("vertical-slash kernel", kernel), (f"dense {label}", dense), ("vertical-slash kernel", kernel)):
        n, ms, rows = sampled(fn, a.seconds)
        print(f"{name}: {n} calls, {ms:.2f} ms per call; {summary(rows)}", flush=True)
    from torch.profiler import ProfilerActivity, profile

    plain = gpu_host_ms(kernel, 5)[0]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        under = gpu_host_ms(kernel, 5)[0]
    kernel_name = "_vs_hopper" if plan.backend == "gluon" else "_vs_attn_kernel"
    cupti = [e.device_time / 1e3 for e in prof.events() if e.name.startswith(kernel_name)]
    own = f"{statistics.median(cupti):.2f}" if cupti else "not found"
    print(f"kernel event ms: plain {plain:.2f}, under torch.profiler {under:.2f} (CUPTI's own: {own})")


if __name__ == "__main__":
    main()
