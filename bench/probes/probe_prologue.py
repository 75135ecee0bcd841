"""Probe: how much of one `sparse_attention` call is host time before its first GPU kernel (the prologue),
which nothing hides.

    python bench/probes/probe_prologue.py --seqlen 131072

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

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH.parent), str(BENCH)]  # sparse_attn from the repository, common from bench/

import torch  # noqa: E402

from common import event_ms, method_call, methods_inputs  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=131072)
    p.add_argument("--pairs", type=int, default=7)
    a = p.parse_args(argv)
    q, k, v = methods_inputs(a.seqlen)
    one_call = method_call("vertical_slash", {}, q, k, v)  # the registry's defaults: the benchmark's budgets

    def call():
        return one_call(None)

    for _ in range(3):
        call()
    plain, hidden = [], []
    for _ in range(a.pairs):
        plain.append(event_ms(call))
        hidden.append(event_ms(call, spin_cycles=40_000_000))  # ~20 ms of GPU spin queued ahead of the call
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
