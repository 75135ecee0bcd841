"""Attention recall and density of prefill configurations on a real model, layer by layer from one forward
pass (no generation): the share of the dense attention mass each layout keeps (sparse_attn.recall), per
head, on SmolLM2-135M-Instruct over pydoc text. Cheaper than the fidelity harness: picks budgets to run there.
Runs on CPU.

    python bench/probes/flex_recall_smollm2.py --length 4096 --configs "flexprefill:gamma=0.9" \
        "vertical_slash:vertical_size=128,slash_size=256"

A config is a pattern name with its budgets and options ("name:key=value,..."); "mixture_default" is the
head dict the "minference" method gives every head without a profile at this length.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH.parent), str(BENCH)]  # sparse_attn from the repository, common from bench/

import torch  # noqa: E402

from common import _spec_value  # noqa: E402
from sparse_attn import dispatch  # noqa: E402
from sparse_attn.models import load_model, text_ids  # noqa: E402
from sparse_attn.patterns import get_pattern, mixture_default  # noqa: E402
from sparse_attn.profiler import run_layers  # noqa: E402
from sparse_attn.recall import attention_recall  # noqa: E402


def parse(text: str, length: int):
    if text == "mixture_default":
        head = mixture_default(length)
        return text, head.pop("pattern"), head
    name, _, rest = text.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        kwargs[key] = _spec_value(value)
    return text, name, kwargs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", nargs="+", default=["mixture_default", "flexprefill:gamma=0.9"])
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    model, tokenizer = load_model()
    hq = model.config.num_attention_heads
    configs = [parse(c, a.length) for c in a.configs]

    def per_layer(layer, q, k, scale):
        out = {}
        for label, name, kwargs in configs:
            pattern = get_pattern(name)
            budgets = {b: kwargs[b] for b in pattern.budget_names if b in kwargs}
            cfg = [{"pattern": name, **{b.name: b.default for b in pattern.budgets}, **budgets}] * hq
            options = {o: kwargs[o] for o in kwargs if o not in budgets}
            layout = dispatch.plan_pattern(name, q, k, cfg, causal=True, scale=scale, block_size=64, **options)
            out[label] = (attention_recall(q, k, layout, scale=scale)[0], layout.head_density(True)[0])
        return out

    results = run_layers(model, text_ids(tokenizer, a.length, a.seed), per_layer, desc=f"{a.length} tokens")
    print(f"SmolLM2-135M-Instruct, {a.length} tokens of pydoc text (seed {a.seed}); per head over "
          f"{len(results)} layers x {hq} heads")
    print(f"{'config':<50} {'mean recall':>11} {'p10':>6} {'min':>6} {'density':>8}")
    for label, _, _ in configs:
        rec = torch.stack([results[layer][label][0] for layer in results]).flatten().double()
        den = torch.stack([results[layer][label][1] for layer in results]).flatten().double()
        print(f"{label:<50} {rec.mean():11.4f} {rec.quantile(0.1):6.3f} {rec.min():6.3f} {den.mean():8.3f}")


if __name__ == "__main__":
    main()
