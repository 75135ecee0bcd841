"""Probe: the vertical-slash estimator's id selection, torch (forcing, top-k and sort per kind) against the
fused Triton top-k, on the methods benchmark's real scores: GPU and host ms per call (median of --repeats,
common.gpu_host_ms), and whether both chose the same ids.

    python bench/probes/probe_topk.py --seqlens 131072 1048576
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH.parent), str(BENCH)]  # sparse_attn from the repository, common from bench/

import torch  # noqa: E402

from common import SLASH_SIZE, VERTICAL_SIZE, gpu_host_ms, methods_inputs  # noqa: E402
from sparse_attn.estimators.vertical_slash import estimate as vs  # noqa: E402
from sparse_attn.estimators.vertical_slash.topk_triton import topk_ids_sorted  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[131072])
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    print("| S | path | GPU ms | host ms | same ids |\n|---|---|---|---|---|")
    for s in a.seqlens:
        q, k, _ = methods_inputs(s)
        scores = vs.vertical_slash_scores(q, k, last_q=64, scale=q.shape[-1] ** -0.5, causal=True)
        del q, k
        h = scores[0].shape[1]
        sizes = (torch.full((h,), VERTICAL_SIZE), torch.full((h,), SLASH_SIZE))
        ceiling = 64.0

        def torch_path():
            out = []
            for sc, n_forced, size in zip(scores, (vs.FORCED_COLUMNS, vs.FORCED_SLASHES), sizes):
                sc = sc.clone()  # _forced writes in place; the estimator owns its scores, the probe does not
                vs._forced(sc, n_forced, ceiling)
                out.append(vs._topk_padded(sc, size))
            return out

        def fused_path():
            return topk_ids_sorted(scores, sizes, (vs.FORCED_COLUMNS, vs.FORCED_SLASHES), ceiling)

        clone_g, clone_h = gpu_host_ms(lambda: [sc.clone() for sc in scores], a.repeats)
        same = all(torch.equal(x, y) for x, y in zip(torch_path(), fused_path()))
        for name, fn in (("torch (incl. 2 clones)", torch_path), ("fused", fused_path)):
            g, hst = gpu_host_ms(fn, a.repeats)
            print(f"| {s} | {name} | {g:.3f} | {hst:.3f} | {same} |", flush=True)
        print(f"| {s} | (the 2 clones alone) | {clone_g:.3f} | {clone_h:.3f} | |", flush=True)
        del scores


if __name__ == "__main__":
    main()
