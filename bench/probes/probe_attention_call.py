"""Probe: what the vertical-slash attention call's time is made of, on the methods benchmark's per-head layout,
per backend (the Triton kernel, the Gluon kernels, or "auto": what `sparse_attention` runs): the whole call
(plan + kernel, a synchronize before each, as bench_methods.py times it), the plan alone (kernel.make_plan),
the call on a plan made once (kernel + its host launch), and that call launched back to back (host time
hidden); and each backend's largest output difference from the first backend's (up to 256K; above, a second
output would not fit beside the 1M layout).

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
        out = torch.empty_like(q)
        density = float(layout.head_density(True).mean())
        flop = 4 * q.shape[-1] * density * q.shape[1] * s * (s + 1) / 2

        first = None
        print(f"\nS={s}, density {density:.4f}: attention call on the per-head layout "
              f"(GPU ms per call; host ms until the last call of a batch returned)")
        print("| backend | what | GPU ms | host ms | eff. TFLOP/s |")
        print("|---|---|---|---|---|")
        for backend in a.backends:
            def plan(backend=backend):  # what the call plans for this backend (kernel, launch, tile lists)
                return vs.make_plan(q, k, v, layout, shapes, causal=True, backend=backend)

            def call(backend=backend):
                vs.forward(q, k, v, layout, out, None, shapes, causal=True, scale=None, backend=backend)

            cached = plan()

            def call_cached():
                vs.forward(q, k, v, layout, out, None, shapes, causal=True, scale=None, plan=cached)

            rows = [("whole call (plan + kernel)", *gpu_host_ms(call, a.repeats))]
            diff = float("nan")
            if s <= 262144:
                call()
                if first is None:
                    first = out.clone()
                diff = (out.float() - first.float()).abs().max().item()
            rows.append((f"call, plan made once ({cached.backend})", *gpu_host_ms(call_cached, a.repeats)))
            rows.append(("call, plan made once, 5 back to back", *gpu_host_ms(call_cached, a.repeats, batch=5)))
            rows.append(("plan alone", *gpu_host_ms(plan, a.repeats)))
            rows.append(("whole call again", *gpu_host_ms(call, a.repeats)))
            for label, g, h in rows:
                eff = f"{flop / g / 1e9:.0f}" if "call" in label else ""
                print(f"| {backend} | {label} | {g:.3f} | {h:.3f} | {eff} |", flush=True)
            print(f"| {backend} | max abs diff from {a.backends[0]} | {diff:.2e} | | |", flush=True)
            del cached
        del q, k, v, layout, out, first
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
