"""Hugging Face transformers adapter: sparse prefill through transformers' own attention registry.

    model = sparse_attn.patch(model, method="minference")   # or a profile: config="patches/x.json"
    model.generate(...)                                     # prefill sparse; decode sparse where the pattern serves it
    print(sparse_attn.get_stats(model).table())
    sparse_attn.unpatch(model)

`patch` registers one attention function per patched model in transformers' `AttentionInterface`, and
the SDPA mask builder under the same name (so the model hands it None for plain causal inputs and a
boolean mask otherwise), then switches the model's attention implementation to that name. No model code
is replaced: any model whose attention layers call `ALL_ATTENTION_FUNCTIONS.get_interface(...)` works.
The KV cache stays the model's own and holds every key; only the attention over it is sparse.
`unpatch` switches every config back to its previous implementation and unregisters the name.

Chunked prefill (`patch(model, ..., prefill_chunk=N)`): a forward pass over more than N new tokens runs
as consecutive passes of at most N tokens against the growing cache, as serving engines prefill, so the
activations (MLP, logits, the attention's estimator and index) are bounded by the chunk while the cache
holds every key. Each chunk's queries are the last rows of the keys so far (bottom-right causal); a
pattern's estimator reads that chunk's queries. The mask builder registered with the attention hands the
attention no mask for such a chunk without padding, so no chunk x keys mask is built.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from .._checks import logger, warn_once
from ..decode import DecodeState
from ..dispatch import step_backends
from ..methods import check_method_kwargs, check_model, get_method, sparse_attention
from ..profiles import Profile, load_profile, match_profile
from .config import patch_arguments

__all__ = ["patch", "unpatch", "get_stats", "is_patched", "AttentionStats", "LayerStats", "model_name",
           "model_names", "model_identity", "model_shape", "attention_hook"]

_NAME_PREFIX = "sparse_attn"
_names = itertools.count()
_patches: "weakref.WeakKeyDictionary[torch.nn.Module, _Patch]" = weakref.WeakKeyDictionary()
# Query rows per step when checking that a boolean mask is the plain causal band (bounded memory).
_MASK_CHECK_ROWS = 512


@dataclass
class LayerStats:
    """One attention call of one layer: per query head, what the method computed."""

    density: torch.Tensor  # float64 [Hq], on the call's device: computed / causal entries (mean over the batch)
    pattern: List[str]  # per query head
    seqlen_q: int
    seqlen_k: int
    recall: Optional[torch.Tensor] = None  # float64 [Hq], diagnostics=True only
    entries: float = 0.0  # causal entries of the call(s), the weight of merging the chunks of one prefill

    def merged(self, later: "LayerStats") -> "LayerStats":
        """This call and a later chunk of the same prefill as one: densities (and recalls) weighted by their
        causal entries; the queries of both, the later call's keys."""
        total = self.entries + later.entries
        w0, w1 = (self.entries / total, later.entries / total) if total else (0.5, 0.5)
        recall = None
        if self.recall is not None and later.recall is not None:
            recall = self.recall * w0 + later.recall * w1
        pattern = self.pattern if self.pattern == later.pattern else [
            a if a == b else f"{a}+{b}" for a, b in zip(self.pattern, later.pattern)]
        return LayerStats(self.density * w0 + later.density * w1, pattern, self.seqlen_q + later.seqlen_q,
                          later.seqlen_k, recall, total)


@dataclass
class AttentionStats:
    """What the patched model computed in its latest calls: per layer, the last multi-query call (prefill)
    and the last single-query call (decode); `fallbacks` counts calls handed to transformers' SDPA."""

    prefill: Dict[int, LayerStats] = field(default_factory=dict)
    decode: Dict[int, LayerStats] = field(default_factory=dict)
    fallbacks: int = 0

    def _phase(self, phase: str) -> Dict[int, LayerStats]:
        if phase not in ("prefill", "decode"):
            raise ValueError(f"phase: expected 'prefill' or 'decode', got {phase!r}")
        return self.prefill if phase == "prefill" else self.decode

    def density(self, phase: str = "prefill") -> Optional[float]:
        """Mean over layers and heads (every layer sees the same causal entries), or None before a call."""
        layers = self._phase(phase)
        if not layers:
            return None
        return torch.stack([s.density.cpu() for s in layers.values()]).mean().item()

    def recall(self, phase: str = "prefill") -> Optional[float]:
        """Mean attention recall over layers and heads (diagnostics=True), or None."""
        values = [s.recall for s in self._phase(phase).values() if s.recall is not None]
        return torch.stack(values).mean().item() if values else None

    def table(self, phase: str = "prefill") -> str:
        """One line per layer: lengths, density (mean / min / max over heads), patterns, recall."""
        lines = [f"{'layer':>5} {'Sq':>6} {'Sk':>6} {'density':>8} {'min':>6} {'max':>6} {'recall':>7}  patterns"]
        for i, s in sorted(self._phase(phase).items()):
            counts: Dict[str, int] = {}
            for p in s.pattern:
                counts[p] = counts.get(p, 0) + 1
            rec = f"{s.recall.mean().item():7.3f}" if s.recall is not None else f"{'-':>7}"
            lines.append(f"{i:>5} {s.seqlen_q:>6} {s.seqlen_k:>6} {s.density.mean().item():8.3f} "
                         f"{s.density.min().item():6.3f} {s.density.max().item():6.3f} {rec}  "
                         + ", ".join(f"{p} x{n}" for p, n in sorted(counts.items())))
        return "\n".join(lines)


@dataclass
class _Patch:
    """The settings one attention function reads; re-patching updates them in place."""

    name: str
    previous: List[tuple]  # (config, its attention implementation before patching)
    method: str = "minference"
    kwargs: Dict[str, Any] = field(default_factory=dict)
    profile: Optional[Profile] = None
    collect_stats: bool = True
    diagnostics: bool = False
    stats: AttentionStats = field(default_factory=AttentionStats)
    last_mask: Any = None  # (weakref to the last mask checked, whether it was plain causal)
    decode_states: Dict[int, DecodeState] = field(default_factory=dict)  # per layer, between decode steps
    prefill_chunk: Optional[int] = None
    merge_chunks: bool = False  # inside a chunked forward, past its first chunk: merge the prefill stats


def model_name(model) -> str:
    """The name profiles are looked up by: the model's `name_or_path` (a hub id or a directory)."""
    config = getattr(model, "config", None)
    return str(getattr(model, "name_or_path", "") or getattr(config, "_name_or_path", "") or "")


def model_names(model) -> List[str]:
    """What the checkpoint calls itself: its path or hub id, and the name stored in it where the loader kept
    one (a GGUF file's general.name)."""
    config = _text_config(model)
    out = [model_name(model)]
    for c in (getattr(model, "config", None), config):
        for key in ("_name_or_path", "_model_name_or_path", "name"):
            value = getattr(c, key, None)
            if isinstance(value, str) and value and value not in out:
                out.append(value)
    return [n for n in out if n]


def model_identity(model) -> Dict[str, Any]:
    """The architecture (class name) and the layer / head shape a profile must match."""
    return {"architecture": type(model).__name__, **model_shape(model)}


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_shape(model) -> Dict[str, int]:
    """num_layers, num_heads, num_kv_heads and head_dim of a transformers model (its text config)."""
    c = _text_config(model)
    heads = c.num_attention_heads
    return {"num_layers": c.num_hidden_layers, "num_heads": heads,
            "num_kv_heads": getattr(c, "num_key_value_heads", None) or heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads}


def _check_model(model) -> None:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model: expected a transformers PreTrainedModel whose attention layers go through "
                        f"AttentionInterface (Llama, Mistral, Qwen2/3, Phi-3, ...), got {type(model).__name__}")
    layers = [m for m in model.modules() if "Attention" in type(m).__name__ and hasattr(m, "layer_idx")]
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no attention modules with a layer_idx; "
                         "sparse_attn.patch supports models whose attention uses transformers' AttentionInterface")


def _resolve_profile(model, method: str, config) -> Optional[Profile]:
    mixture = get_method(method).mixture
    if config is not None and not mixture:
        raise ValueError(f"config: a head profile applies to the per-head mixture method only, got method={method!r}")
    if not mixture:
        return None
    source = "given"
    if config is None:
        config = match_profile(model_identity(model), model_names(model))
        source = str(config)
    if config is None:
        identity = model_identity(model)
        logger.warning(f"sparse_attn: no profile in patches/ for {model_names(model)[:3]} ({identity['architecture']}, "
                       f"{identity['num_layers']} layers, {identity['num_heads']} / {identity['num_kv_heads']} heads, "
                       f"head dim {identity['head_dim']}): method {method!r} gives every head its default pattern "
                       "(pass config= a profile, or make one with `python -m sparse_attn.cli profile`)")
        return None
    profile = load_profile(config)
    profile.check_model(**model_shape(model))
    logger.info(f"sparse_attn: {model_name(model) or type(model).__name__} uses the profile of "
                f"{profile.model['name']!r} ({source})")
    return profile


def _plain_causal(p: _Patch, mask, seqlen_q: int, seqlen_k: int) -> bool:
    """Whether `mask` is None or exactly the bottom-right causal band (checked once per mask object)."""
    if mask is None:
        return True
    if p.last_mask is not None and p.last_mask[0]() is mask:
        return p.last_mask[1]
    ok = (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4
          and tuple(mask.shape[-2:]) == (seqlen_q, seqlen_k))
    cols = torch.arange(seqlen_k, device=mask.device) if ok else None
    for r0 in range(0, seqlen_q if ok else 0, _MASK_CHECK_ROWS):
        rows = mask[..., r0:r0 + _MASK_CHECK_ROWS, :]
        last = torch.arange(r0, r0 + rows.shape[-2], device=mask.device)[:, None] + (seqlen_k - seqlen_q)
        if not torch.equal(rows, (cols[None, :] <= last).expand_as(rows)):
            ok = False
    p.last_mask = (weakref.ref(mask), ok) if isinstance(mask, torch.Tensor) else None
    return ok


def _dense_reason(p: _Patch, module, query, key, mask, dropout, kwargs) -> Optional[str]:
    """Why this call must run transformers' own SDPA instead of a method, or None."""
    if module.training and dropout:
        return "attention dropout in training"
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        return "non-causal attention"
    for name in ("softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(name) is not None:
            return f"attention with {name}"
    if not _plain_causal(p, mask, query.shape[2], key.shape[2]):
        return "an attention mask other than plain causal (padding or a sliding window)"
    return None


def _make_attention(p: _Patch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        reason = _dense_reason(p, module, query, key, attention_mask, dropout, kwargs)
        if reason is not None:
            warn_once(f"hf-dense-{reason}", f"sparse_attn: {reason}: these calls run transformers' dense SDPA")
            p.stats.fallbacks += 1
            sq, sk = query.shape[2], key.shape[2]
            if attention_mask is None and 1 < sq != sk:
                # The mask builder gave None for a chunk (bottom-right causal); SDPA's is_causal is top-left.
                rows = torch.arange(sk - sq, sk, device=query.device)[:, None]
                attention_mask = (torch.arange(sk, device=query.device)[None, :] <= rows)[None, None]
            with step_backends(query):
                return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, **kwargs)
        layer = module.layer_idx
        head_config = p.profile.layer(layer) if p.profile is not None else None
        stats: Optional[Dict[str, Any]] = {} if p.collect_stats else None
        state = p.decode_states.setdefault(layer, DecodeState())
        if query.shape[2] > 1:
            state.reset()  # a new prompt (or chunk): the summaries are rebuilt at the next decode step
        out = sparse_attention(query, key, value, p.method, causal=True, scale=scaling, head_config=head_config,
                               stats=stats, recall=p.diagnostics and query.shape[2] > 1, decode_state=state,
                               **p.kwargs)
        if stats is not None:
            sq, sk = query.shape[2], key.shape[2]
            # causal entries of sq bottom-right rows over sk keys, in Python ints (no tensors in a decode step)
            entries = float(sq * (sk - sq) + sq * (sq + 1) // 2) * query.shape[0]
            record = LayerStats(stats["density"], stats["pattern"], sq, sk, stats.get("recall"), entries)
            phase = p.stats.prefill if sq > 1 else p.stats.decode
            if sq > 1 and p.merge_chunks and layer in phase:
                record = phase[layer].merged(record)
            phase[layer] = record
        # transformers' attention functions return [B, S, H, D]
        return out.transpose(1, 2).contiguous(), None

    return attention


_CACHE_ARGS = ("cache", "past_key_values")  # the cache argument's name in newer and older transformers
_PER_TOKEN = ("position_ids", "cache_position", "token_type_ids")  # sliced with the tokens


def _chunk_refusal(a: Dict[str, Any]) -> Optional[str]:
    """Why a forward call cannot be split into chunks (it then runs in one pass), or None."""
    if a.get("labels") is not None:
        return "a loss (labels)"
    if a.get("output_attentions") or a.get("output_hidden_states"):
        return "per-layer outputs (output_attentions / output_hidden_states)"
    mask = a.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        return "an attention mask other than a 2D padding mask"
    return None


def _cache_of(out):
    for name in _CACHE_ARGS:
        if out.get(name) is not None:
            return out[name]
    return None


def _chunked_forward(p: "_Patch", forward):
    """`forward` (a model's bound forward) that runs more than p.prefill_chunk new tokens as consecutive
    calls of at most that many against the cache the first one creates (or the caller's). Logits: the
    chunks' concatenated, or where the caller keeps only the last few (logits_to_keep, as generate does)
    the last chunk's alone; the returned output is the last chunk's with those logits and the cache."""
    signature = inspect.signature(forward)
    params = signature.parameters
    var = next((n for n, q in params.items() if q.kind is inspect.Parameter.VAR_KEYWORD), None)
    cache_name = next((n for n in _CACHE_ARGS if n in params), _CACHE_ARGS[-1])

    @functools.wraps(forward)
    def chunked(*args, **kwargs):
        n = p.prefill_chunk
        try:
            a = dict(signature.bind(*args, **kwargs).arguments)
        except TypeError:
            return forward(*args, **kwargs)
        a.update(a.pop(var, None) or {})
        token_arg = "inputs_embeds" if a.get("inputs_embeds") is not None else "input_ids"
        x = a.get(token_arg)
        if n is None or not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] <= n:
            return forward(*args, **kwargs)
        reason = _chunk_refusal(a)
        if reason is not None:
            warn_once(f"hf-chunk-{reason}", f"sparse_attn: prefill_chunk: a forward pass with {reason} runs in "
                                            "one pass, not in chunks")
            return forward(*args, **kwargs)
        total = x.shape[1]
        cache = next((a.pop(k) for k in _CACHE_ARGS if a.get(k) is not None), None)
        for k in _CACHE_ARGS:
            a.pop(k, None)
        keep = a.get("logits_to_keep", 0) if "logits_to_keep" in params else None
        last = total - (total - 1) // n * n  # tokens in the last chunk
        few = isinstance(keep, int) and not isinstance(keep, bool) and 0 < keep <= last
        as_tuple = a.get("return_dict") is False
        mask = a.get("attention_mask")
        before = mask.shape[1] - total if mask is not None else 0  # mask columns of the cached tokens
        logits, out = [], None
        try:
            for s0 in range(0, total, n):
                s1 = min(total, s0 + n)
                c = dict(a, **{token_arg: x[:, s0:s1], "use_cache": True})
                if cache is not None:
                    c[cache_name] = cache
                if mask is not None:
                    c["attention_mask"] = mask[:, : before + s1]
                for name in _PER_TOKEN:
                    t = a.get(name)
                    if isinstance(t, torch.Tensor) and t.shape[-1] == total:
                        c[name] = t[..., s0:s1]
                if keep is not None:
                    c["logits_to_keep"] = (keep if s1 == total else 1) if few else 0
                if as_tuple:
                    c["return_dict"] = True
                p.merge_chunks = s0 > 0
                out = forward(**c)
                cache = _cache_of(out)
                if not few:
                    logits.append(out.logits)
        finally:
            p.merge_chunks = False
        if not few:
            out["logits"] = torch.cat(logits, 1) if len(logits) > 1 else logits[0]
            if isinstance(keep, torch.Tensor):
                out["logits"] = out.logits[:, keep]
            elif isinstance(keep, int) and keep > 0:
                out["logits"] = out.logits[:, -keep:]
        return out.to_tuple() if as_tuple else out

    chunked.sparse_attn_chunked = True
    return chunked


def _set_chunking(model, p: "_Patch") -> None:
    """Install (prefill_chunk set) or remove the chunking forward on the model instance."""
    if getattr(model.__dict__.get("forward"), "sparse_attn_chunked", False):
        del model.forward
    if p.prefill_chunk is not None:
        model.forward = _chunked_forward(p, model.forward)


def _configs(model) -> List[Any]:
    """Every config the model's attention reads (the top one and those of nested PreTrainedModels)."""
    from transformers import PreTrainedModel

    seen: Dict[int, Any] = {}
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            seen.setdefault(id(m.config), m.config)
    return list(seen.values())


def _no_padding(mask) -> bool:
    return mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2 and bool(mask.all()))


def _causal_mask(*args, **kwargs):
    """transformers' SDPA mask builder, except that it gives None (the attention's own bottom-right causal
    band) where the mask would be exactly that: plain causal, no padding, the queries the last rows of the
    keys. transformers builds a chunk x keys mask there, which at a long cache outweighs the chunk."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    try:
        bound = inspect.signature(sdpa_mask).bind(*args, **kwargs)
    except TypeError:
        return sdpa_mask(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    q_length, q_offset = a.get("q_length"), a.get("q_offset")
    positions = a.get("cache_position")  # transformers versions that pass positions instead of an offset
    if q_length is None and isinstance(positions, torch.Tensor) and positions.dim() == 1 and positions.numel():
        q_length, q_offset = positions.numel(), positions[0]
    if isinstance(q_offset, torch.Tensor):
        q_offset = None if q_offset.numel() != 1 else int(q_offset)
    plain = (a.get("mask_function") is causal_mask_function and a.get("local_size") is None
             and a.get("allow_is_causal_skip", False) and not a.get("kv_offset", 0)
             and isinstance(q_length, int) and isinstance(q_offset, int)
             and q_offset + q_length == a.get("kv_length") and _no_padding(a.get("attention_mask")))
    return None if plain else sdpa_mask(*args, **kwargs)


def _register(name: str, attention, mask) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)


def _unregister(name: str) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


def _switch_on(model, name: str, attention, previous: List[tuple], mask=None) -> None:
    """Register `attention` under `name` (with transformers' SDPA mask builder, or `mask`) and switch the
    model to it; on failure leave nothing behind."""
    from transformers.masking_utils import sdpa_mask

    _register(name, attention, mask or sdpa_mask)
    try:
        model.set_attn_implementation(name)
    except Exception:
        _unregister(name)
        raise
    if model.config._attn_implementation != name:
        _restore(previous)
        _unregister(name)
        raise ValueError(f"model: {type(model).__name__} does not let transformers switch its attention "
                         "implementation (its attention layers do not call ALL_ATTENTION_FUNCTIONS), so "
                         "sparse_attn cannot hook in")


def _restore(previous: List[tuple]) -> None:
    for config, implementation in previous:
        config._attn_implementation = implementation


@contextlib.contextmanager
def attention_hook(model, attention):
    """While open, every attention call of `model` goes to `attention(module, query, key, value,
    attention_mask, dropout=0.0, scaling=None, **kwargs)` (transformers' attention-function signature,
    returning (out [B, S, H, D], weights or None)); the model's previous implementation comes back on exit.
    The same hook `patch` installs, for callers that need one pass (the profiler's capture)."""
    _check_model(model)
    name = f"{_NAME_PREFIX}_hook_{next(_names)}"
    previous = [(c, c._attn_implementation) for c in _configs(model)]
    _switch_on(model, name, attention, previous)
    try:
        yield model
    finally:
        _restore(previous)
        _unregister(name)


def patch(model, method: Optional[str] = None, config=None, *, stats: bool = True, diagnostics: bool = False,
          prefill_chunk: Optional[int] = None, **method_kwargs):
    """Route the model's attention through `sparse_attention(..., method)`; returns the model.

    method: a registry name (sparse_attn.list_methods()); None: the model's `sparse_attention_config` block
    (sparse_attn.integrations.config: $SPARSE_ATTN_CONFIG, then config.json), else "minference".
    method_kwargs: its documented kwargs
    (get_method(method).help()), e.g. min_seqlen (queries shorter than it run dense: decode, short prompts).
    config: for the per-head mixture ("minference"), a head profile (path, dict or Profile) checked against the
    model's layer and head counts; without one, patches/<model name>.json if present, else the method's
    default.
    stats: record per layer and head the density computed (sparse_attn.get_stats); False skips the
    per-call device sync it costs. diagnostics: also the attention recall against dense (slow).
    prefill_chunk: a forward pass (or generate's prefill) over more new tokens than this runs in chunks of
    this many against the growing cache (bounded activations; the prefill stats merge the chunks). Chunks
    shorter than min_seqlen run dense: keep prefill_chunk >= min_seqlen.
    Patching a patched model replaces its settings; unpatch restores the original implementation.
    """
    method, config, method_kwargs = patch_arguments(model, method, config, method_kwargs)
    get_method(method)
    if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                      or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk: expected None or a positive int (tokens per prefill chunk), "
                         f"got {prefill_chunk!r}")
    kwargs = dict(method_kwargs)
    merged = check_method_kwargs(method, kwargs)
    _check_model(model)
    shape = model_shape(model)
    check_model(method, merged, shape["num_heads"], shape["num_kv_heads"])
    profile = _resolve_profile(model, method, config)
    p = _patches.get(model)
    if p is None:
        previous = [(c, c._attn_implementation) for c in _configs(model)]
        p = _Patch(f"{_NAME_PREFIX}_{next(_names)}", previous)
        _switch_on(model, p.name, _make_attention(p), previous, _causal_mask)
        _patches[model] = p
    p.method, p.kwargs, p.profile = method, kwargs, profile
    p.collect_stats, p.diagnostics = bool(stats or diagnostics), bool(diagnostics)
    p.stats, p.last_mask, p.decode_states = AttentionStats(), None, {}
    p.prefill_chunk = prefill_chunk
    _set_chunking(model, p)
    return model


def unpatch(model):
    """Restore the attention implementation the model had before `patch`; a no-op on an unpatched model."""
    p = _patches.pop(model, None)
    if p is not None:
        p.prefill_chunk = None
        _set_chunking(model, p)
        _restore(p.previous)
        _unregister(p.name)
    return model


def is_patched(model) -> bool:
    return model in _patches


def get_stats(model) -> AttentionStats:
    """Per layer and head, what the patched model computed in its latest forward pass."""
    p = _patches.get(model)
    if p is None:
        raise ValueError("model: not patched by sparse_attn.patch, so there are no attention stats")
    return p.stats
