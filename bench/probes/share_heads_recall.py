"""How much attention a shared vertical-slash index keeps on a real model: per head, the recall (share of
the dense attention mass inside the index, sparse_attn.recall) of vertical_slash with an index per head
(share_heads=1, MInference) against one index per run of n query heads of a GQA group (share_heads=n,
chosen from the run's summed scores, same budgets). Runs on CPU.

    python bench/probes/share_heads_recall.py [--length 4096] [--seeds 0 1] [--out FILE.json]

SmolLM2-135M-Instruct has 9 query heads per 3 kv heads, so its runs are the whole group (n = 3): a
harsher test than the pairs (n = 2) the kernel serves two at a time.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH.parent), str(BENCH)]  # sparse_attn from the repository, common from bench/

import torch  # noqa: E402

from sparse_attn import dispatch  # noqa: E402
from sparse_attn.models import load_model, text_ids  # noqa: E402
from sparse_attn.profiler import run_layers  # noqa: E402
from sparse_attn.recall import attention_recall  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--budgets", nargs="+", default=["128,256", "256,512"],
                   help="vertical_size,slash_size pairs")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    model, tokenizer = load_model()
    hq, hkv = model.config.num_attention_heads, model.config.num_key_value_heads
    shares = sorted({1, hq // hkv})
    budgets = [tuple(int(x) for x in b.split(",")) for b in a.budgets]
    records = []

    def per_layer(layer, q, k, scale):
        out = {}
        for nv, ns in budgets:
            cfg = [{"pattern": "vertical_slash", "vertical_size": nv, "slash_size": ns}] * hq
            for n in shares:
                est = dispatch.estimate_pattern("vertical_slash", q, k, cfg, causal=True, scale=scale, block_size=64,
                                                last_q=64, share_heads=n)
                layout = dispatch.build_pattern("vertical_slash", est, q, k, cfg, causal=True, block_size=64,
                                                share_heads=n)
                rec = attention_recall(q, k, layout, causal=True, scale=scale)[0]
                out[(nv, ns, n)] = (rec, layout.head_density(True)[0])
        return out

    for seed in a.seeds:
        results = run_layers(model, text_ids(tokenizer, a.length, seed), per_layer, desc=f"seed {seed}")
        for layer, per in results.items():
            for (nv, ns, n), (rec, dens) in per.items():
                records.append({"seed": seed, "layer": layer, "vertical": nv, "slash": ns, "share": n,
                                "recall": rec.tolist(), "density": dens.tolist()})
    print(f"SmolLM2-135M-Instruct, {a.length} tokens of pydoc text, seeds {a.seeds}; per head over "
          f"{model.config.num_hidden_layers} layers x {hq} heads")
    print(f"{'vertical':>8} {'slash':>6} {'share':>5} {'mean recall':>11} {'p10':>6} {'min':>6} {'density':>8}")
    for nv, ns in budgets:
        for n in shares:
            rec = torch.tensor([r["recall"] for r in records if (r["vertical"], r["slash"], r["share"]) == (nv, ns, n)])
            den = torch.tensor([r["density"] for r in records if (r["vertical"], r["slash"], r["share"]) == (nv, ns, n)])
            flat = rec.flatten().double()
            print(f"{nv:>8} {ns:>6} {n:>5} {flat.mean():11.4f} {flat.quantile(0.1):6.3f} {flat.min():6.3f} "
                  f"{den.double().mean():8.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"length": a.length, "seeds": a.seeds, "records": records}))


if __name__ == "__main__":
    main()
