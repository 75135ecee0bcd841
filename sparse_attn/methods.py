"""The methods registry: one name -> (estimator, sparse index, kernel, documented defaults).

Adapters (HF, vLLM), benchmarks and the profiler call only this module:

    out = sparse_attention(q, k, v, method="minference", causal=True, head_config=None, stats=None, **kwargs)

q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] (Hq a multiple of Hkv; views welcome). Every method takes
`min_seqlen`: with fewer queries than that the call is dense (torch SDPA), except "a_shape", which also
sparsifies short queries and decode (one query against a long cache) and goes dense only when the keys
are shorter than min_seqlen. On CUDA the sparse kernels run; elsewhere the fp32 reference with the same
sparse index, so everything works without a GPU (slowly).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from ._checks import warn_once
from . import dispatch
from .ops.reference import AttentionInputs
from .estimators.vertical_slash import check_share_heads
from .profiles import check_head_config

__all__ = [
    "Method",
    "sparse_attention",
    "get_method",
    "list_methods",
    "check_method_kwargs",
    "default_head_config",
    "register_method",
]

DEFAULT_MIN_SEQLEN = 1024


@dataclass(frozen=True)
class Method:
    """A registry entry. `run(q, k, v, *, causal, scale, head_config, **kwargs)` returns
    (out, dispatch.LayerPlan, patterns list[str]); `defaults` are the documented kwargs."""

    name: str
    summary: str
    defaults: Dict[str, Any]
    run: Callable = field(repr=False)
    kwarg_docs: Dict[str, str] = field(default_factory=dict, repr=False)
    pattern: Optional[str] = None  # the single pattern it runs, for the phase-by-phase benchmark

    def help(self) -> str:
        lines = [f"{self.name}: {self.summary}"]
        lines += [f"  {k}={self.defaults[k]!r}: {self.kwarg_docs.get(k, '')}" for k in self.defaults]
        return "\n".join(lines)


_REGISTRY: Dict[str, Method] = {}


def register_method(method: Method) -> Method:
    _REGISTRY[method.name] = method
    return method


def list_methods() -> List[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"method: unknown method {name!r}; expected one of {list_methods()}")
    return _REGISTRY[name]


def check_method_kwargs(name: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The method's defaults updated with `kwargs`; an unknown key is a TypeError listing the accepted ones."""
    method = get_method(name)
    unknown = sorted(set(kwargs) - set(method.defaults))
    if unknown:
        raise TypeError(f"method {name!r}: unexpected keyword argument(s) {unknown}; "
                        f"accepted: {sorted(method.defaults)}")
    merged = {**method.defaults, **kwargs}
    for key in ("min_seqlen", "block_size", "last_q"):
        if key in merged:
            value, low = merged[key], 0 if key == "min_seqlen" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"method {name!r}: {key} must be an int >= {low}, got {value!r}")
    return merged


def _dense_result(q, k, v, causal, scale):
    out = dispatch.dense_attention(q, k, v, causal=causal, scale=scale)
    return out, dispatch.LayerPlan(q.shape[0], q.shape[1], causal), ["dense"] * q.shape[1]


def _uniform(q, k, v, config, *, causal, scale, block_size, last_q=64, density=None, share_heads=1):
    """Every head with one pattern: one estimator call, one kernel launch, no head gathering."""
    pattern = config["pattern"]
    configs = [config] * q.shape[1]
    est = dispatch.estimate_pattern(pattern, q, k, configs, causal=causal, scale=scale, block_size=block_size,
                                    last_q=last_q, density=density, share_heads=share_heads)
    layout = dispatch.build_pattern(pattern, est, q, k, configs, block_size=block_size)
    out = dispatch.attend(q, k, v, layout, causal=causal, scale=scale)
    every = (list(range(q.shape[1])), list(range(k.shape[1])), layout)
    plan = dispatch.LayerPlan(q.shape[0], q.shape[1], causal, [every])
    return out, plan, [pattern] * q.shape[1]


def _needs_causal(name, q, k, v, causal, scale):
    warn_once(f"noncausal-{name}", f"sparse_attn: method {name!r} is defined for causal attention only; "
                                   "causal=False runs dense")
    return _dense_result(q, k, v, causal, scale)


def _run_dense(q, k, v, *, causal, scale, head_config, min_seqlen):
    return _dense_result(q, k, v, causal, scale)


def _run_a_shape(q, k, v, *, causal, scale, head_config, sink, window, block_size, min_seqlen):
    if k.shape[2] < min_seqlen:
        return _dense_result(q, k, v, causal, scale)
    if not causal:
        return _needs_causal("a_shape", q, k, v, causal, scale)
    return _uniform(q, k, v, {"pattern": "a_shape", "sink": sink, "window": window}, causal=causal,
                    scale=scale, block_size=block_size)


def _run_vertical_slash(q, k, v, *, causal, scale, head_config, vertical_size, slash_size, last_q, block_size,
                        share_heads, min_seqlen):
    check_share_heads(share_heads, q.shape[1], k.shape[1])  # a config that does not fit the model fails early
    if q.shape[2] < min_seqlen:
        return _dense_result(q, k, v, causal, scale)
    if not causal:
        return _needs_causal("vertical_slash", q, k, v, causal, scale)
    config = {"pattern": "vertical_slash", "vertical_size": vertical_size, "slash_size": slash_size}
    return _uniform(q, k, v, config, causal=causal, scale=scale, block_size=block_size, last_q=last_q,
                    share_heads=share_heads)


def _run_block_sparse(q, k, v, *, causal, scale, head_config, top_k, density, block_size, min_seqlen):
    if q.shape[2] < min_seqlen:
        return _dense_result(q, k, v, causal, scale)
    if top_k is not None and density is not None:
        raise ValueError("method 'block_sparse': pass top_k or density, not both")
    if top_k is None and density is None:
        density = 0.1
    config = {"pattern": "block_sparse", "top_k": top_k}
    return _uniform(q, k, v, config, causal=causal, scale=scale, block_size=block_size, density=density)


def default_head_config(num_heads: int, seqlen_k: int) -> List[Dict[str, Any]]:
    """The uniform vertical-slash config "minference" uses without a profile.

    MInference's 1000 vertical / 6096 slash is ~5-10% of the causal entries at 128K but nearly dense at
    4K-8K, so the budget scales with the key length and is capped there:
        vertical_size = clip(seqlen_k // 32, 64, 1000),  slash_size = clip(seqlen_k // 16, 128, 6096).
    At 8K that is 256 columns + 512 diagonals, at 32K 1000 + 2048, from ~98K on the MInference sizes.
    Measured on SmolLM2-135M-Instruct at 8K tokens of pydoc text (30 layers x 9 heads): mean density 0.32,
    mean attention recall 0.94 (layer 0, the most diffuse, 0.71).
    """
    vertical = min(1000, max(64, seqlen_k // 32))
    slash = min(6096, max(128, seqlen_k // 16))
    return [{"pattern": "vertical_slash", "vertical_size": vertical, "slash_size": slash}] * num_heads


def _run_minference(q, k, v, *, causal, scale, head_config, last_q, block_size, min_seqlen):
    if q.shape[2] < min_seqlen:
        return _dense_result(q, k, v, causal, scale)
    if not causal:
        return _needs_causal("minference", q, k, v, causal, scale)
    if head_config is None:
        warn_once("minference-default", "sparse_attn: 'minference' without a head profile uses a uniform "
                                        "vertical-slash config (see sparse_attn.methods.default_head_config)")
        head_config = default_head_config(q.shape[1], k.shape[2])
    out, plan = dispatch.run_head_config(q, k, v, head_config, causal=causal, scale=scale, block_size=block_size,
                                   last_q=last_q)
    return out, plan, [h["pattern"] for h in head_config]


_MIN_SEQLEN_DOC = "queries shorter than this run dense (SDPA)"
_BLOCK_DOC = "tokens per query/key block of the sparse index"

register_method(Method(
    "dense", "dense causal attention through torch SDPA (the baseline)",
    {"min_seqlen": DEFAULT_MIN_SEQLEN}, _run_dense, {"min_seqlen": "accepted for uniformity; no effect"},
))
register_method(Method(
    "a_shape", "StreamingLLM A-shape: sink tokens + local window, no estimation; also sparsifies decode",
    {"sink": 128, "window": 1024, "block_size": 64, "min_seqlen": DEFAULT_MIN_SEQLEN}, _run_a_shape,
    {"sink": "leading tokens every query keeps (rounded up to whole blocks)",
     "window": "most recent keys each query keeps (the blocks covering them)",
     "block_size": _BLOCK_DOC, "min_seqlen": "keys shorter than this run dense"},
    pattern="a_shape",
))
register_method(Method(
    "vertical_slash", "MInference vertical-slash: top key columns + top diagonals, estimated from the last queries",
    {"vertical_size": 1000, "slash_size": 6096, "last_q": 64, "block_size": 64, "share_heads": 1,
     "min_seqlen": DEFAULT_MIN_SEQLEN},
    _run_vertical_slash,
    {"vertical_size": "key columns kept per head (clipped to seqlen_k; the first 64 tokens always)",
     "slash_size": "diagonals kept per head (clipped to seqlen_k; offsets 0..63 always)",
     "last_q": "queries at the end of the input used to estimate", "block_size": "query rows per block of the index",
     "share_heads": "1: an index per head (MInference); n (dividing the GQA group): one per run of n query heads, "
                    "chosen from their summed scores; with an even n the kernel serves two heads per K/V stream "
                    "(faster; recall falls where the run's heads disagree)",
     "min_seqlen": _MIN_SEQLEN_DOC},
    pattern="vertical_slash",
))
register_method(Method(
    "block_sparse", "block top-k: mean-pooled q/k blocks, top key blocks per query block (diagonal + first kept)",
    {"top_k": None, "density": None, "block_size": 64, "min_seqlen": DEFAULT_MIN_SEQLEN}, _run_block_sparse,
    {"top_k": "key blocks per query block (>= 2: diagonal and first always kept)",
     "density": "or: fraction of each query block's visible key blocks; 0.1 when neither is given",
     "block_size": _BLOCK_DOC, "min_seqlen": _MIN_SEQLEN_DOC},
    pattern="block_sparse",
))
register_method(Method(
    "minference", "per-head mixture of the patterns above from a profile (head_config); uniform vertical-slash "
                  "without one",
    {"last_q": 64, "block_size": 64, "min_seqlen": DEFAULT_MIN_SEQLEN}, _run_minference,
    {"last_q": "queries used by the vertical-slash estimator", "block_size": _BLOCK_DOC,
     "min_seqlen": _MIN_SEQLEN_DOC},
))


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
    **method_kwargs,
) -> torch.Tensor:
    """One layer's attention through a named method; returns out [B, Hq, Sq, D] in q's dtype.

    head_config: per-query-head dicts for this layer (see sparse_attn.profiles), "minference" only.
    stats: if a dict, receives "density" (float64 [Hq]: computed / causal entries, mean over the batch)
    and "pattern" (list of Hq pattern names); with recall=True also "recall" (float64 [Hq], mean over the
    batch: the share of the dense attention mass the layouts kept, sparse_attn.recall; a slow diagnostic
    that scores every query against every key, in chunks). Method kwargs: see get_method(name).help().
    """
    m = get_method(method)
    kwargs = check_method_kwargs(method, method_kwargs)
    shapes = AttentionInputs(q, k, v)
    if head_config is not None:
        if method != "minference":
            raise ValueError(f"head_config: only the 'minference' method takes per-head configs, not {method!r}")
        head_config = check_head_config(head_config, shapes.num_heads)
    out, plan, patterns = m.run(q, k, v, causal=bool(causal), scale=scale, head_config=head_config, **kwargs)
    if stats is not None:
        stats["density"] = plan.density().mean(0)
        stats["pattern"] = list(patterns)
        if recall:
            stats["recall"] = plan.recall(q, k, scale).mean(0)
    return out


def _check_runners() -> None:
    """Every registry entry's runner takes exactly its documented kwargs (a guard against drift)."""
    for m in _REGISTRY.values():
        params = set(inspect.signature(m.run).parameters) - {"q", "k", "v", "causal", "scale", "head_config"}
        assert params == set(m.defaults), (m.name, params, set(m.defaults))


_check_runners()
