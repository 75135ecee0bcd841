"""The pattern registry: one entry per sparse pattern, and everything else reads the entries.

A pattern is the unit of the code: its own module under `sparse_attn/estimators/` (estimator and index
builder) plus one `register_pattern(Pattern(...))` there. From the entry alone the package derives

- the uniform method of the same name (`sparse_attention(..., method=name)`, `patch(model, name)`),
- per-head dispatch inside the "minference" mixture (`{"pattern": name, <budgets>}` head dicts),
- profile validation (the typed budgets), the profiler's candidates and cost model, the benchmarks'
  method list and the method-matrix tests (the full budget must equal dense attention).

A toy pattern, registered from anywhere:

    register_pattern(Pattern(
        name="first_and_diagonal", summary="the first and the diagonal key block", layout=MyLayout,
        build=lambda estimate, q, k, budgets, *, causal, block_size: my_layout(q, k, block_size),
        candidates=lambda seqlen, block_size: [{}]))
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    "Param",
    "Pattern",
    "register_pattern",
    "unregister_pattern",
    "get_pattern",
    "list_patterns",
    "patterns",
    "DENSE",
    "DENSE_TFLOPS",
    "check_budget_head",
    "mixture_default",
    "all_options",
]

# The head-config name of dense attention (not a pattern: no layout, no estimator).
DENSE = "dense"
# Effective throughput of dense attention, the unit of the profiler's time cost: cuDNN causal on the lent
# H100 (bf16, head dim 128) ran at 526-596 TFLOP/s at 8K-128K (2026-11-23).
DENSE_TFLOPS = 550.0

_KINDS = (int, float)


@dataclass(frozen=True)
class Param:
    """A typed keyword of a pattern: `kind` int or float, bounds [low, high] (high None: unbounded),
    `optional`: None is accepted (the pattern decides what it means)."""

    name: str
    kind: type
    default: Any
    low: float
    high: Optional[float] = None
    doc: str = ""
    optional: bool = False

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise TypeError(f"Param {self.name!r}: kind must be int or float, got {self.kind!r}")
        if self.default is not None or not self.optional:
            self.check(self.default, f"Param {self.name!r} default")

    def check(self, value, where: str = "") -> Any:
        """value as the kind (an int stays an int; a float budget accepts ints), or a ValueError naming it."""
        where = f"{where}: " if where else ""
        if value is None and self.optional:
            return None
        bounds = f">= {self.low}" if self.high is None else f"in [{self.low}, {self.high}]"
        ok_type = (isinstance(value, int) if self.kind is int else isinstance(value, (int, float)))
        if isinstance(value, bool) or not ok_type or (self.kind is float and not math.isfinite(value)):
            raise ValueError(f"{where}{self.name!r} must be {'an int' if self.kind is int else 'a float'} {bounds}, "
                             f"got {value!r}")
        if value < self.low or (self.high is not None and value > self.high):
            raise ValueError(f"{where}{self.name!r} must be {'an int' if self.kind is int else 'a float'} {bounds}, "
                             f"got {value!r}")
        return self.kind(value)


def _no_cost(seqlen: int, **options) -> float:
    return 0.0


def _no_check(options: Mapping[str, Any], num_heads: int, num_kv_heads: int) -> None:
    return None


@dataclass(frozen=True)
class Pattern:
    """One sparse pattern: a prefill side (an index over query blocks), a decode side (pages of a paged KV
    cache for one query), or both.

    name, summary: the registry key (also the uniform method's name) and a one-line description.
    layout: the Layout subclass `build` returns (the kernel family follows from it, see sparse_attn.ops).
    budgets: typed Params (per head in prefill profiles; one value per call in its own method and in decode).
    options: per-call Params shared by all heads (e.g. how many queries the estimator reads).
    estimate(q, k, budgets, *, causal, scale, block_size, **options) -> estimate, or None: no estimation.
        budgets: {name: float64 or int64 tensor [Hq]} (None for an optional budget left unset).
    build(estimate, q, k, budgets, *, causal, block_size, **options) -> layout over q's heads; None for a
        decode-only pattern (its method prefills dense).
    select(q [B, Hq, D], cache, summaries, *, scale, **budgets_and_options) -> PageSelection: the decode
        side (None: the pattern does not serve decode); scale: the attention's softmax scale (None: D ** -0.5); `summaries`: whether it reads PageSummaries (else None is passed);
        decode_page_size: the pages it reads a contiguous (Hugging Face) cache in.
        decode_reads(page_size, **budgets) -> the most tokens a decode step reads under these budgets (None:
        unknown); a contiguous cache decodes dense until it holds sparse_attn.decode.DECODE_MIN_RATIO times that.
    full_budget(seqlen_q, seqlen_k, block_size) -> budgets under which the pattern keeps every causal
        entry (the method then equals dense attention), or None where no budget does.
    candidates(seqlen, block_size) -> the profiler's budget grid at a profiling length (prefill patterns).
    sweep(seqlen, block_size) -> budgets from sparse to dense, one dimension (frontiers, comparisons).
    estimator_cost(seqlen, *, block_size, **options) -> the estimator's FLOPs relative to dense causal
        attention's (2 * D * seqlen^2); speed_tflops: the kernel's effective rate (profiler time cost).
    check_model(options, num_heads, num_kv_heads): raise where the options do not fit the model.
    causal_only: non-causal calls run dense (with a warning).
    normalize(kwargs) -> kwargs: resolve interdependent method kwargs (e.g. "one of top_k or density").
    layouts(q, k, configs, *, causal, scale, block_size, **options) -> one layout per budget dict, all
        heads sharing it: the profiler's batch of candidates (default: estimate + build per config).
    rows(estimate, r0, r1, seqlen_q, seqlen_k) -> the estimate of a whole call (seqlen_q queries, seqlen_k keys)
        for its query rows [r0, r1) as the last rows of keys [0, r1 + seqlen_k - seqlen_q): where a pattern
        has it, a call run in row chunks estimates once and builds each chunk's index from this (the same
        index rows as one call); else each chunk is estimated from its own queries.
    mixture_default(seqlen_k) -> a head dict: the head config the "minference" mixture uses without a
        profile (at most one pattern sets it).
    minference(name, vertical, slash) -> head dict: reading MInference's per-head config files
        (`minference_name` is their name of this pattern).
    color: the profiler plots' colour.
    """

    name: str
    summary: str
    layout: Optional[type] = None
    build: Optional[Callable] = None
    budgets: Tuple[Param, ...] = ()
    options: Tuple[Param, ...] = ()
    estimate: Optional[Callable] = None
    full_budget: Optional[Callable[[int, int, int], Dict[str, Any]]] = None
    candidates: Callable[[int, int], List[Dict[str, Any]]] = field(default=lambda seqlen, block_size: [])
    sweep: Optional[Callable[[int, int], List[Dict[str, Any]]]] = None
    estimator_cost: Callable[..., float] = _no_cost
    speed_tflops: float = 450.0
    check_model: Callable[[Mapping[str, Any], int, int], None] = _no_check
    select: Optional[Callable] = None
    summaries: bool = False
    decode_page_size: int = 64
    decode_reads: Optional[Callable[..., int]] = None
    causal_only: bool = True
    normalize: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None
    layouts: Optional[Callable] = None
    rows: Optional[Callable] = None
    mixture_default: Optional[Callable[[int], Dict[str, Any]]] = None
    minference_name: Optional[str] = None
    minference: Optional[Callable[[int, int], Dict[str, Any]]] = None
    color: str = "tab:gray"

    def __post_init__(self):
        if not self.name or not self.name.isidentifier() or self.name == DENSE:
            raise ValueError(f"name: expected an identifier other than {DENSE!r}, got {self.name!r}")
        if self.build is None and self.select is None:
            raise ValueError(f"pattern {self.name!r}: expected a build (prefill), a select (decode) or both")
        if self.build is not None and not isinstance(self.layout, type):
            raise ValueError(f"pattern {self.name!r}: layout must name the Layout type build returns")
        names = [p.name for p in self.budgets + self.options]
        if len(set(names)) != len(names) or {"block_size", "min_seqlen"} & set(names):
            raise ValueError(f"pattern {self.name!r}: budget and option names must be unique and not "
                             f"block_size / min_seqlen (every method has those), got {names}")

    @property
    def prefill(self) -> bool:
        return self.build is not None

    @property
    def decode(self) -> bool:
        return self.select is not None

    @property
    def budget_names(self) -> Tuple[str, ...]:
        return tuple(p.name for p in self.budgets)

    def defaults(self) -> Dict[str, Any]:
        return {p.name: p.default for p in self.budgets + self.options}

    def check_head(self, head: Mapping[str, Any], where: str) -> Dict[str, Any]:
        """A profile's head dict: every budget present and valid (optional ones may not be left out)."""
        out = dict(head)
        for p in self.budgets:
            if head.get(p.name) is None:
                raise ValueError(f"{where}: pattern {self.name!r} needs the key {p.name!r} ({p.kind.__name__})")
            out[p.name] = p.check(head[p.name], where)
        return out

    def budget_tensors(self, configs: Sequence[Mapping[str, Any]]) -> Dict[str, Optional[torch.Tensor]]:
        """{budget: tensor [len(configs)]} (int64 or float64) from head dicts; None where a budget is unset."""
        out: Dict[str, Optional[torch.Tensor]] = {}
        for p in self.budgets:
            values = [c.get(p.name) for c in configs]
            if all(v is None for v in values):
                out[p.name] = None
                continue
            dtype = torch.int64 if p.kind is int else torch.float64
            out[p.name] = torch.tensor([p.kind(v) for v in values], dtype=dtype)
        return out

    def run_options(self, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
        """The pattern's options out of a method's kwargs (their defaults where absent)."""
        return {p.name: kwargs.get(p.name, p.default) for p in self.options}

    def make_layouts(self, q, k, configs: Sequence[Mapping[str, Any]], *, causal: bool, scale, block_size: int,
                     **options) -> list:
        """One layout per budget dict in configs, every head of q with that budget."""
        if not self.prefill:
            raise ValueError(f"pattern {self.name!r} has no prefill side (no layout to build)")
        if self.layouts is not None:
            return self.layouts(q, k, configs, causal=causal, scale=scale, block_size=block_size, **options)
        out = []
        for cfg in configs:
            budgets = self.budget_tensors([cfg] * q.shape[1])
            est = None
            if self.estimate is not None:
                est = self.estimate(q, k, budgets, causal=causal, scale=scale, block_size=block_size, **options)
            out.append(self.build(est, q, k, budgets, causal=causal, block_size=block_size, **options))
        return out


_REGISTRY: Dict[str, Pattern] = {}


def register_pattern(pattern: Pattern, *, replace: bool = False) -> Pattern:
    """Add a pattern; its name must be new unless replace=True. Returns the pattern."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern: expected a Pattern, got {type(pattern).__name__}")
    if pattern.name in _REGISTRY and not replace:
        raise ValueError(f"pattern: {pattern.name!r} is already registered (pass replace=True to replace it)")
    if pattern.mixture_default is not None:
        others = [p.name for p in _REGISTRY.values() if p.mixture_default is not None and p.name != pattern.name]
        if others:
            raise ValueError(f"pattern {pattern.name!r}: mixture_default is already set by {others[0]!r}")
    _REGISTRY[pattern.name] = pattern
    return pattern


def unregister_pattern(name: str) -> None:
    _REGISTRY.pop(name, None)


def list_patterns() -> List[str]:
    return sorted(_REGISTRY)


def patterns() -> List[Pattern]:
    return [_REGISTRY[n] for n in list_patterns()]


def get_pattern(name: str) -> Pattern:
    if name not in _REGISTRY:
        raise ValueError(f"pattern: unknown pattern {name!r}; expected one of {list_patterns() + [DENSE]}")
    return _REGISTRY[name]


def check_budget_head(head: Any, where: str) -> Dict[str, Any]:
    """Validate one head dict of a profile: {"pattern": name, <its budgets>} or {"pattern": "dense"};
    `where` (e.g. "layer 3, head 5") prefixes every error. Extra keys are kept."""
    if not isinstance(head, dict):
        raise TypeError(f"{where}: expected a dict with a 'pattern' key, got {type(head).__name__}")
    name = head.get("pattern")
    if name == DENSE:
        return head
    prefill = [p.name for p in patterns() if p.prefill]
    if name not in prefill:
        raise ValueError(f"{where}: 'pattern' must be one of {prefill + [DENSE]} (patterns with a prefill side), "
                         f"got {name!r}")
    return _REGISTRY[name].check_head(head, where)


def all_options() -> Dict[str, Param]:
    """Every registered pattern's per-call options by name (the first pattern to declare a name wins): what
    a call over a mix of patterns (the mixture method, the profiler) accepts."""
    out: Dict[str, Param] = {}
    for p in patterns():
        for o in p.options:
            out.setdefault(o.name, o)
    return out


def mixture_default(seqlen_k: int) -> Dict[str, Any]:
    """The head dict the mixture method uses for every head without a profile."""
    for p in patterns():
        if p.mixture_default is not None:
            return {"pattern": p.name, **p.mixture_default(seqlen_k)}
    return {"pattern": DENSE}
