"""A pattern registered in a test, in a few lines, reaches every entry point with no edit elsewhere:
sparse_attention(method=...), the per-head mixture, patch(model, ...), profiles, the profiler's candidates
and the methods benchmark; and the registry refuses malformed entries with errors that name the field."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

import sparse_attn
from helpers import check_method_against_reference, qkv
from sparse_attn import BlockLayout, Param, Pattern, register_pattern, unregister_pattern
from sparse_attn.methods import check_method_kwargs, get_method, list_methods, sparse_attention
from sparse_attn.ops.reference import reference_attention
from sparse_attn.patterns import check_budget_head, get_pattern, list_patterns, mixture_default
from sparse_attn.profiler import default_candidates, score_candidates

TOY = "first_and_diagonal"


def _toy_layout(estimate, q, k, budgets, *, causal, block_size):
    """Per query block: key block 0 and the last key block its rows may see (the diagonal one)."""
    b, h, sq = q.shape[:3]
    sk = k.shape[2]
    nq, nk = -(-sq // block_size), -(-sk // block_size)
    last_key = (torch.arange(nq) * block_size + block_size).clamp(max=sq) - 1 + (sk - sq)
    diag = torch.div(last_key, block_size, rounding_mode="floor").clamp(max=nk - 1)
    mask = torch.zeros(b, h, nq, nk, dtype=torch.bool)
    mask[..., 0] = True
    seen = diag >= 0
    mask[:, :, torch.arange(nq)[seen], diag[seen]] = True
    return BlockLayout.from_block_mask(mask.to(q.device), block_size, block_size, sq, sk)


@pytest.fixture
def toy():
    pattern = register_pattern(Pattern(name=TOY, summary="the first and the diagonal key block", layout=BlockLayout,
                                       build=_toy_layout, candidates=lambda seqlen, block_size: [{}]))
    yield pattern
    unregister_pattern(TOY)


def _qkv(b=1, hq=4, hkv=2, sq=197, sk=197, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=g), torch.randn(b, hkv, sk, d, generator=g),
            torch.randn(b, hkv, sk, d, generator=g))


def test_toy_pattern_runs_as_a_method_against_the_fp32_reference(toy):
    assert TOY in list_methods() and TOY in list_patterns()
    q, k, v = _qkv(sq=150, sk=330)
    stats = {}
    out = sparse_attention(q, k, v, TOY, min_seqlen=0, stats=stats)
    layout = _toy_layout(None, q, k, {}, causal=True, block_size=64)
    want = reference_attention(q, k, v, layout, causal=True)
    assert torch.allclose(out, want, atol=1e-5)
    assert stats["pattern"] == [TOY] * 4
    assert 0 < float(stats["density"].max()) < 1
    dense = reference_attention(q, k, v, causal=True)
    assert (out - dense).abs().max() > 1e-2  # the sparse path really ran


@pytest.mark.parametrize("sq,sk,hq,hkv", [(197, 197, 4, 2), (70, 300, 6, 2), (129, 129, 3, 3)])
def test_toy_pattern_passes_the_method_matrix_checks(toy, sq, sk, hq, hkv):
    """The very checks the registry-parametrized method tests run on every built-in pattern."""
    q, k, v = qkv(sq + sk, hq=hq, hkv=hkv, sq=sq, sk=sk)
    out, layouts, stats = check_method_against_reference(TOY, q, k, v)
    assert stats["pattern"] == [TOY] * hq and len(layouts.parts) == 1
    mixed = [{"pattern": TOY} if h % 2 else {"pattern": "dense"} for h in range(hq)]
    check_method_against_reference("minference", q, k, v, head_config=mixed)


def test_toy_pattern_in_the_mixture_and_in_profiles(toy):
    q, k, v = _qkv()
    head_config = [{"pattern": TOY}, {"pattern": "dense"}, {"pattern": TOY}, {"pattern": "dense"}]
    stats = {}
    out = sparse_attention(q, k, v, "minference", head_config=head_config, min_seqlen=0, stats=stats)
    layout = _toy_layout(None, q, k, {}, causal=True, block_size=64)
    dense = reference_attention(q, k, v, causal=True)
    sparse = reference_attention(q, k, v, layout, causal=True)
    assert torch.allclose(out[:, [0, 2]], sparse[:, [0, 2]], atol=1e-5)
    assert torch.allclose(out[:, [1, 3]], dense[:, [1, 3]], atol=1e-5)
    assert stats["pattern"] == [TOY, "dense", TOY, "dense"]
    assert check_budget_head({"pattern": TOY, "recall": 0.5}, "layer 0, head 0")["pattern"] == TOY


def test_toy_pattern_reaches_the_profiler_and_the_benchmark(toy):
    candidates = default_candidates(256)
    assert {"pattern": TOY} in candidates
    q, k, _ = _qkv(hq=2, hkv=1, sq=256, sk=256)
    scores = score_candidates(q, k, [{"pattern": TOY}, {"pattern": "dense"}])
    assert torch.all(scores.recall[0] < 1) and torch.all(scores.recall[1] == 1)
    assert torch.all(scores.density[0] < 0.8)
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("bench_methods", root / "bench" / "bench_methods.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_methods", bench)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--methods", TOY, "--seqlens", "1024"])
    assert [label for label, _, _ in args.methods] == [TOY]
    assert TOY in [label for label, _, _ in bench.parse_args([]).methods]


def test_toy_pattern_through_patch(toy):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, intermediate_size=128, vocab_size=128, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 197), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
        sparse_attn.patch(model, TOY, min_seqlen=0)
        try:
            sparse = model(ids).logits
            stats = sparse_attn.get_stats(model)
        finally:
            sparse_attn.unpatch(model)
    assert all(s.pattern == [TOY] * 4 for s in stats.prefill.values()) and len(stats.prefill) == 2
    assert 0 < stats.density() < 1
    assert (sparse - dense).abs().max() > 1e-3


def test_registry_refuses_bad_entries_and_names_the_field(toy):
    with pytest.raises(ValueError, match="already registered"):
        register_pattern(toy)
    with pytest.raises(ValueError, match="name"):
        Pattern(name="dense", summary="", layout=BlockLayout, build=_toy_layout)
    with pytest.raises(ValueError, match="block_size"):
        Pattern(name="x", summary="", layout=BlockLayout, build=_toy_layout, options=(Param("block_size", int, 64, 1),))
    with pytest.raises(ValueError, match="'k'"):
        Param("k", int, 0, 1)
    with pytest.raises(ValueError, match="unknown pattern"):
        get_pattern("no_such_pattern")


def test_typed_budgets_ints_and_floats():
    """A pattern may store float budgets per head (e.g. a cumulative-mass threshold): checked by kind and
    bounds, in profiles and in method kwargs."""
    name = "toy_float_budget"
    register_pattern(Pattern(name=name, summary="toy", layout=BlockLayout, build=_toy_layout,
                             budgets=(Param("gamma", float, 0.9, 0.0, 1.0, doc="mass kept"),
                                      Param("min_blocks", int, 2, 1, doc="at least"))))
    try:
        head = check_budget_head({"pattern": name, "gamma": 0.95, "min_blocks": 3}, "layer 1, head 2")
        assert head["gamma"] == 0.95 and head["min_blocks"] == 3
        assert check_budget_head({"pattern": name, "gamma": 1, "min_blocks": 3}, "h")["gamma"] == 1.0
        for bad, match in (({"gamma": 1.5, "min_blocks": 3}, "gamma"), ({"gamma": 0.5, "min_blocks": 2.5}, "min_blocks"),
                           ({"gamma": float("nan"), "min_blocks": 3}, "gamma"), ({"min_blocks": 3}, "gamma"),
                           ({"gamma": True, "min_blocks": 3}, "gamma")):
            with pytest.raises(ValueError, match=f"layer 1, head 2.*{match}"):
                check_budget_head({"pattern": name, **bad}, "layer 1, head 2")
        assert check_method_kwargs(name, {"gamma": 0.5})["gamma"] == 0.5
        with pytest.raises(ValueError, match="gamma"):
            check_method_kwargs(name, {"gamma": -0.1})
        with pytest.raises(TypeError, match="accepted"):
            check_method_kwargs(name, {"tau": 0.5})
        assert "gamma=0.9" in get_method(name).help()
    finally:
        unregister_pattern(name)


def test_every_registered_pattern_is_complete():
    """What the rest of the package relies on, for each built-in entry: a Layout type, a full budget that the
    budget checks accept, profiler candidates that validate, and at most one mixture default."""
    for name in list_patterns():
        p = get_pattern(name)
        assert p.prefill or p.decode
        assert p.full_budget is not None, name
        for c in [p.full_budget(300, 300, 64)] + p.candidates(1024, 64) + (p.sweep(1024, 64) if p.sweep else []):
            for param in p.budgets:
                param.check(c.get(param.name, param.default), name)
        if p.prefill:
            assert issubclass(p.layout, sparse_attn.Layout)
            check_budget_head({"pattern": name, **p.full_budget(300, 300, 64)}, name)
            assert math.isfinite(p.estimator_cost(8192, block_size=64, **p.run_options({})))
        else:
            with pytest.raises(ValueError, match="prefill"):
                check_budget_head({"pattern": name, **p.full_budget(300, 300, 64)}, name)
    assert mixture_default(8192)["pattern"] in list_patterns()
