"""Probe: flexprefill's estimate kernel by kernel under launch variants of its fused query-aware selection
(tiles of the selection passes, programs per SM), on the methods benchmark's inputs.

    python bench/probes/probe_flex_select.py --seqlens 131072 --data structured mixed

Per length, input and variant: the median GPU time of the decision and selection kernels (torch.profiler), the
estimate's wall time (CUDA events around `flexprefill_choice`, median of --repeats, the variants alternated
round by round), and whether the variant chose what the default chose (launch choices must not change it).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH.parent), str(BENCH)]  # sparse_attn from the repository, common from bench/

import torch  # noqa: E402

from common import event_ms, kernel_ms, methods_inputs  # noqa: E402
from sparse_attn.estimators.flexprefill import flexprefill_choice  # noqa: E402
from sparse_attn.estimators.flexprefill import probs_triton as pt  # noqa: E402

# name -> module constants of estimators/flexprefill/probs_triton.py to set (the rest keep their defaults)
VARIANTS = {
    "default": {},
    "bt64": {"_BT": 64},
    "bt128": {"_BT": 128},
    "pps2": {"_PROGRAMS_PER_SM": 2},
    "pps8": {"_PROGRAMS_PER_SM": 8},
    "bt64_pps8": {"_BT": 64, "_PROGRAMS_PER_SM": 8},
    "bn128": {"_BN": 128},
}
KERNELS = ("_query_aware_kernel", "_decide_parts_kernel", "_decide_kernel", "_pool_kernel", "_scores_kernel",
           "_lse_kernel", "_vs_select_kernel", "_vs_write_kernel")


def _apply(values):
    for name, value in values.items():
        setattr(pt, name, value)


def _same(a, b) -> bool:
    """The same choice: flags, columns, diagonals, and each row's ranges up to its count (slots past it are
    never written)."""
    def ranges(c):
        written = torch.arange(c.range_starts.shape[-1], device=c.range_starts.device) < c.range_counts[..., None]
        return c.range_starts[written], c.range_ends[written]

    plain = ("query_aware", "range_counts", "columns", "slashes")
    return (all(torch.equal(getattr(a, f), getattr(b, f)) for f in plain)
            and all(torch.equal(x, y) for x, y in zip(ranges(a), ranges(b))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[131072])
    p.add_argument("--data", nargs="+", default=["structured"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    defaults = {name: getattr(pt, name) for v in VARIANTS.values() for name in v}
    for s in a.seqlens:
        for data in a.data:
            q, k, _ = methods_inputs(s, data=data)

            def call():
                return flexprefill_choice(q, k, 0.9, 0.1, block_size=64)

            ref = call()
            walls = {v: [] for v in a.variants}
            same, kernels = {}, {}
            for v in a.variants:  # compile, check, profile
                _apply({**defaults, **VARIANTS[v]})
                same[v] = _same(call(), ref)
                kernels[v] = kernel_ms(call, repeats=3)
            for _ in range(a.repeats):  # alternated rounds
                for v in a.variants:
                    _apply({**defaults, **VARIANTS[v]})
                    walls[v].append(event_ms(call))
            _apply(defaults)
            print(f"\n## S={s}, {data}, {torch.cuda.get_device_name()}")
            print("| variant | same choice | estimate ms | " + " | ".join(KERNELS) + " |")
            print("|---|---|---|" + "---|" * len(KERNELS))
            for v in a.variants:
                ks = " | ".join(f"{kernels[v].get(name, (0.0, 0))[0]:.3f}" for name in KERNELS)
                print(f"| {v} | {same[v]} | {statistics.median(walls[v]):.3f} | {ks} |", flush=True)
            del q, k, ref
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
