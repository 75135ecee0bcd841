"""Probe: Quest decode fidelity on SmolLM2 under variants (dense first layers, page size, group scoring).

    python bench/probes/quest_variants.py --variants base dense2 ps16 ps16dense2 --lengths 4096 8192 --prompts 3 2

Runs bench/fidelity_decode.py's loop with the quest decode side modified per variant (monkeypatching, probe only).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

import fidelity_decode  # noqa: E402
import sparse_attn.methods as methods  # noqa: E402
from sparse_attn import decode as decode_mod  # noqa: E402
from sparse_attn import patterns as reg  # noqa: E402
from sparse_attn.ops.paged_decode import dense_selection, paged_decode_attention  # noqa: E402
from sparse_attn.kvcache import PagedKVCache  # noqa: E402

CURRENT = {"layer": 0}
ORIG = decode_mod.decode_step
QUEST = reg.get_pattern("quest")


SELECT = {"mode": "bound"}


def select_alt(q, k, cache, budgets, scale, mode, state):
    """oracle: true attention mass per page summed over the group; mass: per-head softmax of the bound;
    sum: the bounds summed over the group."""
    b, hq, _, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    ps = cache.page_size
    n = -(-s // ps)
    kp = min(budgets["budget"] // ps, n)
    scale = scale or d ** -0.5
    if mode == "oracle":
        logits = torch.einsum("bhgd,bhsd->bhgs", q.float().view(b, hkv, g, d), k.float()) * scale
        prob = logits.softmax(-1)
        pad = n * ps - s
        score = torch.nn.functional.pad(prob, (0, pad)).view(b, hkv, g, n, ps).sum(-1).sum(2)
    elif mode == "centroid":
        pad = n * ps - s
        kk = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).view(b, hkv, n, ps, d)
        cnt = torch.nn.functional.pad(torch.ones(s), (0, pad)).view(n, ps).sum(-1).clamp(min=1)
        mean = kk.sum(3) / cnt.view(1, 1, n, 1)
        logits = torch.einsum("bhgd,bhpd->bhgp", q.float().view(b, hkv, g, d), mean) * scale
        score = (logits.softmax(-1) * cnt).sum(2)
    else:
        summ = (state or decode_mod.DecodeState()).summaries_for(cache)
        slots = summ.table[:, :n].long()
        mn, mx = summ.kmin[slots].float(), summ.kmax[slots].float()  # [B, P, Hkv, D]
        qg = q.float().view(b, hkv, g, d)
        bound = torch.maximum(torch.einsum("bphd,bhgd->bhgp", mx, qg), torch.einsum("bphd,bhgd->bhgp", mn, qg))
        bound = bound * scale
        score = bound.sum(2) if mode == "sum" else bound.softmax(-1).sum(2)
    n_sink = min(-(-budgets.get("sink", 64) // ps), kp)
    from sparse_attn.kvcache import window_pages
    n_loc = min(window_pages(budgets.get("window", 64), ps), kp - n_sink)
    pidx = torch.arange(n)
    forced = (pidx < n_sink) | (pidx >= n - n_loc)
    score = torch.where(forced, torch.tensor(float("inf")), score)
    pages = torch.topk(score, kp, dim=-1).indices.to(torch.int32)
    counts = torch.full((b, hkv), kp, dtype=torch.int32)
    from sparse_attn.layouts import PageSelection
    return PageSelection(pages.contiguous(), counts, ps)


def install(dense_layers: int, page_size: int):
    reg.unregister_pattern("quest")
    reg.register_pattern(dataclasses.replace(QUEST, decode_page_size=page_size))

    def step(q, k, v, pattern, budgets, *, scale=None, state=None):
        if CURRENT["layer"] < dense_layers:
            cache = PagedKVCache.from_contiguous(k, v, page_size=page_size, validate=False)
            sel = dense_selection(cache)
            return paged_decode_attention(q, cache, sel, scale=scale), sel, cache
        if SELECT["mode"] != "bound":
            cache = PagedKVCache.from_contiguous(k, v, page_size=page_size, validate=False)
            sel = select_alt(q, k, cache, budgets, scale, SELECT["mode"], state)
            return paged_decode_attention(q, cache, sel, scale=scale), sel, cache
        return ORIG(q, k, v, pattern, budgets, scale=scale, state=state)

    methods.decode_step = step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=["base", "dense2"])
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096])
    ap.add_argument("--prompts", type=int, nargs="+", default=[3])
    ap.add_argument("--steps", type=int, default=32)
    a = ap.parse_args()
    model_hook_done = False
    for var in a.variants:
        dense_layers = 2 if "dense2" in var else (1 if "dense1" in var else 0)
        ps = 16 if "ps16" in var else (64 if "ps64" in var else 32)
        install(dense_layers, ps)
        SELECT["mode"] = next((m for m in ("oracle", "mass", "sum", "centroid") if m in var), "bound")
        if not model_hook_done:
            orig_load = fidelity_decode.load_model

            def load(*args, **kw):
                model, tok = orig_load(*args, **kw)
                for m in model.modules():
                    if hasattr(m, "layer_idx") and "Attention" in type(m).__name__:
                        m.register_forward_pre_hook(lambda mod, inp: CURRENT.__setitem__("layer", mod.layer_idx))
                return model, tok

            fidelity_decode.load_model = load
            model_hook_done = True
        print(f"#### variant {var}: dense_layers={dense_layers} page_size={ps}", flush=True)
        fidelity_decode.main(["--methods", f"quest:budget={a.budget}", "--lengths", *map(str, a.lengths),
                              "--prompts", *map(str, a.prompts), "--steps", str(a.steps)])


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
