"""The methods registry: one name -> (estimator, sparse index, kernel, documented defaults).

Adapters (HF, vLLM), benchmarks and the profiler call only this module:

    out = sparse_attention(q, k, v, method="minference", causal=True, head_config=None, stats=None, **kwargs)

q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] (Hq a multiple of Hkv; views welcome). The methods are "dense",
"minference" (a per-head mixture of patterns from a profile) and one uniform method per registered pattern
(sparse_attn.patterns), generated from its entry: every head with the pattern's budgets. A method is a
prefill side and a decode side, as data: a pattern's method prefills with it (dense for a decode-only
pattern) and decodes with it where it has a decode side (else dense); `decode="<pattern>"` with
`decode_config={...}` (that pattern's budgets) picks another decode side. Every method takes `min_seqlen`:
with fewer queries than that the call is dense (torch SDPA), except for patterns that also serve decode,
which go dense only when the keys are shorter; a decode call (one query) takes the decode side from
min_seqlen keys on (a method without one runs its prefill rule, dense unless min_seqlen <= 1). On CUDA the sparse kernels run; elsewhere the fp32 reference with the same sparse index, so
everything works without a GPU (slowly). A causal sparse call of more than ROW_CHUNKS_FROM queries runs in
row chunks (bounded index and plan memory; see _run_rows).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from ._checks import warn_once
from . import dispatch
from .decode import DecodeState, decode_step, sparse_decode_from
from .ops.reference import AttentionInputs
from .ops.paged_decode import head_density
from .recall import sampled_rows
from .patterns import DENSE, Param, Pattern, all_options, get_pattern, list_patterns, mixture_default, patterns
from .profiles import check_head_config

__all__ = [
    "Method",
    "sparse_attention",
    "get_method",
    "list_methods",
    "check_method_kwargs",
    "check_model",
    "decode_side",
    "MIXTURE",
]

DEFAULT_MIN_SEQLEN = 1024
# Sparse calls of more queries than ROW_CHUNKS_FROM run as consecutive chunks of about ROW_CHUNK query rows, each
# the last rows of the keys it may see (see _run_rows): a layout, its kernel plan (tile lists) and an estimator's
# per-block work grow with the query blocks they cover, and at 1M tokens whole-call ones outweighed q, k and v
# (72.6 GiB for 20 GiB of q, k, v and output, H100).
ROW_CHUNK = 1 << 16
ROW_CHUNKS_FROM = 1 << 17
# The recall diagnostic scores every query of a call against every key up to this many queries; longer calls are
# measured on sparse_attn.recall.sampled_rows (16 bands of 64 rows, the last band ending the call).
RECALL_ALL_ROWS = 1 << 14
# The per-head mixture method's name (MInference's: a profile chooses each head's pattern and budget).
MIXTURE = "minference"

_COMMON = (Param("block_size", int, 64, 1, doc="tokens per query/key block of the sparse index"),
           Param("min_seqlen", int, DEFAULT_MIN_SEQLEN, 0, doc="queries shorter than this run dense (SDPA)"))


@dataclass(frozen=True)
class Method:
    """A registry entry. `run(q, k, v, *, causal, scale, head_config, **kwargs)` returns
    (out, dispatch.LayerLayouts, patterns list[str]) for the prefill side; `params` type and document its
    kwargs. pattern: the single pattern it runs (uniform methods); mixture: takes per-head configs;
    decode: the pattern of its decode side by default (None: dense)."""

    name: str
    summary: str
    params: tuple
    run: Callable = field(repr=False)
    pattern: Optional[str] = None
    mixture: bool = False
    decode: Optional[str] = None

    @property
    def defaults(self) -> Dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def help(self) -> str:
        lines = [f"{self.name}: {self.summary}"]
        lines += [f"  {p.name}={p.default!r}: {p.doc}" for p in self.params]
        if self.name != "dense":
            lines.append(f"  decode={self.decode or DENSE!r}: the decode side, {DENSE!r} or a pattern with one "
                         f"({[p.name for p in patterns() if p.decode]})")
            lines.append("  decode_config=None: that pattern's budgets, when it is not this method's own")
        return "\n".join(lines)


def _dense_result(q, k, v, causal, scale):
    out = dispatch.dense_attention(q, k, v, causal=causal, scale=scale)
    return out, dispatch.LayerLayouts(q.shape[0], q.shape[1], causal), ["dense"] * q.shape[1]


def _needs_causal(name, q, k, v, causal, scale):
    warn_once(f"noncausal-{name}", f"sparse_attn: method {name!r} is defined for causal attention only; "
                                   "causal=False runs dense")
    return _dense_result(q, k, v, causal, scale)


def _run_dense(q, k, v, *, causal, scale, head_config, min_seqlen):
    return _dense_result(q, k, v, causal, scale)


def _uniform_configs(pattern: Pattern, kwargs, num_heads: int):
    config = {"pattern": pattern.name, **{name: kwargs[name] for name in pattern.budget_names}}
    return [config] * num_heads, {p.name: kwargs[p.name] for p in pattern.options}


def _run_uniform(pattern: Pattern, q, k, v, *, causal, scale, head_config, block_size, min_seqlen, estimate=None,
                 **kwargs):
    """Every head with the pattern's budgets: one estimator call, one kernel launch, no head gathering.
    estimate: made beforehand for these rows (a call run in row chunks), built from instead of estimating."""
    pattern.check_model(kwargs, q.shape[1], k.shape[1])  # a config that does not fit the model fails early
    if not pattern.prefill or (k.shape[2] if pattern.decode else q.shape[2]) < min_seqlen:
        return _dense_result(q, k, v, causal, scale)
    if not causal and pattern.causal_only:
        return _needs_causal(pattern.name, q, k, v, causal, scale)
    configs, options = _uniform_configs(pattern, kwargs, q.shape[1])
    est = estimate if estimate is not None else dispatch.estimate_pattern(
        pattern.name, q, k, configs, causal=causal, scale=scale, block_size=block_size, **options)
    layout = dispatch.build_pattern(pattern.name, est, q, k, configs, causal=causal, block_size=block_size,
                                    **options)
    out = dispatch.attend(q, k, v, layout, causal=causal, scale=scale)
    every = (list(range(q.shape[1])), list(range(k.shape[1])), layout)
    return out, dispatch.LayerLayouts(q.shape[0], q.shape[1], causal, [every]), [pattern.name] * q.shape[1]


def _mixture_heads(head_config, num_heads: int, seqlen_k: int):
    if head_config is not None:
        return head_config
    default = mixture_default(seqlen_k)
    warn_once("mixture-default", f"sparse_attn: {MIXTURE!r} without a head profile gives every head "
                                 f"{default['pattern']!r} at a budget scaled with the length")
    return [default] * num_heads


def _run_mixture(q, k, v, *, causal, scale, head_config, block_size, min_seqlen, estimates=None, **options):
    if q.shape[2] < min_seqlen:
        return _dense_result(q, k, v, causal, scale)
    if not causal:
        return _needs_causal(MIXTURE, q, k, v, causal, scale)
    head_config = _mixture_heads(head_config, q.shape[1], k.shape[2])
    out, layouts = dispatch.run_head_config(q, k, v, head_config, causal=causal, scale=scale,
                                            block_size=block_size, estimates=estimates, **options)
    return out, layouts, [h["pattern"] for h in head_config]


def _uniform_method(pattern: Pattern) -> Method:
    return Method(pattern.name, pattern.summary, pattern.budgets + pattern.options + _COMMON,
                  functools.partial(_run_uniform, pattern), pattern=pattern.name,
                  decode=pattern.name if pattern.decode else None)


def _mixture_method() -> Method:
    summary = ("per-head mixture of the patterns from a profile (head_config); without one, every head gets "
               "the default pattern at a budget scaled with the length")
    return Method(MIXTURE, summary, tuple(all_options().values()) + _COMMON, _run_mixture, mixture=True)


_DENSE = Method("dense", "dense causal attention through torch SDPA (the baseline)",
                (Param("min_seqlen", int, DEFAULT_MIN_SEQLEN, 0, doc="accepted for uniformity; no effect"),),
                _run_dense)


@functools.lru_cache(maxsize=None)
def _cached_uniform(pattern: Pattern) -> Method:
    return _uniform_method(pattern)


def list_methods() -> List[str]:
    return sorted({"dense", MIXTURE, *list_patterns()})


def get_method(name: str) -> Method:
    if name == "dense":
        return _DENSE
    if name == MIXTURE:
        return _mixture_method()
    if name not in list_patterns():
        raise ValueError(f"method: unknown method {name!r}; expected one of {list_methods()}")
    return _cached_uniform(get_pattern(name))


def check_method_kwargs(name: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The method's defaults updated with `kwargs`, each checked against its Param (and `decode`,
    `decode_config` against the decode pattern); an unknown key is a TypeError listing the accepted ones."""
    return _merge(get_method(name), kwargs)[0]


def _merge(method: Method, kwargs: Dict[str, Any]):
    """(check_method_kwargs' merged kwargs, the decode side as decode_side gives it), checked once."""
    name = method.name
    extra = {"decode", "decode_config"} if name != "dense" else set()
    unknown = sorted(set(kwargs) - set(method.defaults) - extra)
    if unknown:
        raise TypeError(f"method {name!r}: unexpected keyword argument(s) {unknown}; "
                        f"accepted: {sorted(set(method.defaults) | extra)}")
    merged = {p.name: p.check(kwargs[p.name], f"method {name!r}") if p.name in kwargs else p.default
              for p in method.params}
    side = (None, {})
    if extra:
        merged.update({k: kwargs[k] for k in extra & set(kwargs)})
        side = _decode_side(method, merged)  # checks them
    if method.pattern is not None:
        pattern = get_pattern(method.pattern)
        if pattern.normalize is not None:
            merged = pattern.normalize(merged)
    return merged, side


def decode_side(name: str, kwargs: Dict[str, Any]):
    """(decode pattern name or None for dense, its budgets and options) of a method's merged kwargs."""
    return _decode_side(get_method(name), kwargs)


def _decode_side(method: Method, kwargs: Dict[str, Any]):
    decode = kwargs.get("decode", method.decode or DENSE)
    config = kwargs.get("decode_config")
    if decode == DENSE or decode is None:
        if config:
            raise ValueError(f"decode_config: given, but the decode side is {DENSE!r}")
        return None, {}
    decoders = [p.name for p in patterns() if p.decode]
    if decode not in decoders:
        raise ValueError(f"decode: expected {DENSE!r} or a pattern with a decode side {decoders}, got {decode!r}")
    p = get_pattern(decode)
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"decode_config: expected a dict of {decode!r}'s budgets, got {type(config).__name__}")
    own = decode == method.pattern
    known = {q.name: q for q in p.budgets + p.options}
    values = {name: kwargs[name] if own and name in kwargs else q.default for name, q in known.items()}
    for key, value in (config or {}).items():
        if key not in known:
            raise TypeError(f"decode_config: unexpected key {key!r} for {decode!r}; accepted: {sorted(known)}")
        values[key] = known[key].check(value, "decode_config")
    return decode, values


def check_model(name: str, kwargs: Dict[str, Any], num_heads: int, num_kv_heads: int) -> None:
    """Raise where a method's (merged) kwargs do not fit a model of these head counts (e.g. share_heads
    must divide its GQA group)."""
    method = get_method(name)
    names = [method.pattern] if method.pattern is not None else (list_patterns() if method.mixture else [])
    for pattern in names:
        get_pattern(pattern).check_model(kwargs, num_heads, num_kv_heads)


def _estimated_once(m: Method, q, k, *, causal: bool, scale, head_config, **kwargs):
    """(head_config, {run kwarg: estimate of the whole call}) for a call run in row chunks: the estimates of the
    patterns that restrict one to row chunks (Pattern.rows), made once; the mixture's default heads, fixed
    by the whole call's length."""
    sparse = causal and q.shape[2] >= kwargs["min_seqlen"]
    if m.mixture:
        head_config = _mixture_heads(head_config, q.shape[1], k.shape[2])
        if not sparse:
            return head_config, {}
        options = {name: value for name, value in kwargs.items() if name not in ("block_size", "min_seqlen")}
        return head_config, {"estimates": dispatch.group_estimates(q, k, head_config, causal=causal, scale=scale,
                                                                   block_size=kwargs["block_size"], **options)}
    pattern = get_pattern(m.pattern) if m.pattern is not None else None
    if pattern is None or pattern.rows is None or not pattern.prefill or not sparse:
        return head_config, {}
    configs, options = _uniform_configs(pattern, kwargs, q.shape[1])
    return head_config, {"estimate": dispatch.estimate_pattern(
        pattern.name, q, k, configs, causal=causal, scale=scale, block_size=kwargs["block_size"], **options)}


def _restrict(m: Method, shared: Dict[str, Any], head_config, r0: int, r1: int, sq: int, sk: int) -> Dict[str, Any]:
    """The whole call's estimates for rows [r0, r1)."""
    if "estimate" in shared:
        return {"estimate": get_pattern(m.pattern).rows(shared["estimate"], r0, r1, sq, sk)}
    if "estimates" in shared:
        patterns_of = {i: g.pattern for i, g in enumerate(dispatch.head_groups(head_config, shared["kv_heads"]))}
        return {"estimates": {i: get_pattern(patterns_of[i]).rows(e, r0, r1, sq, sk)
                              for i, e in shared["estimates"].items()}}
    return {}


def _run_rows(m: Method, q, k, v, *, causal: bool, scale, head_config, **kwargs):
    """m.run over the whole call, or (a causal sparse call of more than ROW_CHUNKS_FROM queries) over row chunks
    of about ROW_CHUNK queries (multiples of 128 rows and of the block size) against the keys each may see,
    written into one output. Patterns that restrict an estimate to rows (Pattern.rows) estimate once, so
    their index is the one-call index's rows; the others estimate each chunk from its own queries."""
    sq, sk = q.shape[2], k.shape[2]
    if m.name == "dense" or not causal or sq <= ROW_CHUNKS_FROM:
        return m.run(q, k, v, causal=causal, scale=scale, head_config=head_config, **kwargs)
    head_config, shared = _estimated_once(m, q, k, causal=causal, scale=scale, head_config=head_config, **kwargs)
    shared["kv_heads"] = k.shape[1]
    n = -(-sq // ROW_CHUNK)
    unit = math.lcm(128, kwargs.get("block_size", 64))
    rows = -(-sq // (n * unit)) * unit
    off = sk - sq
    out = torch.empty_like(q)
    record = dispatch.RowChunks(sk, seqlen_q=sq)
    names = None
    for r0 in range(0, sq, rows):
        r1 = min(sq, r0 + rows)
        if r1 + off <= 0:  # rows before the first key see nothing
            out[:, :, r0:r1] = 0
            continue
        seen = slice(0, r1 + off)
        o, layouts, chunk_names = m.run(q[:, :, r0:r1], k[:, :, seen], v[:, :, seen], causal=causal, scale=scale,
                                        head_config=head_config, **kwargs,
                                        **_restrict(m, shared, head_config, r0, r1, sq, sk))
        out[:, :, r0:r1] = o
        del o
        record.chunks.append((r0, r1, layouts))
        names = chunk_names if names is None else [a if a == b else f"{a}+{b}" for a, b in zip(names, chunk_names)]
    return out, record, names


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: str = "minference",
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    head_config: Optional[List[Dict[str, Any]]] = None,
    stats: Optional[Dict[str, Any]] = None,
    recall: bool = False,
    decode_state: Optional[DecodeState] = None,
    **method_kwargs,
) -> torch.Tensor:
    """One layer's attention through a named method; returns out [B, Hq, Sq, D] in q's dtype.

    head_config: per-query-head dicts for this layer (see sparse_attn.profiles), the mixture method only.
    stats: if a dict, receives "density" (float64 [Hq]: computed / causal entries, mean over the batch)
    and "pattern" (list of Hq pattern names); with recall=True also "recall" (float64 [Hq], mean over the
    batch: the share of the dense attention mass the layouts kept, sparse_attn.recall; a slow diagnostic
    that scores every query against every key, in chunks; beyond RECALL_ALL_ROWS queries on sampled rows). Method kwargs: see get_method(name).help().
    decode_state: for decode calls (one query per sequence), the layer's DecodeState kept between steps
    (page summaries); without one, a pattern that scores pages summarizes the whole cache in the call.
    """
    m = get_method(method)
    kwargs, (decode, decode_budgets) = _merge(m, method_kwargs)
    shapes = AttentionInputs(q, k, v)
    if decode is not None and q.shape[2] == 1 and k.shape[2] >= kwargs["min_seqlen"]:
        if k.shape[2] < sparse_decode_from(decode, decode_budgets, kwargs["min_seqlen"]):
            # the budget would read most of the cache: a dense step is cheaper (and equal to a full budget)
            out, layouts, names = _dense_result(q, k, v, bool(causal), scale)
            if stats is not None:
                stats["density"], stats["pattern"] = layouts.density().mean(0), list(names)
            return out
        out, selection, cache = decode_step(q, k, v, decode, decode_budgets, scale=scale, state=decode_state)
        if stats is not None:
            stats["density"] = head_density(selection, cache.seqlens, shapes.num_heads)  # on the device: no sync
            stats["pattern"] = [decode] * shapes.num_heads
        return out
    for key in ("decode", "decode_config"):
        kwargs.pop(key, None)
    if head_config is not None:
        if not m.mixture:
            raise ValueError(f"head_config: only the {MIXTURE!r} method takes per-head configs, not {method!r}")
        head_config = check_head_config(head_config, shapes.num_heads)
    out, layouts, names = _run_rows(m, q, k, v, causal=bool(causal), scale=scale, head_config=head_config, **kwargs)
    if stats is not None:
        stats["density"] = layouts.density().mean(0)
        stats["pattern"] = list(names)
        if recall:
            rows = sampled_rows(q.shape[2]) if q.shape[2] > RECALL_ALL_ROWS else None
            stats["recall"] = layouts.recall(q, k, scale, rows=rows).mean(0)
    return out
