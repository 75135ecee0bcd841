"""Online estimators keep what they promise: sinks, windows, diagonals, first blocks, exact budgets,
nothing beyond the causal band, and they find planted patterns."""
import pytest
import torch

from helpers import qkv
from sparse_attn.estimators import (
    FORCED_COLUMNS,
    FORCED_SLASHES,
    a_shape_layout,
    block_topk_layout,
    diagonal_sums,
    estimate_block_topk,
    estimate_vertical_slash,
)
from sparse_attn.estimators import block_sparse as block_sparse_mod
from sparse_attn.estimators.vertical_slash import estimate as vertical_slash_mod
from sparse_attn.estimators.vertical_slash import scores_triton


def test_diagonal_sums_brute_force():
    n, length, sk = 3, 7, 20
    p = torch.rand(n, length, sk)
    want = torch.zeros(n, sk)
    for t in range(length):
        for j in range(sk):
            o = sk - length + t - j
            if o >= 0:
                want[:, o] += p[:, t, j]
            else:
                p[:, t, j] = 0.0  # beyond the causal band: the softmax gives exactly 0 there
    assert torch.allclose(diagonal_sums(p), want, atol=1e-6)


def _a_shape_token_mask(sq, sk, sink, window):
    i = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    return (j <= i) & ((j < sink) | (j > i - window))


@pytest.mark.parametrize("sq,sk", [(300, 300), (129, 400), (1, 1000), (64, 64)])
def test_a_shape_covers_sink_and_window_at_block_granularity(sq, sk):
    sinks, windows, bs = [0, 64, 100], [1, 128, 70], 64
    layout = a_shape_layout(2, 3, sq, sk, sink=sinks, window=windows, block_size=bs)
    layout.check_values()
    dense = layout.to_dense()
    for h, (s, w) in enumerate(zip(sinks, windows)):
        want = _a_shape_token_mask(sq, sk, s, w)
        assert (dense[:, h] | ~want).all(), "a promised (sink or window) entry is missing"
        # Every kept block holds at least one promised entry: the layout is the tightest block cover.
        blocks = layout.to_block_mask()[0, h]
        qb = torch.arange(sq) // bs
        kb = torch.arange(sk) // bs
        touched = torch.zeros_like(blocks)
        touched[qb[:, None].expand(sq, sk)[want], kb[None, :].expand(sq, sk)[want]] = True
        assert torch.equal(blocks, touched)


def test_a_shape_decode_keeps_sink_and_last_window():
    layout = a_shape_layout(1, 1, 1, 1000, sink=64, window=100, block_size=64)
    assert layout.counts.item() == 3
    assert layout.indices[0, 0, 0, :3].tolist() == [0, 14, 15]  # keys 900..999 lie in blocks 14 and 15


def test_a_shape_rejects_bad_budgets():
    with pytest.raises(ValueError, match="window"):
        a_shape_layout(1, 2, 128, 128, sink=0, window=0)
    with pytest.raises(ValueError, match="sink"):
        a_shape_layout(1, 2, 128, 128, sink=[1, 2, 3], window=8)


def _qk(b=1, hq=4, hkv=2, sq=300, sk=300, d=32, seed=0, device="cpu"):
    return qkv(seed, b, hq, hkv, sq, sk, d, device=device)[:2]


@pytest.mark.parametrize("sq,sk", [(300, 300), (200, 333), (40, 300)])
def test_vertical_slash_budgets_and_forced_entries(sq, sk):
    q, k = _qk(b=2, sq=sq, sk=sk)
    nv, ns = [10, 80, 500, 3], [5, 100, 64, 2000]
    vertical, slash = estimate_vertical_slash(q, k, vertical_size=nv, slash_size=ns, last_q=16)
    assert vertical.dtype == slash.dtype == torch.int32
    assert vertical.shape == (2, 4, min(max(nv), sk)) and slash.shape == (2, 4, min(max(ns), sk))
    for b in range(2):
        for h in range(4):
            cols, diags = vertical[b, h].unique(), slash[b, h].unique()
            assert len(cols) == min(nv[h], sk) and len(diags) == min(ns[h], sk)  # budgets exact
            assert cols.min() >= 0 and cols.max() < sk and diags.min() >= 0 and diags.max() < sk
            forced_c = torch.arange(min(FORCED_COLUMNS, nv[h], sk))
            forced_s = torch.arange(min(FORCED_SLASHES, ns[h], sk))
            assert torch.isin(forced_c, cols).all() and torch.isin(forced_s, diags).all()
            assert (vertical[b, h, 1:] >= vertical[b, h, :-1]).all()


def test_vertical_slash_finds_planted_columns_and_diagonals():
    sq = sk = 512
    d = 16
    q, k = torch.zeros(1, 2, sq, d), torch.randn(1, 1, sk, d) * 0.1
    # Head 0: every query aligns with keys 200, 301, 450 (columns).
    q[0, 0, :, 0] = 4.0
    k[0, 0, [200, 301, 450], 0] = 6.0
    vertical, _ = estimate_vertical_slash(q, k, vertical_size=FORCED_COLUMNS + 3, slash_size=64, last_q=64)
    assert set(vertical[0, 0].tolist()) >= {200, 301, 450}
    # Query i aligns with key i - 100 (the diagonal at offset 100): random codes, nearly orthogonal in 64 dims.
    d = 64
    codes = torch.randn(sk + 100, d, generator=torch.Generator().manual_seed(1))
    q2 = codes[:sq].reshape(1, 1, sq, d)
    k2 = codes[100 : sk + 100].reshape(1, 1, sk, d) * 2
    _, slash = estimate_vertical_slash(q2, k2, vertical_size=64, slash_size=FORCED_SLASHES + 1, last_q=64)
    assert 100 in slash[0, 0].tolist()


def test_vertical_slash_gqa_equals_repeated_kv_and_head_chunks(monkeypatch):
    q, k = _qk(hq=6, hkv=2, sq=256, sk=256)
    want = estimate_vertical_slash(q, k.repeat_interleave(3, dim=1), vertical_size=70, slash_size=90, last_q=32)
    monkeypatch.setattr(vertical_slash_mod, "_CHUNK_ELEMENTS", 1)  # one kv head per chunk
    got = estimate_vertical_slash(q, k, vertical_size=70, slash_size=90, last_q=32)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_vertical_slash_share_heads():
    """One choice per run of heads: with the run's heads identical it is each head's own choice; budgets
    must agree within a run and the run must divide the GQA group."""
    q, k = _qk(b=2, hq=4, hkv=1, sq=256, sk=256)
    twins = q[:, ::2].repeat_interleave(2, dim=1)  # heads 0 = 1 and 2 = 3
    own = estimate_vertical_slash(twins, k, vertical_size=[70, 70, 90, 90], slash_size=80, last_q=32)
    shared = estimate_vertical_slash(twins, k, vertical_size=[70, 70, 90, 90], slash_size=80, last_q=32,
                                     share_heads=2)
    assert shared[0].shape == (2, 2, 90) and shared[1].shape == (2, 2, 80)
    assert torch.equal(shared[0], own[0][:, ::2]) and torch.equal(shared[1], own[1][:, ::2])
    # distinct heads: the run's choice keeps the forced entries and exact budgets, and is not head 0's alone
    v4, s4 = estimate_vertical_slash(q, k, vertical_size=70, slash_size=80, last_q=32, share_heads=4)
    assert v4.shape == (2, 1, 70) and len(v4[0, 0].unique()) == 70 and len(s4[1, 0].unique()) == 80
    assert torch.isin(torch.arange(FORCED_COLUMNS), v4[0, 0]).all()
    assert torch.isin(torch.arange(FORCED_SLASHES), s4[0, 0]).all()
    alone = estimate_vertical_slash(q, k, vertical_size=70, slash_size=80, last_q=32)
    assert not torch.equal(v4[:, 0], alone[0][:, 0])
    with pytest.raises(ValueError, match="vertical_size: with share_heads=2 every run of 2 heads needs one budget"):
        estimate_vertical_slash(q, k, vertical_size=[70, 80, 90, 90], slash_size=80, share_heads=2)
    with pytest.raises(ValueError, match="share_heads: expected a positive int dividing"):
        estimate_vertical_slash(q, k, vertical_size=70, slash_size=80, share_heads=3)


def test_vertical_slash_fused_topk_equals_torch_topk(monkeypatch):
    """backend="triton" picks its ids with the fused top-k kernel, "torch" with torch.topk and sort: given the
    same scores (ties improbable on random inputs) they choose the same ids, budgets uniform or per head."""
    q, k = _qk(b=2, hq=4, hkv=2, sq=200, sk=333)
    torch_scores = vertical_slash_mod.vertical_slash_scores
    monkeypatch.setattr(vertical_slash_mod, "vertical_slash_scores",
                        lambda *a, **kw: torch_scores(*a, **dict(kw, backend="torch")))
    cases = [(90, 130, 1), (90, 130, 2), ([10, 80, 333, 3], [5, 100, 64, 300], 1),
             ([10, 10, 333, 333], [100, 100, 64, 64], 2)]  # share_heads=2: one budget per run of 2 heads
    for nv, ns, share in cases:
        kw = dict(vertical_size=nv, slash_size=ns, last_q=16, share_heads=share)
        fused = estimate_vertical_slash(q, k, backend="triton", **kw)
        plain = estimate_vertical_slash(q, k, backend="torch", **kw)
        assert torch.equal(fused.vertical, plain.vertical) and torch.equal(fused.slash, plain.slash)


def _visible_blocks(sq, sk, bs):
    nq = -(-sq // bs)
    last = (torch.arange(nq) * bs + bs).clamp(max=sq) - 1 + sk - sq
    return torch.div(last, bs, rounding_mode="floor").clamp(max=-(-sk // bs) - 1) + 1


@pytest.mark.parametrize("sq,sk", [(300, 300), (130, 400), (64, 64)])
def test_block_topk_budgets_diagonal_first_and_causal(sq, sk):
    q, k = _qk(b=2, hq=4, hkv=2, sq=sq, sk=sk)
    bs, top_k = 64, [1, 2, 3, 100]
    layout = block_topk_layout(estimate_block_topk(q, k, top_k=top_k, block_size=bs), sq, sk, bs)
    layout.check_values()
    visible = _visible_blocks(sq, sk, bs)
    blocks = layout.to_block_mask()
    for h, t in enumerate(top_k):
        want = torch.minimum(visible, torch.tensor(max(t, 2)))
        assert torch.equal(layout.counts[:, h], want.int().expand(2, -1))  # budgets exact
        for qb, n in enumerate(visible.tolist()):
            assert blocks[:, h, qb, 0].all() and blocks[:, h, qb, n - 1].all()  # first and diagonal
            assert not blocks[:, h, qb, n:].any()  # nothing beyond the causal band


def test_block_topk_finds_planted_block_and_chunks_agree(monkeypatch):
    sq = sk = 512
    q, k = _qk(hq=2, hkv=1, sq=sq, sk=sk, d=16)
    q[..., 0] = 3.0
    k[0, 0, 192:256, 0] = 5.0  # key block 3 stands out for every query block that sees it
    ids = estimate_block_topk(q, k, top_k=3)
    layout = block_topk_layout(ids, sq, sk)
    blocks = layout.to_block_mask()
    assert blocks[0, :, 4:, 3].all()
    monkeypatch.setattr(block_sparse_mod, "_CHUNK_ELEMENTS", 1)  # one kv head and one query block per chunk
    assert torch.equal(block_topk_layout(estimate_block_topk(q, k, top_k=3), sq, sk).indices, layout.indices)


def test_block_topk_density_budget():
    q, k = _qk(sq=640, sk=640)
    layout = block_topk_layout(estimate_block_topk(q, k, density=0.5), 640, 640)
    visible = _visible_blocks(640, 640, 64)
    want = torch.maximum(torch.ceil(0.5 * visible.double()).long(), visible.clamp(max=2))
    assert torch.equal(layout.counts[0, 0].long(), want)
    with pytest.raises(ValueError, match="top_k, density"):
        estimate_block_topk(q, k, top_k=3, density=0.5)
    with pytest.raises(ValueError, match="density"):
        estimate_block_topk(q, k, density=1.5)


@pytest.mark.gpu
def test_estimators_at_1m_tokens_fit_in_memory():
    """One layer, 32 query / 8 kv heads, D=128, bf16, 1M tokens: estimation stays far below 80 GB."""
    s, dev = 1 << 20, "cuda"
    q = torch.randn(1, 32, s, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 8, s, 128, device=dev, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    vertical, slash = estimate_vertical_slash(q, k, vertical_size=1000, slash_size=6096)
    ids = estimate_block_topk(q, k, top_k=64)
    layout = block_topk_layout(ids, s, s)
    a_shape_layout(1, 32, s, s, sink=128, window=1024, device=dev)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert vertical.shape == (1, 32, 1000) and slash.shape == (1, 32, 6096)
    assert layout.counts.shape == (1, 32, s // 64)
    assert extra < 16 * 2**30, f"estimation used {extra / 2**30:.1f} GiB on top of q, k"


@pytest.mark.parametrize("b,hq,hkv,sq,sk,d,last_q", [(1, 4, 2, 200, 200, 32, 64), (2, 6, 2, 100, 300, 16, 40),
                                                      (1, 2, 2, 70, 50, 64, 64), (1, 8, 1, 130, 130, 32, 16)])
@pytest.mark.parametrize("lse_rows", [64, 256])
def test_triton_scores_equal_torch_scores(monkeypatch, b, hq, hkv, sq, sk, d, last_q, lse_rows):
    """lse_rows: the max / sum pass stacks up to this many query rows (heads x padded last_q) per program, so
    its passes and the scores pass may group the heads differently; both must read the same rows."""
    from sparse_attn.estimators.vertical_slash import vertical_slash_scores

    monkeypatch.setattr(scores_triton, "_LSE_ROWS", lse_rows)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = _qk(b=b, hq=hq, hkv=hkv, sq=sq, sk=sk, d=d, seed=sq, device=dev)
    last_q = min(last_q, sq, sk)
    kw = dict(last_q=last_q, scale=d ** -0.5, causal=True)
    vt, st = vertical_slash_scores(q, k, backend="triton", **kw)
    vr, sr = vertical_slash_scores(q, k, backend="torch", **kw)
    tol = 1e-5 if dev == "cpu" else 2e-3  # tl.dot on fp32 uses tf32 on the GPU
    assert torch.allclose(vt, vr, atol=tol) and torch.allclose(st, sr, atol=tol)
    assert torch.allclose(vt.sum(-1), torch.full_like(vt.sum(-1), last_q), rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("sk", [4096, 20000])
def test_triton_estimator_bf16_matches_torch_on_gpu(sk):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, sk, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 8, sk, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    from sparse_attn.estimators.vertical_slash import vertical_slash_scores

    kw = dict(last_q=64, scale=128 ** -0.5, causal=True)
    vt, st = vertical_slash_scores(q, k, backend="triton", **kw)
    vr, sr = vertical_slash_scores(q, k, backend="torch", **kw)
    # The torch path rounds the logits to bf16; the Triton path keeps them in fp32: compare in norm.
    for got, want in ((vt, vr), (st, sr)):
        assert ((got - want).norm() / want.norm()).item() < 3e-2
