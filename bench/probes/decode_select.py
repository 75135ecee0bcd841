"""Probe: Quest's decode selection and the attention over it, part by part, under launch variants (CUDA
graphs, L2 flushed before each replay).

    python bench/probes/decode_select.py [--points 131072:8 131072:1 32768:8] [--budget 4096]

Per (context, batch), 32 query / 8 kv heads, D=128, bf16, page 32 (Quest's decode page), shuffled pages:
SDPA flash dense decode; the scores kernel under (pages per program, kv heads per program, warps) variants
(module constants of sparse_attn.estimators.quest, patched here) with the GB/s on the summaries it reads;
torch.topk against the page top-k kernel (sparse_attn.estimators._pages) under block / warp variants; the
attention over the selected pages under minimum keys per split (sparse_attn.ops.paged_decode); the whole
step with the defaults, and its speed-up over SDPA; page_mean's scores, selection and step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_decode  # noqa: E402
from common import bench_graph_ms  # noqa: E402
from sparse_attn.estimators import _pages, page_mean, quest  # noqa: E402
from sparse_attn.kvcache import PageSummaries  # noqa: E402
from sparse_attn.ops import paged_decode as pd  # noqa: E402

SCORE_VARIANTS = [(64, 1, 4), (128, 1, 4), (32, 1, 4), (64, 1, 8), (32, 2, 4), (32, 8, 4), (16, 8, 4), (64, 2, 8),
                  (16, 8, 8)]
TOPK_VARIANTS = [(4096, 8), (4096, 16), (8192, 16), (2048, 8), (1024, 4)]
SPLIT_KEYS = [512, 256, 128, 1024]


def patched(mod, **values):
    keep = {k: getattr(mod, k) for k in values}

    class Ctx:
        def __enter__(self):
            for k, v in values.items():
                setattr(mod, k, v)

        def __exit__(self, *exc):
            for k, v in keep.items():
                setattr(mod, k, v)
    return Ctx()


def us(fn) -> float:
    try:
        return 1e3 * bench_graph_ms(fn)
    except Exception as e:  # noqa: BLE001
        print(f"    failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
        return float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", nargs="+", default=["131072:8", "131072:1", "32768:8"])
    p.add_argument("--budget", type=int, default=4096)
    a = p.parse_args()
    args = bench_decode.parse_args([])
    args.page_size = 32
    gen = torch.Generator(device="cuda").manual_seed(0)
    for point in a.points:
        s, b = (int(x) for x in point.split(":"))
        k, v, cache = bench_decode.make_cache(b, s, args, torch.bfloat16, gen)
        q = torch.randn(b, 32, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            t_sdpa = us(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True))
        summ = PageSummaries.build(cache)
        summary_bytes = 2 * summ.kmin[: b * cache.max_pages].numel() * 2
        print(f"S={s} B={b} budget={a.budget}: sdpa_flash {t_sdpa:.1f} us; summaries {summary_bytes / 1e6:.0f} MB",
              flush=True)
        kk, n_sink, n_local = _pages.page_shares(cache, a.budget, 64, 64)
        for bp, hb, w in SCORE_VARIANTS:
            with patched(quest, _BLOCK_PAGES=bp, _HEADS_PER_PROGRAM=hb, _WARPS=w):
                t = us(lambda: quest.quest_scores(q, cache, summ, n_sink=n_sink, n_local=n_local))
            print(f"  scores pages={bp} heads={hb} warps={w}: {t:.1f} us  {summary_bytes / t / 1e3:.0f} GB/s", flush=True)
        scores = quest.quest_scores(q, cache, summ, n_sink=n_sink, n_local=n_local)
        print(f"  torch.topk + counts: {us(lambda: (torch.topk(scores, kk, dim=-1).indices.int(), cache.num_pages_of().clamp(max=kk))):.1f} us", flush=True)
        for blk, w in TOPK_VARIANTS:
            with patched(_pages, _TOPK_BLOCK=blk, _TOPK_WARPS=w):
                t = us(lambda: _pages.top_pages(scores, cache, kk))
            print(f"  top_pages block={blk} warps={w}: {t:.1f} us", flush=True)
        sel = quest.quest_select(q, cache, summ, budget=a.budget, sink=64, window=64)
        for keys in SPLIT_KEYS:
            with patched(pd, _MIN_SPLIT_KEYS=keys):
                t = us(lambda: pd.paged_decode_attention(q, cache, sel))
            print(f"  attention min_split_keys={keys}: {t:.1f} us", flush=True)
        t_sel = us(lambda: quest.quest_select(q, cache, summ, budget=a.budget, sink=64, window=64))
        t = us(lambda: pd.paged_decode_attention(q, cache, quest.quest_select(q, cache, summ, budget=a.budget,
                                                                               sink=64, window=64)))
        print(f"  select {t_sel:.1f} us; step {t:.1f} us: x{t_sdpa / t:.2f} SDPA", flush=True)
        pm = dict(budget=a.budget, sink=64, window=64)
        t_pm = us(lambda: page_mean.page_mean_scores(q, cache, summ, n_sink=n_sink, n_local=n_local))
        t_sel = us(lambda: page_mean.page_mean_select(q, cache, summ, **pm))
        t = us(lambda: pd.paged_decode_attention(q, cache, page_mean.page_mean_select(q, cache, summ, **pm)))
        print(f"  page_mean: scores {t_pm:.1f} us, select {t_sel:.1f} us; step {t:.1f} us: x{t_sdpa / t:.2f} SDPA",
              flush=True)
        del k, v, cache, summ, scores, sel
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
