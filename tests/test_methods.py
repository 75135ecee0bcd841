"""The methods registry: names and kwargs validated, full budgets equal dense, the sparse paths equal the
reference with their own index, short inputs dense, and per-head dispatch equals per-head runs."""
import pytest
import torch

from sparse_attn import dispatch
from sparse_attn.dispatch import head_groups
from sparse_attn.layouts import VerticalSlashLayout
from sparse_attn.methods import check_method_kwargs, default_head_config, get_method, list_methods, sparse_attention
from sparse_attn.ops.reference import reference_attention


def _tiny_vertical_slash_index(vertical, slash, seqlen_q, seqlen_k, block_size_q=64):
    """Test-only stand-in for sparse_attn.ops.vertical_slash.build_vertical_slash_index (via a dense
    per-block mask): per query block, the merged key ranges its diagonals cover, plus the other columns."""
    b, h = vertical.shape[:2]
    nq, off = -(-seqlen_q // block_size_q), seqlen_k - seqlen_q
    per = []
    for bi in range(b):
        for hi in range(h):
            for qb in range(nq):
                q0, q1 = qb * block_size_q, min(seqlen_q, (qb + 1) * block_size_q)
                cover = torch.zeros(seqlen_k + 1, dtype=torch.bool)
                for o in slash[bi, hi].tolist():
                    lo, hi_ = max(0, q0 + off - o), min(seqlen_k, q1 + off - o)
                    if lo < hi_:
                        cover[lo:hi_] = True
                edges = torch.diff(cover.int(), prepend=torch.zeros(1, dtype=torch.int32))
                starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
                cols = sorted(c for c in set(vertical[bi, hi].tolist()) if not cover[c])
                per.append((starts.tolist(), ends.tolist(), cols))
    mr = max(1, max(len(p[0]) for p in per))
    mc = max(1, max(len(p[2]) for p in per))
    rs = torch.full((len(per), mr), -1, dtype=torch.int32)
    re = torch.full((len(per), mr), -1, dtype=torch.int32)
    ci = torch.full((len(per), mc), -1, dtype=torch.int32)
    for n, (s, e, c) in enumerate(per):
        for dst, src in ((rs, s), (re, e), (ci, c)):
            dst[n, : len(src)] = torch.tensor(src, dtype=torch.int32)
    rc = torch.tensor([len(p[0]) for p in per], dtype=torch.int32)
    cc = torch.tensor([len(p[2]) for p in per], dtype=torch.int32)
    shape = (b, h, nq)
    return VerticalSlashLayout(rc.view(shape), rs.view(*shape, mr), re.view(*shape, mr), cc.view(shape),
                               ci.view(*shape, mc), block_size_q, seqlen_q, seqlen_k)


@pytest.fixture(autouse=True)
def vertical_slash_builder(monkeypatch):
    """Use the real index builder when it exists; the tiny test builder otherwise."""
    try:
        from sparse_attn.ops.vertical_slash import build_vertical_slash_index  # noqa: F401
    except ImportError:
        monkeypatch.setattr(
            dispatch, "_build_vertical_slash_index",
            lambda v, s, sq, sk, bs: _tiny_vertical_slash_index(v, s, sq, sk, bs),
        )


def _inputs(b=1, hq=4, hkv=2, sq=200, sk=200, d=32, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g, dtype=dtype).to(device)
    k = torch.randn(b, hkv, sk, d, generator=g, dtype=dtype).to(device)
    v = torch.randn(b, hkv, sk, d, generator=g, dtype=dtype).to(device)
    return q, k, v


def _close(out, want, lowp=None):
    tol = 1e-5 if lowp is None else 2 * (lowp.float() - want.float()).abs().max().item() + 1e-3
    assert (out.float() - want.float()).abs().max().item() <= tol


def test_registry_lists_the_methods():
    assert set(list_methods()) >= {"dense", "a_shape", "vertical_slash", "block_sparse", "minference"}
    for name in list_methods():
        assert name in get_method(name).help()
        assert "min_seqlen" in get_method(name).defaults


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
    with pytest.raises(ValueError, match="vertical_size"):
        sparse_attention(q, k, v, "vertical_slash", vertical_size=0, min_seqlen=0)


@pytest.mark.parametrize("bad,match", [
    ([{"pattern": "dense"}] * 3, "expected 4 head dicts"),
    ([{"pattern": "dense"}] * 3 + [{"pattern": "stripes"}], "head 3.*'pattern' must be one of"),
    ([{"pattern": "dense"}] * 3 + [{"pattern": "a_shape", "sink": 4}], "head 3.*'window'"),
    ([{"pattern": "block_sparse", "top_k": -1}] * 4, "head 0.*'top_k' must be an int >= 1"),
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


BUDGET_KEYS = ("sink", "window", "vertical_size", "slash_size", "top_k")


def _capture_layouts(monkeypatch):
    """Record every layout the methods hand to the kernel (dispatch.attend)."""
    seen = []
    original = dispatch.attend

    def attend(q, k, v, layout, **kw):
        seen.append(layout)
        return original(q, k, v, layout, **kw)

    monkeypatch.setattr(dispatch, "attend", attend)
    return seen


FULL = {
    "dense": {},
    "a_shape": {"sink": 0, "window": 10**6},
    "vertical_slash": {"vertical_size": 10**6, "slash_size": 10**6, "last_q": 16},
    "block_sparse": {"top_k": 10**6},
    "minference": {},
}


@pytest.mark.parametrize("method", sorted(FULL))
@pytest.mark.parametrize("sq,sk", [(200, 200), (130, 260)])
def test_full_budget_equals_dense(method, sq, sk):
    q, k, v = _inputs(sq=sq, sk=sk)
    head_config = None
    if method == "minference":
        head_config = [{"pattern": "vertical_slash", "vertical_size": 10**6, "slash_size": 10**6},
                       {"pattern": "a_shape", "sink": 0, "window": 10**6},
                       {"pattern": "block_sparse", "top_k": 10**6}, {"pattern": "dense"}]
    stats = {}
    out = sparse_attention(q, k, v, method, head_config=head_config, stats=stats, min_seqlen=0, **FULL[method])
    _close(out, reference_attention(q, k, v, causal=True))
    assert torch.allclose(stats["density"], torch.ones(4, dtype=torch.float64))
    assert len(stats["pattern"]) == 4


@pytest.mark.parametrize("method,kwargs", [
    ("a_shape", {"sink": 64, "window": 64}),
    ("vertical_slash", {"vertical_size": 66, "slash_size": 66, "last_q": 32}),
    ("vertical_slash", {"vertical_size": 66, "slash_size": 66, "last_q": 32, "share_heads": 2}),
    ("block_sparse", {"top_k": 2}),
    ("block_sparse", {"density": 0.3}),
])
def test_sparse_path_equals_reference_with_its_own_index(method, kwargs, monkeypatch):
    q, k, v = _inputs(b=2, sq=320, sk=320, seed=3)
    layouts = _capture_layouts(monkeypatch)
    stats = {}
    out = sparse_attention(q, k, v, method, stats=stats, min_seqlen=0, **kwargs)
    (layout,) = layouts
    _close(out, reference_attention(q, k, v, layout, causal=True))
    assert stats["density"].mean() < 1
    assert torch.allclose(stats["density"], layout.head_density(True).mean(0))
    # The same estimate, phase by phase, gives the same index (the torch paths are deterministic).
    m = get_method(method)
    merged = check_method_kwargs(method, dict(kwargs, min_seqlen=0))
    configs = [{"pattern": m.pattern, **{key: merged[key] for key in BUDGET_KEYS if key in merged}}] * 4
    est = dispatch.estimate_pattern(m.pattern, q, k, configs, causal=True, scale=None, block_size=64,
                                    last_q=merged.get("last_q", 64), density=merged.get("density"),
                                    share_heads=merged.get("share_heads", 1))
    again = dispatch.build_pattern(m.pattern, est, q, k, configs, block_size=64)
    assert torch.equal(again.to_dense(), layout.to_dense())
    if merged.get("share_heads", 1) > 1:
        assert layout.shared_heads == 2 and torch.equal(layout.to_dense()[:, ::2], layout.to_dense()[:, 1::2])
        layout.check_values()  # includes the promise: identical entries within each pair


def test_short_inputs_run_dense_and_a_shape_sparsifies_decode():
    q, k, v = _inputs(sq=200, sk=200)
    for method in ("vertical_slash", "block_sparse", "minference"):
        stats = {}
        out = sparse_attention(q, k, v, method, stats=stats, min_seqlen=256)
        _close(out, reference_attention(q, k, v, causal=True))
        assert (stats["density"] == 1).all() and stats["pattern"] == ["dense"] * 4
    q1, k1, v1 = _inputs(sq=1, sk=1000)
    stats = {}
    out = sparse_attention(q1, k1, v1, "a_shape", sink=64, window=100, min_seqlen=512, stats=stats)
    mask = torch.zeros(1, 1, 1, 1000, dtype=torch.bool)
    mask[..., :64] = mask[..., 896:] = True  # sink block 0, window blocks 14 and 15
    _close(out, reference_attention(q1, k1, v1, mask, causal=True))
    assert torch.allclose(stats["density"], torch.full((4,), (64 + 104) / 1000, dtype=torch.float64))
    out = sparse_attention(q1, k1, v1, "minference", min_seqlen=512)
    _close(out, reference_attention(q1, k1, v1, causal=True))


def test_non_causal_dense_and_block_sparse():
    q, k, v = _inputs(sq=130, sk=200)
    _close(sparse_attention(q, k, v, "dense", causal=False), reference_attention(q, k, v, causal=False))
    out = sparse_attention(q, k, v, "block_sparse", causal=False, top_k=10**6, min_seqlen=0)
    _close(out, reference_attention(q, k, v, causal=False))
    _close(sparse_attention(q, k, v, "a_shape", causal=False, min_seqlen=0), reference_attention(q, k, v, causal=False))


def test_dense_more_queries_than_keys_gives_zero_rows():
    q, k, v = _inputs(sq=150, sk=100)
    out = sparse_attention(q, k, v, "dense")
    _close(out, reference_attention(q, k, v, causal=True))
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
    stats = {}
    out = sparse_attention(q, k, v, "minference", head_config=MIXED, stats=stats, min_seqlen=0, last_q=32)
    assert stats["pattern"] == [c["pattern"] for c in MIXED]
    for h, cfg in enumerate(MIXED):
        single = {}
        want = sparse_attention(q[:, h : h + 1], k[:, h // 4 : h // 4 + 1], v[:, h // 4 : h // 4 + 1], "minference",
                                head_config=[cfg], stats=single, min_seqlen=0, last_q=32)
        assert torch.allclose(out[:, h : h + 1], want, atol=1e-5)
        assert torch.allclose(stats["density"][h], single["density"][0])
    assert stats["density"][4] == 1 and (stats["density"][[1, 2, 5, 6]] < 1).all()


def test_minference_default_is_uniform_vertical_slash_scaled_to_length():
    q, k, v = _inputs(sq=256, sk=256)
    stats = {}
    sparse_attention(q, k, v, "minference", stats=stats, min_seqlen=0)
    assert stats["pattern"] == ["vertical_slash"] * 4
    small, large = default_head_config(1, 8192)[0], default_head_config(1, 1 << 17)[0]
    assert (small["vertical_size"], small["slash_size"]) == (256, 512)
    assert (large["vertical_size"], large["slash_size"]) == (1000, 6096)


@pytest.mark.gpu
@pytest.mark.parametrize("method,kwargs", [
    ("a_shape", {"sink": 128, "window": 512}),
    ("vertical_slash", {"vertical_size": 200, "slash_size": 96}),  # random data: 500 diagonals cover all keys
    ("vertical_slash", {"vertical_size": 200, "slash_size": 96, "share_heads": 2}),
    ("block_sparse", {"top_k": 8}),
    ("minference", {}),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_methods_on_cuda_match_the_reference_with_their_index(method, kwargs, dtype, monkeypatch):
    q, k, v = _inputs(b=2, hq=8, hkv=2, sq=2048, sk=2048, d=128, dtype=dtype, device="cuda", seed=7)
    head_config = MIXED if method == "minference" else None
    layouts = _capture_layouts(monkeypatch)
    stats = {}
    out = sparse_attention(q, k, v, method, head_config=head_config, stats=stats, min_seqlen=0, **kwargs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (stats["density"] <= 1).all() and stats["density"].mean() < 1
    if head_config is None:
        (layout,) = layouts
        want = reference_attention(q, k, v, layout, causal=True)
        lowp = reference_attention(q, k, v, layout, causal=True, upcast=False)
        _close(out, want, lowp)


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
