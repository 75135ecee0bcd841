"""Probe: vertical-slash kernel variants, A/B in one process on the methods benchmark's inputs. Scratch
measurement for bench/NOTES_vertical_slash.md, not a benchmark of record.

    python bench/probe_vs_softmax.py [--seqlen 131072] [--layouts per-head pairs quads] [--out DIR]

Layouts: "per-head" (MInference's, one index per head), "pairs" (share_heads=2, two heads' rows per
program) and "quads" (share_heads=4: a GQA group of 4 heads, 256 rows per program). Variants are launch
configs of kernel.forward ("wide_unmasked": the BN-wide tiles every row sees run without a mask). Each is
the attention call alone (plan + kernel), median of 5 after a warm-up, CUDA events; the last column is
the largest difference from the first variant of its layout (they change rounding only).
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
from sparse_attn.ops.reference import AttentionInputs, reference_attention  # noqa: E402
from sparse_attn.ops.vertical_slash import kernel as vs  # noqa: E402

LAYOUTS = {"per-head": (1, 1), "pairs": (2, 2), "quads": (4, 4)}  # share_heads, heads per program
VARIANTS = {
    "per-head": [("default", {}), ("wide unmasked", {"wide_unmasked": True})],
    "pairs": [("default", {}), ("wide masked", {"wide_unmasked": False})],
    "quads": [("16 warps 2 stages", {"num_warps": 16}), ("16 warps 3 stages", {"num_warps": 16, "num_stages": 3}),
              ("16 warps 2 st, masked", {"num_warps": 16, "wide_unmasked": False})],
}


def layout_for(name, q, k, configs):
    est = dispatch.estimate_pattern("vertical_slash", q, k, configs, share_heads=LAYOUTS[name][0], causal=True,
                                    scale=None, block_size=64, last_q=64)
    return dispatch.build_pattern("vertical_slash", est, q, k, configs, block_size=64)


def check(names, s=4096):
    """Every variant against the fp32 reference with its layout, at a short length."""
    q, k, v = make_inputs(methods_args([]), s, torch.bfloat16)
    configs = [{"pattern": "vertical_slash", "vertical_size": 200, "slash_size": 600}] * q.shape[1]
    shapes = AttentionInputs(q, k, v)
    out = torch.empty_like(q)
    for name in names:
        layout = layout_for(name, q, k, configs)
        ref = reference_attention(q, k, v, layout, causal=True)
        for label, extra in VARIANTS[name]:
            out.fill_(float("nan"))
            cfg = dict(vs.launch_config(64, False, LAYOUTS[name][1]), **extra)
            vs.forward(q, k, v, layout, out, None, shapes, causal=True, scale=None, config=cfg, heads=LAYOUTS[name][1])
            err = (out.float() - ref.float()).abs().max().item()
            print(f"check S={s} {name:>9} {label:>22}: max |out - fp32 reference| {err:.2e}", flush=True)
            assert err < 0.05, (name, label, err)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqlen", type=int, default=131072)
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--first", type=int, default=None, help="only the first N variants of each layout")
    p.add_argument("--no-check", action="store_true", help="skip the 4K check against the reference")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if not a.no_check:
        check(a.layouts)
    s = a.seqlen
    q, k, v = make_inputs(methods_args([]), s, torch.bfloat16)
    configs = [{"pattern": "vertical_slash", "vertical_size": 1000, "slash_size": 6096}] * q.shape[1]
    shapes = AttentionInputs(q, k, v)
    out = torch.empty_like(q)
    rows = []
    print(f"S={s}  {'layout':>9} {'variant':>22} {'ms':>8} {'max |diff|':>11}", flush=True)
    for name in a.layouts:
        hp = LAYOUTS[name][1]
        layout = layout_for(name, q, k, configs)
        first = None
        for label, extra in VARIANTS[name][:a.first]:
            cfg = dict(vs.launch_config(64, False, hp), **extra)

            def call():
                vs.forward(q, k, v, layout, out, None, shapes, causal=True, scale=None, config=cfg, heads=hp)

            ms = median_ms(call)
            first, diff = diff_from_first(call, out, first, s)
            rows.append({"seqlen": s, "layout": name, "variant": label, "config": cfg, "ms": ms, "diff": diff})
            print(f"S={s}  {name:>9} {label:>22} {ms:8.2f} {diff:11.2e}", flush=True)
        del layout, first
        torch.cuda.empty_cache()
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"probe_vs_softmax_{s}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
