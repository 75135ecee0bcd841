"""Probe: where a decode step's GPU time goes, and the paged kernel's tile config (CUDA graphs, L2 flushed).

    python bench/probes/decode_parts.py

Per (context, batch): SDPA flash decode, paged dense under config variants (keys per step, warps, stages,
programs per SM: module constants of sparse_attn.ops.paged_decode, patched here), and Quest's parts at a
1K / 4K budgets: the scores kernel, top-k, the whole select, attention.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_decode  # noqa: E402
from common import bench_graph_ms  # noqa: E402
from sparse_attn.estimators import quest  # noqa: E402
from sparse_attn.kvcache import PageSummaries  # noqa: E402
from sparse_attn.ops import paged_decode as pd  # noqa: E402

VARIANTS = [  # block_n, warps, stages, programs per SM
    (64, 4, 2, 8), (64, 4, 2, 4), (64, 4, 3, 8), (128, 4, 2, 8), (128, 8, 2, 8), (128, 8, 3, 8),
    (64, 4, 2, 16), (32, 4, 3, 16),
]


def main():
    args = bench_decode.parse_args([])
    gen = torch.Generator(device="cuda").manual_seed(0)
    for s, b in ((32768, 1), (131072, 1), (131072, 8), (32768, 32)):
        k, v, cache = bench_decode.make_cache(b, s, args, torch.bfloat16, gen)
        q = torch.randn(b, 32, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        kv_bytes = 2 * b * 8 * s * 128 * 2
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            t = bench_graph_ms(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True))
        print(f"S={s} B={b} sdpa_flash {1e3 * t:.1f} us  {kv_bytes / t / 1e6:.0f} GB/s", flush=True)
        keep = (pd._BLOCK_N, pd._WARPS, pd._STAGES, pd._PROGRAMS_PER_SM)
        for bn, w, st, per_sm in VARIANTS:
            pd._BLOCK_N, pd._WARPS, pd._STAGES, pd._PROGRAMS_PER_SM = bn, w, st, per_sm
            try:
                t2 = bench_graph_ms(lambda: pd.paged_decode_attention(q, cache))
                print(f"  paged_dense bn={bn} w={w} st={st} per_sm={per_sm}: {1e3 * t2:.1f} us "
                      f"{kv_bytes / t2 / 1e6:.0f} GB/s  x{t / t2:.2f}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"  variant {bn, w, st, per_sm} failed: {type(e).__name__}: {str(e)[:120]}")
        pd._BLOCK_N, pd._WARPS, pd._STAGES, pd._PROGRAMS_PER_SM = keep
        summ = PageSummaries.build(cache)
        for budget in (1024, 4096):
            parts = {
                "scores": lambda: quest.quest_scores(q, cache, summ),
                "select": lambda: quest.quest_select(q, cache, summ, budget=budget, sink=64, window=64),
            }
            scores = quest.quest_scores(q, cache, summ)
            parts["topk"] = lambda: torch.topk(scores, budget // 32, dim=-1)
            sel = quest.quest_select(q, cache, summ, budget=budget, sink=64, window=64)
            parts["attention"] = lambda: pd.paged_decode_attention(q, cache, sel)
            parts["step"] = lambda: pd.paged_decode_attention(
                q, cache, quest.quest_select(q, cache, summ, budget=budget, sink=64, window=64))
            line = "  ".join(f"{n} {1e3 * bench_graph_ms(f):.1f}" for n, f in parts.items())
            print(f"  quest {budget}: {line} us", flush=True)
        del k, v, cache, summ
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
