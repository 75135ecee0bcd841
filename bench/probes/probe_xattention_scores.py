"""XAttention's block scoring on the GPU: the fused Triton kernel against the chunked torch path (its
reference), alternated, on the methods benchmark's structured inputs; GPU ms per call and the largest score
difference. Needs CUDA.

    python bench/probes/probe_xattention_scores.py --seqlens 32768 131072 --strides 8 16
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import torch  # noqa: E402

from common import median_event_ms, methods_inputs  # noqa: E402
from sparse_attn.estimators.xattention import antidiagonal_block_scores  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--strides", type=int, nargs="+", default=[8, 16])
    a = p.parse_args(argv)
    print(f"{'seqlen':>8} {'stride':>6} {'triton ms':>10} {'torch ms':>9} {'max |diff|':>10}")
    for s in a.seqlens:
        q, k, _ = methods_inputs(s)
        for stride in a.strides:
            runs = {b: (lambda b=b: antidiagonal_block_scores(q, k, block_size=64, stride=stride, backend=b))
                    for b in ("triton", "torch")}
            diff = (runs["triton"]() - runs["torch"]()).abs().max().item()
            ms = {b: [] for b in runs}
            for _ in range(3):  # alternated: both see the same power state
                for b, fn in runs.items():
                    ms[b].append(median_event_ms(fn, repeats=1, warmup=0))
            print(f"{s:>8} {stride:>6} {min(ms['triton']):>10.2f} {min(ms['torch']):>9.2f} {diff:>10.2e}", flush=True)
        del q, k
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
