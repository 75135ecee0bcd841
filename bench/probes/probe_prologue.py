"""Probe: how much of one `sparse_attention` call is host time before its first GPU kernel (the prologue),
which nothing hides. Scratch measurement for bench/NOTES_vertical_slash.md.

    python bench/probe_prologue.py --seqlen 131072

Times the per-head vertical-slash call (the methods benchmark's inputs and budgets) two ways, alternated:
plain (CUDA events around the call, after a synchronize), and behind a GPU spin of ~20 ms queued first, so
that the host runs ahead through the prologue while the GPU is still busy: the difference is the prologue's
exposed host time. Then one call under cProfile (host functions by own time; synchronizing calls show the
GPU time they wait for).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from bench_methods import make_inputs, parse_args as methods_args  # noqa: E402
from sparse_attn import sparse_attention  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=131072)
    p.add_argument("--pairs", type=int, default=7)
    a = p.parse_args(argv)
    args = methods_args([])
    q, k, v = make_inputs(args, a.seqlen, torch.bfloat16)

    def call():
        return sparse_attention(q, k, v, method="vertical_slash", vertical_size=1000, slash_size=6096, last_q=64,
                                block_size=64, min_seqlen=0)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    plain, hidden = [], []
    for _ in range(a.pairs):
        torch.cuda.synchronize()
        e0.record()
        call()
        e1.record()
        torch.cuda.synchronize()
        plain.append(e0.elapsed_time(e1))
        torch.cuda.synchronize()
        torch.cuda._sleep(40_000_000)  # ~20 ms of GPU spin, queued ahead of the call
        e0.record()
        call()
        e1.record()
        torch.cuda.synchronize()
        hidden.append(e0.elapsed_time(e1))
    mp, mh = statistics.median(plain), statistics.median(hidden)
    print(f"S={a.seqlen}: call {mp:.2f} ms plain, {mh:.2f} ms with the prologue hidden behind a GPU spin: "
          f"prologue ~{mp - mh:.2f} ms")
    print("plain:", " ".join(f"{t:.2f}" for t in plain))
    print("hidden:", " ".join(f"{t:.2f}" for t in hidden))
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    call()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    print(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
