"""The methods registry, one method per registered pattern plus dense and the per-head mixture: names and kwargs
validated, full budgets equal dense, the sparse paths equal the reference with their own index, short inputs
dense, and per-head dispatch equals per-head runs. The matrix is parametrized over the registry (the checks
live in tests/helpers.py, for tests that register patterns of their own)."""
import pytest
import torch

from helpers import (DEV, assert_close, check_attention, check_full_budget_is_dense, check_method_against_reference,
                     full_budget, prefill_patterns, qkv, smallest_budget)
from sparse_attn import dispatch, ops
from sparse_attn.dispatch import head_groups
from sparse_attn.methods import MIXTURE, check_method_kwargs, get_method, list_methods, sparse_attention
from sparse_attn.ops.reference import reference_attention
from sparse_attn.patterns import get_pattern, list_patterns, mixture_default

PATTERNS = list_patterns()
PREFILL = prefill_patterns()  # with a prefill side (an index): the sparse-path matrix
METHODS = list_methods()
# Methods whose full budget is defined (dense and the mixture always; a pattern where it has one).
FULL = [m for m in METHODS if m not in PATTERNS or get_pattern(m).full_budget is not None]
SEQ = 320
# Option cases besides each pattern's sparsest budget: kwargs that change how a pattern runs.
OPTION_CASES = [("vertical_slash", dict(smallest_budget("vertical_slash", SEQ), share_heads=2)),
                ("block_sparse", {"density": 0.3})]


def _inputs(b=1, hq=4, hkv=2, sq=200, sk=200, d=32, dtype=torch.float32, seed=0, device="cpu"):
    return qkv(seed, b, hq, hkv, sq, sk, d, dtype=dtype, device=device)


def test_registry_lists_the_methods():
    assert set(METHODS) == {"dense", MIXTURE, *PATTERNS}
    assert {"a_shape", "vertical_slash", "block_sparse"} <= set(PATTERNS)
    for name in METHODS:
        m = get_method(name)
        assert name in m.help() and "min_seqlen" in m.defaults
        assert m.pattern == (name if name in PATTERNS else None) and m.mixture == (name == MIXTURE)
    for name in PATTERNS:  # a uniform method takes its pattern's budgets and options, and the common kwargs
        p = get_pattern(name)
        assert set(get_method(name).defaults) == {*p.defaults(), "block_size", "min_seqlen"}


def test_share_heads_must_divide_the_gqa_group():
    q, k, v = _inputs(hq=6, hkv=2)
    with pytest.raises(ValueError, match=r"share_heads: expected a positive int dividing the query heads per kv "
                                         r"head \(3\), got 2"):
        sparse_attention(q, k, v, "vertical_slash", share_heads=2)


def test_unknown_method_and_bad_kwargs_are_named():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="unknown method 'nope'.*a_shape"):
        sparse_attention(q, k, v, "nope")
    with pytest.raises(TypeError, match=r"\['windw'\].*window"):
        sparse_attention(q, k, v, "a_shape", windw=3)
    with pytest.raises(ValueError, match="block_size"):
        check_method_kwargs("block_sparse", {"block_size": 0})
    with pytest.raises(ValueError, match="top_k or density"):
        sparse_attention(q, k, v, "block_sparse", top_k=2, density=0.5, min_seqlen=0)
    with pytest.raises(ValueError, match="method 'vertical_slash': 'vertical_size' must be (an int )?>= 1, got 0"):
        sparse_attention(q, k, v, "vertical_slash", vertical_size=0, min_seqlen=0)
    with pytest.raises(ValueError, match="'last_q' must be (an int )?>= 1, got 0"):
        sparse_attention(q, k, v, "minference", last_q=0, min_seqlen=0)
    with pytest.raises(ValueError, match="'last_q' must be an int >= 1, got 2.5"):
        sparse_attention(q, k, v, "vertical_slash", last_q=2.5, min_seqlen=0)


@pytest.mark.parametrize("bad,match", [
    ([{"pattern": "dense"}] * 3, "expected 4 head dicts"),
    ([{"pattern": "dense"}] * 3 + [{"pattern": "stripes"}], "head 3.*'pattern' must be one of"),
    ([{"pattern": "dense"}] * 3 + [{"pattern": "a_shape", "sink": 4}], "head 3.*'window'"),
    ([{"pattern": "block_sparse", "top_k": -1}] * 4, "head 0.*'top_k' must be (an int )?>= 1, got -1"),
    ([{"pattern": "block_sparse", "top_k": 1.5}] * 4, "head 0.*'top_k' must be an int >= 1, got 1.5"),
    ({"pattern": "dense"}, "expected a list"),
])
def test_bad_head_config_is_named(bad, match):
    q, k, v = _inputs()
    with pytest.raises((ValueError, TypeError), match=match):
        sparse_attention(q, k, v, "minference", head_config=bad, min_seqlen=0)


def test_head_config_only_for_minference():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="head_config"):
        sparse_attention(q, k, v, "a_shape", head_config=[{"pattern": "dense"}] * 4)


# ---------------------------------------------------------------------------------------- the method matrix

@pytest.mark.parametrize("method", FULL)
@pytest.mark.parametrize("sq,sk", [(200, 200), (130, 260)])
def test_full_budget_equals_dense(method, sq, sk):
    """Every method at its full budget (the mixture: every pattern at its own, and dense heads) is dense
    attention, with density 1 for every head."""
    q, k, v = _inputs(sq=sq, sk=sk)
    check_full_budget_is_dense(method, q, k, v)


@pytest.mark.parametrize("method", FULL)
def test_full_budget_equals_dense_non_causal(method):
    """Non-causal: patterns defined for causal attention only run dense (with a warning), the others at full
    budget keep every key."""
    q, k, v = _inputs(sq=130, sk=200)
    check_full_budget_is_dense(method, q, k, v, causal=False)


@pytest.mark.parametrize("method,kwargs", [(p, smallest_budget(p, SEQ)) for p in PREFILL] + OPTION_CASES,
                         ids=[p for p in PREFILL] + [f"{p}-{'-'.join(kw)}" for p, kw in OPTION_CASES])
def test_sparse_path_equals_reference_with_its_own_index(method, kwargs):
    """Each prefill pattern at its sparsest budget: the output is the reference's over the layout the method reports,
    the density is that layout's and below 1, and the estimate and build phases run again give that index."""
    q, k, v = _inputs(b=2, sq=SEQ, sk=SEQ, seed=3)
    _, layouts, stats = check_method_against_reference(method, q, k, v, **kwargs)
    ((heads, _, layout),) = layouts.parts
    assert heads == [0, 1, 2, 3] and isinstance(layout, get_pattern(method).layout)
    assert stats["density"].mean() < 1
    if kwargs.get("share_heads", 1) > 1:
        assert layout.shared_heads == 2 and torch.equal(layout.to_dense()[:, ::2], layout.to_dense()[:, 1::2])
        layout.check_values()  # includes the promise: identical entries within each pair


# A prefill chunk: the last CHUNK queries of SEQ_K keys (bottom-right causal); its start is not block-aligned.
CHUNK, SEQ_K = 150, 397


@pytest.mark.parametrize("method", PREFILL)
def test_chunk_of_queries_equals_reference_with_its_own_index(method):
    """Chunked prefill: a call whose queries are the last rows of a longer key sequence, at the pattern's
    sparsest budget for the keys, is the reference over the layout it reports, estimated from the chunk's own
    queries (the layout spans the chunk's rows and every key); that layout runs on its kernel family (the
    Triton kernels; the interpreter on the CPU) within the tolerance rule."""
    q, k, v = _inputs(b=2, sq=CHUNK, sk=SEQ_K, seed=5)
    kwargs = smallest_budget(method, SEQ_K)
    _, layouts, stats = check_method_against_reference(method, q, k, v, **kwargs)
    ((_, _, layout),) = layouts.parts
    assert (layout.seqlen_q, layout.seqlen_k) == (CHUNK, SEQ_K)
    assert 0 < stats["density"].mean() < 1
    half = tuple(t.half() for t in (q, k, v))
    check_attention(ops.attention, *half, layout)


@pytest.mark.parametrize("method", PREFILL)
def test_last_chunk_index_is_the_one_shot_index_rows(method):
    """Each pattern estimates a chunk from its own queries and the keys so far: the last chunk of a prompt,
    starting on a block boundary, gets exactly the last rows of the index of the whole prompt at once."""
    q, k, v = _inputs(b=1, sq=SEQ_K, sk=SEQ_K, seed=6)
    start = 256  # a multiple of the 64-token blocks
    p = get_pattern(method)
    merged = check_method_kwargs(method, smallest_budget(method, SEQ_K))
    configs = [{"pattern": method, **{n: merged[n] for n in p.budget_names}}] * q.shape[1]
    options = {o.name: merged[o.name] for o in p.options}
    whole = dispatch.plan_pattern(method, q, k, configs, causal=True, scale=None, block_size=64, **options)
    chunk = dispatch.plan_pattern(method, q[:, :, start:], k, configs, causal=True, scale=None, block_size=64,
                                  **options)
    rows = whole.mask_rows(0, start, SEQ_K)
    causal = torch.arange(SEQ_K)[None, :] <= torch.arange(start, SEQ_K)[:, None]
    assert torch.equal(chunk.mask_rows(0, 0, SEQ_K - start) & causal, rows & causal)


@pytest.fixture
def small_row_chunks(monkeypatch):
    """Long calls run in row chunks from 256 queries on, of about 128 rows (1M-token sizes scaled down)."""
    from sparse_attn import methods

    monkeypatch.setattr(methods, "ROW_CHUNK", 128)
    monkeypatch.setattr(methods, "ROW_CHUNKS_FROM", 256)


@pytest.mark.parametrize("method", PREFILL)
@pytest.mark.parametrize("sq,sk", [(600, 600), (450, 700)])
def test_long_calls_run_in_row_chunks_each_on_its_own_index(method, sq, sk, small_row_chunks):
    """A call longer than ROW_CHUNKS_FROM queries runs as row chunks, each the last rows of the keys it may see,
    with its own index: every chunk's rows of the output are the reference's over that chunk's layout, and the
    call's density is the chunks', weighted by their causal entries."""
    from sparse_attn import methods
    from sparse_attn.dispatch import RowChunks
    from sparse_attn.layouts import causal_tile_entries

    q, k, v = _inputs(sq=sq, sk=sk, seed=7)
    kwargs = {n: x for n, x in check_method_kwargs(method, dict(smallest_budget(method, sk), min_seqlen=0)).items()
              if n not in ("decode", "decode_config")}
    out, record, names = methods._run_rows(get_method(method), q, k, v, causal=True, scale=None, head_config=None,
                                           **kwargs)
    assert isinstance(record, RowChunks) and names == [method] * 4
    off = sk - sq
    assert [c[:2] for c in record.chunks] == [(r0, min(sq, r0 + 128)) for r0 in range(0, sq, 128)]
    weights, densities = [], []
    for r0, r1, layouts in record.chunks:
        ((_, _, layout),) = layouts.parts
        assert (layout.seqlen_q, layout.seqlen_k) == (r1 - r0, r1 + off)
        ref = reference_attention(q[:, :, r0:r1], k[:, :, : r1 + off], v[:, :, : r1 + off], layout, causal=True)
        assert_close(out[:, :, r0:r1], ref)
        weights.append(float(causal_tile_entries(r0, r1, 0, sk, off)))
        densities.append(layout.head_density(True))
    expected = sum(w * d for w, d in zip(weights, densities)) / sum(weights)
    assert torch.allclose(record.density(), expected)
    stats = {}
    again = sparse_attention(q, k, v, method, stats=stats, min_seqlen=0, **smallest_budget(method, sk))
    assert torch.equal(again, out) and torch.allclose(stats["density"], expected.mean(0))


@pytest.mark.parametrize("method", [p for p in PREFILL if get_pattern(p).rows is not None] + [MIXTURE])
def test_row_chunks_of_patterns_that_estimate_once_equal_one_call(method, small_row_chunks, monkeypatch):
    """A pattern that restricts its estimate to rows (Pattern.rows) estimates a row-chunked call once: each
    chunk's index is the one-call index's rows, the output the one call's (the mixture: its heads of such
    patterns, every pattern at its sparsest budget, and dense heads)."""
    from sparse_attn import methods

    q, k, v = _inputs(b=2, hq=8, sq=450, sk=700, seed=10)
    kwargs, head_config = dict(min_seqlen=0), None
    if method == MIXTURE:
        entries = [{"pattern": p, **smallest_budget(p, 700)} for p in PREFILL] + [{"pattern": "dense"}]
        head_config = [entries[h % len(entries)] for h in range(8)]
    else:
        kwargs.update(smallest_budget(method, 700))
    chunked_stats, whole_stats = {}, {}
    out = sparse_attention(q, k, v, method, head_config=head_config, stats=chunked_stats, **kwargs)
    monkeypatch.setattr(methods, "ROW_CHUNKS_FROM", 10 ** 9)
    one = sparse_attention(q, k, v, method, head_config=head_config, stats=whole_stats, **kwargs)
    heads = [h for h in range(8) if head_config is None or head_config[h]["pattern"] == "dense"
             or get_pattern(head_config[h]["pattern"]).rows is not None]
    assert len(heads) >= 2
    assert_close(out[:, heads], one[:, heads])
    if method != MIXTURE:
        assert torch.allclose(chunked_stats["density"], whole_stats["density"])


@pytest.mark.parametrize("method", FULL)
def test_row_chunks_at_full_budget_equal_dense(method, small_row_chunks):
    q, k, v = _inputs(sq=450, sk=700, seed=8)
    check_full_budget_is_dense(method, q, k, v)


def test_mixture_of_every_pattern_equals_reference_with_its_own_index():
    """The mixture with each registered prefill pattern at its sparsest budget on some heads, and dense ones."""
    q, k, v = _inputs(b=2, hq=8, hkv=2, sq=SEQ, sk=SEQ, seed=4)
    entries = [{"pattern": p, **smallest_budget(p, SEQ)} for p in PREFILL] + [{"pattern": "dense"}]
    head_config = [entries[h % len(entries)] for h in range(max(8, len(entries)))][:8]
    _, layouts, stats = check_method_against_reference(MIXTURE, q, k, v, head_config=head_config, last_q=32)
    assert stats["pattern"] == [h["pattern"] for h in head_config]
    assert sorted(h for heads, _, _ in layouts.parts for h in heads) == [
        h for h, c in enumerate(head_config) if c["pattern"] != "dense"]


@pytest.mark.parametrize("method", METHODS)
def test_short_inputs_run_dense(method):
    q, k, v = _inputs(sq=200, sk=200)
    stats = {}
    out = sparse_attention(q, k, v, method, stats=stats, min_seqlen=256)
    assert_close(out, reference_attention(q, k, v, causal=True))
    assert (stats["density"] == 1).all() and stats["pattern"] == ["dense"] * 4


@pytest.mark.parametrize("method", METHODS)
def test_decode_calls(method):
    """One query against 1000 keys, min_seqlen 512: a method with a decode side (Method.decode) serves it at
    its pattern's sparsest budget (fewer keys read than dense); every other method runs dense. At full budget
    every method equals dense attention."""
    q, k, v = _inputs(sq=1, sk=1000)
    want = reference_attention(q, k, v, causal=True)
    side = get_method(method).decode
    full = full_budget(method, 1, 1000) if method in PATTERNS else {}
    if full is not None:
        stats = {}
        assert_close(sparse_attention(q, k, v, method, min_seqlen=512, stats=stats, **full), want)
        assert torch.allclose(stats["density"], torch.ones(4, dtype=torch.float64))
    stats = {}
    kwargs = smallest_budget(method, 1000) if method in PATTERNS else {}
    out = sparse_attention(q, k, v, method, min_seqlen=512, stats=stats, **kwargs)
    assert out.shape == q.shape and torch.isfinite(out).all()
    if side is None:
        assert_close(out, want)
        assert stats["pattern"] == ["dense"] * 4 and (stats["density"] == 1).all()
    else:
        assert stats["pattern"] == [side] * 4 and (stats["density"] < 1).all()


def test_a_shape_decode_keeps_the_sink_and_window_pages():
    q1, k1, v1 = _inputs(sq=1, sk=1000)
    stats = {}
    out = sparse_attention(q1, k1, v1, "a_shape", sink=64, window=100, min_seqlen=512, stats=stats)
    # Pages of 64 keys: the sink page 0, and the last 3 pages, as many as 100 window tokens can straddle (the
    # decode side's static width): keys 832..999.
    mask = torch.zeros(1, 1, 1, 1000, dtype=torch.bool)
    mask[..., :64] = mask[..., 832:] = True
    assert_close(out, reference_attention(q1, k1, v1, mask, causal=True))
    assert torch.allclose(stats["density"], torch.full((4,), (64 + 168) / 1000, dtype=torch.float64))
    assert stats["pattern"] == ["a_shape"] * 4


def test_dense_more_queries_than_keys_gives_zero_rows():
    q, k, v = _inputs(sq=150, sk=100)
    out = sparse_attention(q, k, v, "dense")
    assert_close(out, reference_attention(q, k, v, causal=True))
    assert (out[:, :, :50] == 0).all()


MIXED = [
    {"pattern": "vertical_slash", "vertical_size": 70, "slash_size": 100},
    {"pattern": "a_shape", "sink": 64, "window": 64},
    {"pattern": "block_sparse", "top_k": 2},
    {"pattern": "vertical_slash", "vertical_size": 130, "slash_size": 65},
    {"pattern": "dense"},
    {"pattern": "a_shape", "sink": 0, "window": 130},
    {"pattern": "block_sparse", "top_k": 3},
    {"pattern": "vertical_slash", "vertical_size": 64, "slash_size": 64},
]


def test_head_groups_launch_once_per_pattern_and_kv_share():
    groups = head_groups(MIXED, num_kv_heads=2)  # kv 0: heads 0-3, kv 1: heads 4-7
    assert sorted(h for g in groups for h in g.heads) == list(range(8))
    for g in groups:
        assert len(g.heads) % len(g.kv_heads) == 0
        assert all(h // 4 == g.kv_heads[i // (len(g.heads) // len(g.kv_heads))] for i, h in enumerate(g.heads))
    assert len(groups) <= 2 * 4
    uniform = head_groups([MIXED[0]] * 8, num_kv_heads=2)
    assert len(uniform) == 1 and uniform[0].kv_heads == [0, 1]


def test_mixed_dispatch_equals_per_head_runs():
    q, k, v = _inputs(b=2, hq=8, hkv=2, sq=320, sk=320, seed=5)
    out, _, stats = check_method_against_reference(MIXTURE, q, k, v, head_config=MIXED, last_q=32)
    assert stats["pattern"] == [c["pattern"] for c in MIXED]
    for h, cfg in enumerate(MIXED):
        single = {}
        want = sparse_attention(q[:, h : h + 1], k[:, h // 4 : h // 4 + 1], v[:, h // 4 : h // 4 + 1], "minference",
                                head_config=[cfg], stats=single, min_seqlen=0, last_q=32)
        assert torch.allclose(out[:, h : h + 1], want, atol=1e-5)
        assert torch.allclose(stats["density"][h], single["density"][0])
    assert stats["density"][4] == 1 and (stats["density"][[1, 2, 5, 6]] < 1).all()


def test_minference_default_is_the_mixture_default_scaled_to_length():
    q, k, v = _inputs(sq=256, sk=256)
    default = mixture_default(256)
    assert default["pattern"] in PATTERNS
    _, layouts, stats = check_method_against_reference(MIXTURE, q, k, v)
    assert stats["pattern"] == [default["pattern"]] * 4
    small, large = mixture_default(8192), mixture_default(1 << 17)
    assert small == {"pattern": "vertical_slash", "vertical_size": 256, "slash_size": 512}
    assert large == {"pattern": "vertical_slash", "vertical_size": 1000, "slash_size": 6096}
    assert full_budget(default["pattern"], 256, 256) is not None


@pytest.mark.gpu
@pytest.mark.parametrize("method,kwargs", [(p, smallest_budget(p, 2048)) for p in PREFILL] + OPTION_CASES
                         + [(MIXTURE, {})],
                         ids=[p for p in PREFILL] + [f"{p}-{'-'.join(kw)}" for p, kw in OPTION_CASES] + [MIXTURE])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_methods_on_cuda_match_the_reference_with_their_index(method, kwargs, dtype):
    q, k, v = _inputs(b=2, hq=8, hkv=2, sq=2048, sk=2048, d=128, dtype=dtype, device=DEV, seed=7)
    head_config = MIXED if method == MIXTURE else None
    out, _, stats = check_method_against_reference(method, q, k, v, head_config=head_config, floor=1e-3, **kwargs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert stats["density"].mean() < 1


def test_opt_in_recall_matches_attention_recall():
    from sparse_attn.estimators import a_shape_layout
    from sparse_attn.recall import attention_recall

    q, k, v = _inputs(b=2, hq=8, hkv=2, sq=320, sk=320, seed=11)
    stats = {}
    sparse_attention(q, k, v, "minference", head_config=MIXED, stats=stats, recall=True, min_seqlen=0, last_q=32)
    assert stats["recall"].shape == (8,) and stats["recall"][4] == 1  # the dense head
    assert ((stats["recall"] > 0) & (stats["recall"] <= 1 + 1e-6)).all()
    # The a_shape group: heads 1 (kv 0) and 5 (kv 1), with their own budgets.
    a_shape = a_shape_layout(2, 2, 320, 320, sink=[64, 0], window=[64, 130])
    want = attention_recall(q[:, [1, 5]], k, a_shape).mean(0)
    assert torch.allclose(stats["recall"][[1, 5]], want)
    stats = {}
    sparse_attention(q, k, v, "a_shape", stats=stats, min_seqlen=0, sink=64, window=64)
    assert "recall" not in stats


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_chunk_on_cuda_is_bottom_right_causal(dtype):
    """A chunk of queries against a longer cache (chunked prefill's dense calls) on CUDA: the reference's
    bottom-right causal attention."""
    from sparse_attn.dispatch import dense_attention

    q, k, v = _inputs(hq=8, hkv=2, sq=300, sk=1000, d=64, dtype=dtype, seed=9, device="cuda")
    out = dense_attention(q, k, v, causal=True, scale=None)
    assert_close(out, reference_attention(q, k, v, causal=True), reference_attention(q, k, v, causal=True,
                                                                                      upcast=False))


@pytest.mark.gpu
def test_dense_decode_on_cuda_launches_no_cudnn_kernel():
    """Dense decode steps on CUDA (one query against a cache one key longer at every step) equal the reference
    and run no cuDNN kernel: cuDNN's SDPA plans per shape, so each step would build a plan."""
    from torch.profiler import ProfilerActivity, profile

    from sparse_attn.dispatch import dense_attention

    lengths = (1497, 1498, 1500)
    q, k, v = _inputs(b=3, hq=8, hkv=2, sq=1, sk=max(lengths), d=128, dtype=torch.bfloat16, seed=12, device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        outs = [dense_attention(q, k[:, :, :n], v[:, :, :n], causal=True, scale=None) for n in lengths]
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert kernels and not [name for name in kernels if "cudnn" in name.lower()], kernels
    for out, n in zip(outs, lengths):
        kn, vn = k[:, :, :n], v[:, :, :n]
        assert_close(out, reference_attention(q, kn, vn, causal=True), reference_attention(q, kn, vn, causal=True,
                                                                                             upcast=False))
