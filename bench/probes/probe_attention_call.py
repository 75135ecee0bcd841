"""Probe: what the vertical-slash attention call's time is made of, on the methods benchmark's per-head layout,
per backend (the Triton kernel, the Gluon kernels, or "auto": what `sparse_attention` runs): the whole call
(plan + kernel, a synchronize before each, as bench_methods.py times it), the plan alone, the call with the
plan cached (kernel + its host launch), and the kernel launched back to back (host time hidden); and each
backend's largest output difference from the first backend's (up to 256K; above, a second output would not
fit beside the 1M layout).

    python bench/probes/probe_attention_call.py --seqlens 131072 --backends triton gluon
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH.parent), str(BENCH)]  # sparse_attn from the repository, common from bench/

import torch  # noqa: E402

from common import gpu_host_ms, methods_inputs, vs_layout  # noqa: E402
from sparse_attn.ops.reference import AttentionInputs  # noqa: E402
from sparse_attn.ops.vertical_slash import hopper  # noqa: E402
from sparse_attn.ops.vertical_slash import kernel as vs  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[131072])
    p.add_argument("--backends", nargs="+", default=["auto"], choices=["auto", "triton", "gluon"])
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}")
    for s in a.seqlens:
        q, k, v = methods_inputs(s)
        layout = vs_layout(q, k)
        shapes = AttentionInputs(q, k, v)
        group = q.shape[1] // k.shape[1]
        out = torch.empty_like(q)
        density = float(layout.head_density(True).mean())
        flop = 4 * q.shape[-1] * density * q.shape[1] * s * (s + 1) / 2

        def plan():  # what forward plans for per-head 64-row blocks on either backend (BN 64, range order)
            return vs._plan(layout, (layout.range_counts,) * 2, (s, s), q.shape[1], hopper.BN, True, False,
                            split=False, group=group)

        cached = plan()
        real_plan = vs._plan
        first = None
        print(f"\nS={s}, density {density:.4f}: attention call on the per-head layout "
              f"(GPU ms per call; host ms until the last call of a batch returned)")
        print("| backend | what | GPU ms | host ms | eff. TFLOP/s |")
        print("|---|---|---|---|---|")
        for backend in a.backends:
            def call():
                vs.forward(q, k, v, layout, out, None, shapes, causal=True, scale=None, backend=backend)

            rows = [("whole call (plan + kernel)", *gpu_host_ms(call, a.repeats))]
            diff = float("nan")
            if s <= 262144:
                call()
                if first is None:
                    first = out.clone()
                diff = (out.float() - first.float()).abs().max().item()
            vs._plan = lambda *x, **y: cached
            try:
                rows.append(("call, plan cached", *gpu_host_ms(call, a.repeats)))
                rows.append(("call, plan cached, 5 back to back", *gpu_host_ms(call, a.repeats, batch=5)))
            finally:
                vs._plan = real_plan
            rows.append(("plan alone", *gpu_host_ms(plan, a.repeats)))
            rows.append(("whole call again", *gpu_host_ms(call, a.repeats)))
            for label, g, h in rows:
                eff = f"{flop / g / 1e9:.0f}" if "call" in label else ""
                print(f"| {backend} | {label} | {g:.3f} | {h:.3f} | {eff} |", flush=True)
            print(f"| {backend} | max abs diff from {a.backends[0]} | {diff:.2e} | | |", flush=True)
        del q, k, v, layout, out, cached, first
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
