"""Probe: vertical-slash attention with two query heads per program (a shared index per head pair) and
K/V tiles through TMA, against the per-head kernel, on the methods benchmark's inputs. Scratch
measurement for bench/NOTES_vertical_slash.md, not a benchmark of record.

    python bench/probe_vs_pairs.py [--seqlen 131072] [--out DIR]

Layouts: "per-head" (share_heads=1, MInference) and "pairs" (share_heads=2: one index per pair of query
heads of a GQA group, chosen from the pair's summed scores, same budgets). Each variant is the attention
call alone (plan + kernel), median of 5 after a warm-up, CUDA events.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from bench_methods import make_inputs, parse_args as methods_args  # noqa: E402
from common import event_ms  # noqa: E402
from sparse_attn import dispatch  # noqa: E402
from sparse_attn.ops.reference import AttentionInputs  # noqa: E402
from sparse_attn.ops.vertical_slash import kernel as vs  # noqa: E402


def median_ms(fn, repeats=5):
    fn()
    return statistics.median(event_ms(fn) for _ in range(repeats))


def diff_from_first(call, out, first, seqlen):
    """Run call once more and compare out with first, the first variant's output (kept from this call when
    None): (first, largest |out - first|, head by head). Above 256K it returns nan: a second output would
    not fit next to the 1M layout."""
    if seqlen > 262144:
        return first, float("nan")
    call()
    torch.cuda.synchronize()
    if first is None:
        first = out.clone()
    return first, max((out[:, h].float() - first[:, h].float()).abs().max().item() for h in range(out.shape[1]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seqlen", type=int, default=131072)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    args = methods_args([])
    s = a.seqlen
    q, k, v = make_inputs(args, s, torch.bfloat16)
    configs = [{"pattern": "vertical_slash", "vertical_size": 1000, "slash_size": 6096}] * q.shape[1]
    common = dict(causal=True, scale=None, block_size=64, last_q=64)
    layouts = {}
    for name, share in (("per-head", 1), ("pairs", 2)):
        est = dispatch.estimate_pattern("vertical_slash", q, k, configs, share_heads=share, **common)
        layouts[name] = dispatch.build_pattern("vertical_slash", est, q, k, configs, block_size=64)
        print(f"{name}: density {float(layouts[name].head_density(True).mean()):.4f}", flush=True)
    shapes = AttentionInputs(q, k, v)
    out = torch.empty_like(q)
    base = vs.launch_config(64, False, 1)
    pair = vs.launch_config(64, False, 2)
    variants = [
        ("per-head hp1 ptr (before)", "per-head", 1, False, base),
        ("per-head hp1 tma", "per-head", 1, True, base),
        ("pairs hp1 tma", "pairs", 1, True, base),
        ("pairs hp2 tma (default)", "pairs", 2, True, pair),
        ("pairs hp2 ptr", "pairs", 2, False, pair),
        ("pairs hp2 tma no maxnreg", "pairs", 2, True, dict(pair, maxnreg=0)),
        ("pairs hp2 tma 3 stages", "pairs", 2, True, dict(pair, num_stages=3, maxnreg=0)),
        ("pairs hp2 tma 4 warps", "pairs", 2, True, dict(pair, num_warps=4, maxnreg=0)),
        ("pairs hp2 tma BN32 3 stages", "pairs", 2, True, dict(pair, BN=32, num_stages=3)),
        ("pairs hp2 tma BN32 4 stages", "pairs", 2, True, dict(pair, BN=32, num_stages=4)),
        ("pairs hp2 tma BN128 no maxnreg", "pairs", 2, True, dict(pair, BN=128, maxnreg=0)),
    ]
    rows = []
    print(f"{'variant':>28} {'ms':>8} {'max |diff| vs first of its layout':>34}", flush=True)
    firsts = {}
    for label, lay, hp, tma, cfg in variants:
        layout = layouts[lay]

        def call():
            vs.forward(q, k, v, layout, out, None, shapes, causal=True, scale=None, config=cfg, heads=hp, tma=tma)

        try:
            ms = median_ms(call)
            call()
            torch.cuda.synchronize()
            if lay not in firsts:
                firsts[lay] = out.clone()
            diff = (out.float() - firsts[lay].float()).abs().max().item()
        except Exception as e:  # noqa: BLE001
            print(f"{label:>28} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        rows.append({"variant": label, "ms": ms, "diff": diff})
        print(f"{label:>28} {ms:8.2f} {diff:34.2e}", flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"probe_vs_pairs_{s}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
