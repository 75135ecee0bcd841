"""Probe: the vertical-slash attention plan (count kernel, one sync, tile-list kernel; at >= 512K keys the
shared-first group order too) on the methods benchmark's per-head layout, kernel by kernel, under other
launch parameters of the tile-list kernel (ranges x tiles per step, warps); each variant's lists are checked
against the default's.

    python bench/probes/probe_plan.py --seqlens 131072 1048576
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH.parent), str(BENCH)]  # sparse_attn from the repository, common from bench/

import torch  # noqa: E402

from common import gpu_host_ms, kernel_ms, methods_inputs, vs_layout  # noqa: E402
from sparse_attn.ops.vertical_slash import hopper  # noqa: E402
from sparse_attn.ops.vertical_slash import kernel as vs  # noqa: E402

# tile-list kernel launches: (ranges per step, tiles per step, warps); the first row is the library's default
LAUNCHES = [None, (64, 16, 4), (32, 16, 4), (32, 8, 2), (32, 16, 1), (16, 16, 1), (64, 8, 2), (32, 32, 4), (16, 8, 1)]


def plan(layout, group: int):
    """The tile lists kernel.make_plan cuts for the default (Gluon, one head per program) path on unpacked
    causal inputs: (counts, first_tile, t_start, t_end)."""
    return vs._tile_lists(layout, (layout.range_counts,) * 2, (layout.seqlen_q, layout.seqlen_k), layout.num_heads,
                          hopper.BN, True, False, split=False, group=group)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[131072])
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    default = dict(vs._TILES_LAUNCH)
    print(f"GPU: {torch.cuda.get_device_name()}")
    for s in a.seqlens:
        q, k, _ = methods_inputs(s)
        group = q.shape[1] // k.shape[1]
        layout = vs_layout(q, k)
        del q, k
        ref = plan(layout, group)
        print(f"\nS={s}: {ref[2].numel()} list entries; tile-list launch default {default}")
        print("| LANES | TL | warps | whole plan ms (GPU / host) | tiles kernel ms | count kernel ms | "
              "group order ms | equal |")
        print("|---|---|---|---|---|---|---|---|")
        for launch in LAUNCHES:
            vs._TILES_LAUNCH = default if launch is None else dict(LANES=launch[0], TL=launch[1], num_warps=launch[2])
            try:
                out = plan(layout, group)
                same = all(torch.equal(x, y) for x, y in zip(out, ref))
                del out
                gpu, host = gpu_host_ms(lambda: plan(layout, group), a.repeats)
                ks = kernel_ms(lambda: plan(layout, group), a.repeats)
                by = lambda part: sum(ms for n, (ms, _) in ks.items() if part in n)  # noqa: E731
                cfg = vs._TILES_LAUNCH
                print(f"| {cfg['LANES']} | {cfg['TL']} | {cfg['num_warps']} | {gpu:.3f} / {host:.3f} | "
                      f"{by('_tiles_kernel'):.3f} | {by('_count_kernel'):.3f} | {by('_group_order'):.3f} | {same} |",
                      flush=True)
            except Exception as e:  # noqa: BLE001 - a launch that does not compile must not end the sweep
                print(f"| {launch} | failed: {type(e).__name__}: {str(e)[:120]} |", flush=True)
            finally:
                vs._TILES_LAUNCH = default
        del layout, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
