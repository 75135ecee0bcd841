"""What the tests share: random inputs, random layouts, the tolerance rule, output poisoning, and the checks of
the method matrix (a test that registers its own pattern calls the very same checks).

tests/conftest.py puts this folder on sys.path: `import helpers` / `from helpers import ...` from any test.

- inputs: `generator`, `randn`, `qkv`, `packed_qkv`, `cu_seqlens`: fresh standard-normal tensors (never zeros)
  drawn on the CPU from a seeded generator (the same values on every device), then cast and moved;
- layouts: `random_layout(BlockLayout | VerticalSlashLayout, gen, batch, heads, seqlen_q, seqlen_k,
  block_size, ...)`;
- the tolerance rule (flash-attention's): `assert_close`, `check_attention`, `FLOOR`, `LSE_ATOL`;
- poisoning: `poison_` (one tensor), `poison` (every tensor an allocator returns), `poison_kernel_outputs` (all
  kernel allocators; the `poisoned_outputs` fixture of conftest.py);
- launch counts: `count_launches` (Triton kernels replaced by counting stand-ins, `Launches`);
- the method matrix: `full_budget`, `smallest_budget`, `has_prefill`, `prefill_patterns`,
  `patterns_with_full_budget`, `full_budget_head_config`, `check_method_against_reference`,
  `check_full_budget_is_dense`.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, Dict, List, Optional, Sequence

import pytest
import torch

import sparse_attn  # noqa: F401  (registers the built-in patterns)
from sparse_attn import methods
from sparse_attn.layouts import BlockLayout, VerticalSlashLayout
from sparse_attn.ops.reference import reference_attention
from sparse_attn.patterns import DENSE, get_pattern, list_patterns

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# ------------------------------------------------------------------------------------------------- inputs


def generator(seed) -> torch.Generator:
    """A CPU generator seeded with `seed` (a generator is returned as it is)."""
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))


def randn(gen, *shape, dtype=torch.float32, device=DEV, scale: float = 1.0) -> torch.Tensor:
    """Standard-normal values (times scale) drawn on the CPU from `gen` (a generator or a seed), then cast to
    dtype and moved to device."""
    x = torch.randn(*shape, generator=generator(gen), dtype=torch.float32)
    if scale != 1.0:
        x = x * scale
    return x.to(device=device, dtype=dtype)


def qkv(gen, b: int = 1, hq: int = 4, hkv: int = 2, sq: int = 200, sk: Optional[int] = None, d: int = 32, *,
        dtype=torch.float32, device=DEV, hf: bool = False):
    """q [b, hq, sq, d], k and v [b, hkv, sk, d] (sk defaults to sq). hf=True: [B, H, S, D] views of
    [B, S, H, D] memory, as Hugging Face hands them over (k and v interleaved in one tensor, so neither is
    contiguous)."""
    sk = sq if sk is None else sk
    gen = generator(gen)
    if hf:
        q = randn(gen, b, sq, hq, d, dtype=dtype, device=device).transpose(1, 2)
        kv = randn(gen, b, sk, 2, hkv, d, dtype=dtype, device=device)
        return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    q = randn(gen, b, hq, sq, d, dtype=dtype, device=device)
    k = randn(gen, b, hkv, sk, d, dtype=dtype, device=device)
    v = randn(gen, b, hkv, sk, d, dtype=dtype, device=device)
    return q, k, v


def cu_seqlens(lengths: Sequence[int], device=DEV) -> torch.Tensor:
    """int32 [len + 1] cumulative lengths, starting at 0."""
    return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)


def packed_qkv(gen, lens_q: Sequence[int], lens_k: Sequence[int], hq: int = 4, hkv: int = 2, d: int = 32, *,
               dtype=torch.float32, device=DEV):
    """Packed varlen inputs: q [sum(lens_q), hq, d], k and v [sum(lens_k), hkv, d], cu_seqlens_q, cu_seqlens_k."""
    gen = generator(gen)
    q = randn(gen, sum(lens_q), hq, d, dtype=dtype, device=device)
    k = randn(gen, sum(lens_k), hkv, d, dtype=dtype, device=device)
    v = randn(gen, sum(lens_k), hkv, d, dtype=dtype, device=device)
    return q, k, v, cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)


# ------------------------------------------------------------------------------------------------ layouts


def random_layout(kind, gen, batch: int, heads: int, seqlen_q: int, seqlen_k: int, block_size: int, *,
                  device=DEV, **options):
    """A random layout of type `kind` (BlockLayout or VerticalSlashLayout) for `heads` query heads.

    BlockLayout (query blocks of block_size rows): block_size_k (default block_size); density: each key block
    kept with this probability (0.5); causal: nothing past a query block's causal diagonal (True); diagonal:
    the diagonal key block (the last one the block's rows may see) always kept, where the block sees any (True).
    VerticalSlashLayout, one of two kinds:
    - from random key columns and diagonals through the index builder, as the estimator makes them:
      verticals (9) columns; slashes (6) diagonals, `near` of them (half, rounded up) among the near_width
      (4 * block_size) nearest the main one (they merge), the others anywhere; shared (0) more diagonals
      common to each run of `group` (1) heads, as the heads of a GQA group share most of theirs; backend of
      the builder (torch on the CPU: the same layout as the others);
    - widths=[...]: per block up to max_ranges (6) key ranges along the keys with widths drawn from `widths`
      and random gaps (0 included: touching ranges), plus up to `columns` (5) key columns outside them.
    """
    gen = generator(gen)
    if kind is BlockLayout:
        return _random_block_layout(gen, batch, heads, seqlen_q, seqlen_k, block_size, device=device, **options)
    if kind is VerticalSlashLayout:
        if options.get("widths") is not None:
            return _random_ranges_layout(gen, batch, heads, seqlen_q, seqlen_k, block_size, device=device, **options)
        return _random_diagonals_layout(gen, batch, heads, seqlen_q, seqlen_k, block_size, device=device, **options)
    raise TypeError(f"kind: expected BlockLayout or VerticalSlashLayout, got {kind!r}")


def _random_block_layout(gen, batch, heads, sq, sk, bq, *, block_size_k=None, density=0.5, causal=True,
                         diagonal=True, device=DEV):
    bk = bq if block_size_k is None else block_size_k
    nq, nk = math.ceil(sq / bq), math.ceil(sk / bk)
    mask = torch.rand(batch, heads, nq, nk, generator=gen) < density
    q_last = (torch.arange(nq) * bq + bq).clamp(max=sq) - 1 + (sk - sq)
    diag = torch.div(q_last, bk, rounding_mode="floor")  # -1: the block sees no key
    key_blocks = torch.arange(nk)
    if causal:
        mask &= key_blocks[None, :] <= diag[:, None]
    if diagonal:
        mask |= (key_blocks[None, :] == diag[:, None]) & (diag >= 0)[:, None]
    return BlockLayout.from_block_mask(mask.to(device), bq, bk, sq, sk)


def _random_diagonals_layout(gen, batch, heads, sq, sk, bq, *, verticals=9, slashes=6, near=None, near_width=None,
                             shared=0, group=1, backend=None, device=DEV):
    from sparse_attn.estimators.vertical_slash import build_vertical_slash_index

    near = slashes - slashes // 2 if near is None else near
    near_width = 4 * bq if near_width is None else near_width
    vertical = torch.randint(0, sk, (batch, heads, verticals), generator=gen)
    near = torch.randint(0, max(1, min(sk, near_width)), (batch, heads, near), generator=gen)
    far = torch.randint(0, sk, (batch, heads, slashes - near.shape[-1]), generator=gen)
    parts = [near, far]
    if shared:
        common = torch.randint(0, sk, (batch, heads // group, 1, shared), generator=gen)
        parts.insert(0, common.expand(-1, -1, group, -1).reshape(batch, heads, shared))
    slash = torch.cat(parts, -1)
    backend = backend or ("torch" if torch.device(device).type == "cpu" else "auto")
    return build_vertical_slash_index(vertical.to(device), slash.to(device), sq, sk, bq, backend=backend)


def _random_ranges_layout(gen, batch, heads, sq, sk, bq, *, widths, columns=5, max_ranges=6, device=DEV):
    nqb = -(-sq // bq)
    starts, ends, counts, cols, ccounts = [], [], [], [], []

    def draw(n):
        return int(torch.randint(0, n, (1,), generator=gen))

    for _ in range(batch * heads * nqb):
        pos, rs, re_ = draw(40), [], []
        for _ in range(draw(max_ranges + 1)):
            w = widths[draw(len(widths))]
            if pos + w > sk:
                break
            rs.append(pos)
            re_.append(pos + w)
            pos += w + draw(3) * draw(50)
        starts.append(rs)
        ends.append(re_)
        counts.append(len(rs))
        covered = torch.zeros(sk, dtype=torch.bool)
        for a, e in zip(rs, re_):
            covered[a:e] = True
        free = (~covered).nonzero().flatten()
        c = free[torch.randperm(len(free), generator=gen)[:columns]].sort().values
        cols.append(c.tolist())
        ccounts.append(len(c))

    def pad(rows, width):
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32).view(batch, heads, nqb,
                                                                                                 width)

    mr, mc = max(1, max(counts)), max(1, max(ccounts))
    shape = (batch, heads, nqb)
    layout = VerticalSlashLayout(torch.tensor(counts, dtype=torch.int32).view(shape), pad(starts, mr), pad(ends, mr),
                                 torch.tensor(ccounts, dtype=torch.int32).view(shape), pad(cols, mc), bq, sq, sk)
    return layout.to(device)


# ------------------------------------------------------------------------------------- the tolerance rule

# The absolute floor of the rule, by the dtype of the output.
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Log-sum-exp (float32 for every input dtype): absolute tolerance by the inputs' dtype.
LSE_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(out: torch.Tensor, ref: torch.Tensor, low: Optional[torch.Tensor] = None, *,
                 floor: Optional[float] = None) -> None:
    """Flash-attention's rule: max |out - ref| <= 2 * max |low - ref| + floor.

    ref: the high-precision reference (fp32 attention, or the model in fp64); low: the same reference computed
    in the inputs' own low precision (None: the inputs are in the reference's precision, so its error is 0);
    floor: FLOOR[out.dtype] unless given."""
    floor = FLOOR[out.dtype] if floor is None else floor
    err = max_error(out, ref)
    low_err = 0.0 if low is None else max_error(low, ref)
    assert err <= 2 * low_err + floor, f"max error {err:.3g}, low-precision reference's {low_err:.3g}, floor {floor}"


def check_attention(attention, q, k, v, layout, *, causal: bool = True, scale: Optional[float] = None,
                    cu_seqlens_q=None, cu_seqlens_k=None, floor: Optional[float] = None, **kwargs):
    """attention(q, k, v, layout, return_lse=True, ...) against reference_attention with the same layout:
    every element of out and lse written (run with the `poisoned_outputs` fixture), out within the rule
    (assert_close, the low-precision reference being reference_attention(upcast=False)), lse -inf exactly where
    the reference's is (rows that see no key) and within LSE_ATOL elsewhere. kwargs (e.g. plan=) go to
    attention only. Returns (out, lse)."""
    kw = dict(causal=causal, scale=scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    out, lse = attention(q, k, v, layout, return_lse=True, **kw, **kwargs)
    ref, ref_lse = reference_attention(q, k, v, layout, return_lse=True, **kw)
    low = reference_attention(q, k, v, layout, upcast=False, **kw)
    assert not out.isnan().any(), "an element of out was never written"
    assert not lse.isnan().any(), "an element of lse was never written"
    assert_close(out, ref, low, floor=floor)
    assert torch.equal(lse.isinf(), ref_lse.isinf()), "rows without keys must have lse -inf, the others finite"
    finite = ~ref_lse.isinf()
    assert torch.allclose(lse[finite], ref_lse[finite], atol=LSE_ATOL[q.dtype]), max_error(lse[finite],
                                                                                           ref_lse[finite])
    return out, lse


# ------------------------------------------------------------------------------------------------ poisoning

POISON_INT = -7


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill t with garbage in place (NaN for floating dtypes, POISON_INT for integers) and return it."""
    return t.fill_(float("nan") if t.is_floating_point() else POISON_INT)


def _poison_all(value) -> None:
    if isinstance(value, torch.Tensor):
        poison_(value)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _poison_all(v)


def poison(monkeypatch, owner, name: str) -> None:
    """Wrap the allocator owner.name (a module or an object) so every tensor it returns comes back poisoned:
    an element a kernel forgets to write then fails the comparison instead of passing by luck."""
    real = getattr(owner, name)

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        _poison_all(result)
        return result

    monkeypatch.setattr(owner, name, poisoned)


# Where the kernels take their outputs: attention out / lse of both families, the vertical-slash index.
KERNEL_ALLOCATORS = (("sparse_attn.ops.block_sparse.kernel", "_outputs"),
                     ("sparse_attn.ops.vertical_slash", "_alloc_outputs"),
                     ("sparse_attn.estimators.vertical_slash.index", "_outputs"))


def poison_kernel_outputs(monkeypatch) -> None:
    """Poison every allocator in KERNEL_ALLOCATORS (padding past a layout's counts is poisoned too: no consumer
    may read it)."""
    for module, name in KERNEL_ALLOCATORS:
        poison(monkeypatch, importlib.import_module(module), name)


# ------------------------------------------------------------------------------------------ launch counts


class Launches:
    """Stands in for a Triton kernel: records the grid of each launch (kernel[grid](...)) and passes the launch
    and every attribute on to the kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]

    def __getattr__(self, name):
        return getattr(self.kernel, name)


def count_launches(monkeypatch, module, *names: str) -> Dict[str, list]:
    """Replace module's kernels `names` by Launches; returns {name: the list of their launches' grids}."""
    out = {}
    for name in names:
        counter = Launches(getattr(module, name))
        monkeypatch.setattr(module, name, counter)
        out[name] = counter.grids
    return out


# -------------------------------------------------------------------------------------- the method matrix


def full_budget(pattern: str, seqlen_q: int, seqlen_k: int, block_size: int = 64) -> Optional[Dict[str, Any]]:
    """The pattern's budgets that keep every causal entry (Pattern.full_budget), or None where it has none."""
    fb = get_pattern(pattern).full_budget
    return None if fb is None else dict(fb(seqlen_q, seqlen_k, block_size))


def smallest_budget(pattern: str, seqlen: int, block_size: int = 64) -> Dict[str, Any]:
    """The sparsest entry of the pattern's sweep (its candidates where it has no sweep) at this length; its
    budgets' defaults where it has neither."""
    p = get_pattern(pattern)
    grid = (p.sweep or p.candidates)(seqlen, block_size)
    return dict(grid[0]) if grid else {b.name: b.default for b in p.budgets}


def has_prefill(pattern: str) -> bool:
    """Whether the pattern has a prefill side (builds a layout); a decode-only pattern prefills dense."""
    return getattr(get_pattern(pattern), "prefill", True)


def prefill_patterns() -> List[str]:
    """The registered patterns with a prefill side: those a head config may name."""
    return [name for name in list_patterns() if has_prefill(name)]


def patterns_with_full_budget() -> List[str]:
    """The prefill patterns that have a full budget."""
    return [name for name in prefill_patterns() if get_pattern(name).full_budget is not None]


def full_budget_head_config(num_heads: int, seqlen_q: int, seqlen_k: int, block_size: int = 64, *,
                            shift: int = 0) -> List[Dict[str, Any]]:
    """A mixture's head dicts: every registered prefill pattern that has a full budget, at it, then dense,
    repeated over num_heads heads (starting `shift` entries in)."""
    entries = [{"pattern": p, **full_budget(p, seqlen_q, seqlen_k, block_size)} for p in patterns_with_full_budget()]
    entries.append({"pattern": DENSE})
    return [dict(entries[(h + shift) % len(entries)]) for h in range(num_heads)]


def _select(t: torch.Tensor, ids) -> torch.Tensor:
    return t.index_select(1, torch.tensor(list(ids), device=t.device))


def check_method_against_reference(method: str, q, k, v, *, causal: bool = True, scale: Optional[float] = None,
                                   head_config=None, floor: Optional[float] = None, replan: Optional[bool] = None,
                                   **kwargs):
    """sparse_attention(q, k, v, method, ...) equals reference_attention on the layouts the method reports
    (a prefill call: a one-query call that a decode side serves reports pages, not layouts).

    One public call (kwargs: the method's, min_seqlen=0 unless given) whose registry entry's report
    (Method.run: out, dispatch.LayerLayouts, pattern names) is recorded; then
    - every head of a reported layout equals the fp32 reference over that layout (its query heads and kv
      heads), every other head is named "dense" and equals dense attention (causal as given), within the
      tolerance rule (assert_close; the low-precision reference the same with upcast=False);
    - stats: "pattern" the reported names, "density" the layouts' (mean over the batch), in [0, 1];
    - replan (default: on the CPU, where estimation is deterministic), for a uniform method: the pattern's
      phases again (dispatch.estimate_pattern, then build_pattern) give the same index.
    Returns (out, layouts: dispatch.LayerLayouts, stats)."""
    from sparse_attn import dispatch

    kwargs.setdefault("min_seqlen", 0)
    recorded = []
    real_get = methods.get_method

    def recording_get(name):
        m = real_get(name)

        def run(*a, **kw):
            result = m.run(*a, **kw)
            recorded.append(result)
            return result

        return dataclasses.replace(m, run=run)

    stats: Dict[str, Any] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(methods, "get_method", recording_get)
        out = methods.sparse_attention(q, k, v, method, causal=causal, scale=scale, head_config=head_config,
                                       stats=stats, **kwargs)
    assert len(recorded) == 1, "the method's prefill side did not run (a decode call?)"
    ((ran, layouts, names),) = recorded
    assert ran is out
    hq = q.shape[1]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert stats["pattern"] == list(names) and len(names) == hq
    assert torch.equal(stats["density"], layouts.density().mean(0))
    assert ((stats["density"] >= 0) & (stats["density"] <= 1 + 1e-12)).all()

    ref = reference_attention(q, k, v, causal=causal, scale=scale)
    low = reference_attention(q, k, v, causal=causal, scale=scale, upcast=False)
    sparse_heads = set()
    for heads, kv_heads, layout in layouts.parts:
        assert not sparse_heads & set(heads), "a head in two layouts"
        sparse_heads |= set(heads)
        assert all(names[h] != DENSE for h in heads)
        qh, kh, vh = _select(q, heads), _select(k, kv_heads), _select(v, kv_heads)
        idx = torch.tensor(heads, device=q.device)
        ref.index_copy_(1, idx, reference_attention(qh, kh, vh, layout, causal=causal, scale=scale))
        low.index_copy_(1, idx, reference_attention(qh, kh, vh, layout, causal=causal, scale=scale, upcast=False))
    assert all(names[h] == DENSE for h in range(hq) if h not in sparse_heads)
    assert_close(out, ref, low, floor=floor)

    m = methods.get_method(method)
    if m.pattern is not None and (not q.is_cuda if replan is None else replan) and layouts.parts:
        ((_, _, layout),) = layouts.parts
        merged = methods.check_method_kwargs(method, kwargs)
        p = get_pattern(m.pattern)
        configs = [{"pattern": p.name, **{n: merged[n] for n in p.budget_names}}] * hq
        options = {o.name: merged[o.name] for o in p.options}
        est = dispatch.estimate_pattern(p.name, q, k, configs, causal=causal, scale=scale,
                                        block_size=merged["block_size"], **options)
        again = dispatch.build_pattern(p.name, est, q, k, configs, causal=causal, block_size=merged["block_size"],
                                       **options)
        assert type(again) is type(layout)
        assert torch.equal(again.to_dense(), layout.to_dense())
    return out, layouts, stats


def check_full_budget_is_dense(name: str, q, k, v, *, causal: bool = True, block_size: int = 64,
                               floor: Optional[float] = None, **options):
    """Method `name` at full budget equals dense attention (reference_attention without a layout, within the
    tolerance rule) and reports density 1 for every head:
    - a pattern: its uniform method at full_budget(name, Sq, Sk, block_size) (the test skips where the pattern
      has none; a decode-only pattern prefills dense);
    - the per-head mixture ("minference"): full_budget_head_config (every pattern at full budget, and dense);
    - "dense": itself.
    options: more method kwargs (e.g. last_q). Returns the stats dict."""
    sq, sk, hq = q.shape[2], k.shape[2], q.shape[1]
    kwargs: Dict[str, Any] = dict(options)
    head_config = None
    if name == methods.MIXTURE:
        head_config = full_budget_head_config(hq, sq, sk, block_size)
    elif name != DENSE:
        budget = full_budget(name, sq, sk, block_size)
        if budget is None:
            pytest.skip(f"pattern {name!r} has no full budget")
        kwargs.update(budget)
    if name != DENSE:
        kwargs["block_size"] = block_size
    stats: Dict[str, Any] = {}
    out = methods.sparse_attention(q, k, v, name, causal=causal, head_config=head_config, stats=stats,
                                   min_seqlen=0, **kwargs)
    ref = reference_attention(q, k, v, causal=causal)
    low = reference_attention(q, k, v, causal=causal, upcast=False)
    assert_close(out, ref, low, floor=floor)
    assert torch.allclose(stats["density"], torch.ones(hq, dtype=torch.float64)), stats["density"]
    assert len(stats["pattern"]) == hq
    runs_dense = name == DENSE or (name != methods.MIXTURE and not has_prefill(name)) or (
        not causal and (name == methods.MIXTURE or get_pattern(name).causal_only))
    if runs_dense:  # non-causal calls of causal-only methods run dense
        assert stats["pattern"] == [DENSE] * hq
    elif head_config is not None:
        assert stats["pattern"] == [h["pattern"] for h in head_config]
    else:
        assert stats["pattern"] == [name] * hq
    return stats
