"""Probe: the vertical-slash estimator kernel by kernel (max / sum pass, scores pass, fused top-k), under
launch variants of the scoring kernels, on the methods benchmark's inputs.

    python bench/probes/probe_estimator.py --seqlens 131072 1048576

Per length and variant: the median GPU time of each kernel (torch.profiler, --repeats profiled calls), the
estimate's wall time (CUDA events around the whole `estimate_vertical_slash`, median of --repeats), and the
largest difference of the variant's scores from the first variant's (launch choices must not change them
beyond float summation order).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH.parent), str(BENCH)]  # sparse_attn from the repository, common from bench/

import torch  # noqa: E402

from common import SLASH_SIZE, VERTICAL_SIZE, kernel_ms, median_event_ms, methods_inputs  # noqa: E402
from sparse_attn.estimators.vertical_slash import scores_triton as vst  # noqa: E402
from sparse_attn.estimators.vertical_slash import estimate_vertical_slash, vertical_slash_scores  # noqa: E402

# name -> module constants of estimators/vertical_slash/scores_triton.py to set (the rest keep their defaults)
VARIANTS = {
    "default": {},
    "lse64w4": {"_LSE_ROWS": 64, "_LSE_WARPS": 4},  # the default before the max / sum pass stacked 4 heads
    "lse128": {"_LSE_ROWS": 128, "_LSE_WARPS": 4},
    "lse256w4": {"_LSE_ROWS": 256, "_LSE_WARPS": 4},
    "lse256w8_bn128": {"_LSE_ROWS": 256, "_LSE_WARPS": 8, "_LSE_BN": 128},
    "scores128w8": {"_SCORES_ROWS": 128, "_SCORES_WARPS": 8},
    "scores_w8": {"_SCORES_WARPS": 8},
    "scores_pps4": {"_PROGRAMS_PER_SM": 4},
    "scores_pps16": {"_PROGRAMS_PER_SM": 16},
    "scores_bn128w8": {"_SCORES_BN": 128, "_SCORES_WARPS": 8},
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[131072])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    defaults = {name: getattr(vst, name) for v in VARIANTS.values() for name in v}
    print(f"GPU: {torch.cuda.get_device_name()}")
    print("| S | variant | lse ms | scores ms | top-k ms | other kernels ms | estimate wall ms | max |diff| |")
    print("|---|---|---|---|---|---|---|---|")
    for s in a.seqlens:
        q, k, _ = methods_inputs(s)
        scale = q.shape[-1] ** -0.5
        ref = None
        for variant in a.variants:
            for name, value in defaults.items():
                setattr(vst, name, value)
            for name, value in VARIANTS[variant].items():
                setattr(vst, name, value)
            scores = vertical_slash_scores(q, k, last_q=64, scale=scale, causal=True)
            if ref is None:
                ref, diff = scores, 0.0
            else:
                diff = max((x - y).abs().max().item() for x, y in zip(scores, ref))
            del scores

            def est():
                return estimate_vertical_slash(q, k, vertical_size=VERTICAL_SIZE, slash_size=SLASH_SIZE, last_q=64)

            est()
            times = {name: ms for name, (ms, _) in kernel_ms(est, a.repeats).items()}
            w = median_event_ms(est, a.repeats, warmup=0)
            lse = sum(ms for n, ms in times.items() if "_lse_kernel" in n)
            sc = sum(ms for n, ms in times.items() if "_scores_kernel" in n)
            tk = sum(ms for n, ms in times.items() if "_hist_kernel" in n or "_write_kernel" in n)
            other = sum(times.values()) - lse - sc - tk
            print(f"| {s} | {variant} | {lse:.3f} | {sc:.3f} | {tk:.3f} | {other:.3f} | {w:.3f} | {diff:.2e} |",
                  flush=True)
        for name, value in defaults.items():
            setattr(vst, name, value)
        del q, k, ref


if __name__ == "__main__":
    main()
