"""Probe: the Gluon Hopper vertical-slash kernel (ops/vertical_slash/hopper.py) against the Triton kernel,
attention call alone (plan + kernel), on the methods benchmark's per-head layout. Scratch measurement for
bench/NOTES_vertical_slash.md, not a benchmark of record.

    python bench/probe_vs_hopper.py [--seqlens 131072] [--ablations] [--once] [--out DIR]

Variants: the Triton kernel, the warp-specialised Gluon kernel (a TMA loader partition), and the Gluon
kernel whose compute warpgroup gathers every tile through cp.async. --ablations adds the cp.async Gluon kernel with its loop's K/V loads and/or its softmax switched
off (wrong outputs, timing only): what each part costs. --once: one call per variant, for running under ncu.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from bench_methods import make_inputs, parse_args as methods_args  # noqa: E402
from probe_vs_pairs import diff_from_first, median_ms  # noqa: E402
from sparse_attn import dispatch  # noqa: E402
from sparse_attn.ops.reference import AttentionInputs  # noqa: E402
from sparse_attn.ops.vertical_slash import hopper, kernel as vs  # noqa: E402


def per_head_layout(args, s: int):
    """(q, k, v, layout): the methods benchmark's inputs at length s and their per-head vertical-slash layout
    (1000 / 6096, 64-row blocks), as bench_methods.py builds it."""
    q, k, v = make_inputs(args, s, torch.bfloat16)
    configs = [{"pattern": "vertical_slash", "vertical_size": 1000, "slash_size": 6096}] * q.shape[1]
    est = dispatch.estimate_pattern("vertical_slash", q, k, configs, share_heads=1, causal=True, scale=None,
                                    block_size=64, last_q=64)
    return q, k, v, dispatch.build_pattern("vertical_slash", est, q, k, configs, block_size=64)


def gluon_plan(layout):
    """The plan the Gluon path makes for a layout of unpacked inputs (BN 64, range order, causal)."""
    return vs._plan(layout, (layout.range_counts,) * 2, (layout.seqlen_q, layout.seqlen_k), layout.num_heads,
                    hopper.BN, True, False, split=False)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqlens", type=int, nargs="+", default=[131072])
    p.add_argument("--out", default=None)
    p.add_argument("--once", action="store_true", help="one call per variant (under a profiler)")
    p.add_argument("--ablations", action="store_true", help="also the kernel with parts switched off")
    p.add_argument("--first", type=int, default=None, help="only the first N variants")
    a = p.parse_args()
    args = methods_args([])
    rows = []
    for s in a.seqlens:
        q, k, v, layout = per_head_layout(args, s)
        density = float(layout.head_density(True).mean())
        flop = 4 * q.shape[-1] * density * q.shape[1] * s * (s + 1) / 2
        shapes = AttentionInputs(q, k, v)
        out = torch.empty_like(q)
        ref = None
        variants = [("triton (tma)", dict(backend="triton")), ("gluon ws (tma)", dict(backend="gluon")),
                    ("gluon cp.async", dict(backend="gluon", loads="cp.async"))][:a.first]
        if a.ablations:
            variants += [("gluon no loop loads", dict(backend="gluon", ablate=1)),
                         ("gluon no softmax", dict(backend="gluon", ablate=2)),
                         ("gluon neither", dict(backend="gluon", ablate=3))]
        print(f"S={s} density {density:.4f}", flush=True)
        for label, kw in variants:
            kw = dict(kw)
            extra = {"ablate": kw.pop("ablate", 0), "loads": kw.pop("loads", "tma")}
            real_forward = hopper.forward
            hopper.forward = lambda *x, **y: real_forward(*x, **extra, **y)

            def call():
                vs.forward(q, k, v, layout, out, None, shapes, causal=True, scale=None, **kw)

            try:
                if a.once:
                    call()
                    torch.cuda.synchronize()
                    hopper.forward = real_forward
                    continue
                ms = median_ms(call)
                ref, diff = diff_from_first(call, out, ref, s)
            except Exception as e:  # noqa: BLE001
                print(f"{label:>18} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            finally:
                hopper.forward = real_forward
            rows.append({"seqlen": s, "variant": label, "ms": ms, "tflops_eff": flop / ms / 1e9, "diff": diff})
            print(f"{label:>18} {ms:9.2f} ms {flop / ms / 1e9:7.1f} TFLOP/s eff  max|diff| vs triton {diff:.2e}",
                  flush=True)
        del q, k, v, layout, out, ref
        torch.cuda.empty_cache()
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "probe_vs_hopper.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
