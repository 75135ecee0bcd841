"""attention_recall: 1 for a full index, equal to a brute-force dense computation, chunk-independent."""
import pytest
import torch

from helpers import randn
from sparse_attn.estimators import a_shape_layout, block_topk_layout, estimate_block_topk
from sparse_attn.layouts import BlockLayout
from sparse_attn.recall import attention_recall


def _qk(b=2, hq=4, hkv=2, sq=200, sk=200, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return randn(g, b, hq, sq, d, scale=2, device="cpu"), randn(g, b, hkv, sk, d, device="cpu")


def _brute(q, k, mask, causal):
    b, hq, sq, d = q.shape
    kk = k.repeat_interleave(hq // k.shape[1], dim=1).double()
    s = q.double() @ kk.transpose(-1, -2) * d ** -0.5
    sk = k.shape[2]
    seen = torch.ones(sq, dtype=torch.bool)
    if causal:
        band = torch.arange(sk)[None] <= torch.arange(sq)[:, None] + sk - sq
        s = s.masked_fill(~band, float("-inf"))
        seen = band.any(-1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p * mask).sum(-1)[..., seen].mean(-1)


@pytest.mark.parametrize("sq,sk", [(200, 200), (100, 230), (150, 100)])
def test_full_layout_recall_is_one(sq, sk):
    q, k = _qk(sq=sq, sk=sk)
    layout = a_shape_layout(2, 4, sq, sk, sink=0, window=10**6)
    assert torch.allclose(attention_recall(q, k, layout), torch.ones(2, 4, dtype=torch.float64))


@pytest.mark.parametrize("sq,sk,causal", [(200, 200, True), (100, 230, True), (150, 100, True), (120, 90, False)])
def test_recall_matches_brute_force(sq, sk, causal):
    q, k = _qk(sq=sq, sk=sk, seed=sq)
    layout = block_topk_layout(estimate_block_topk(q, k, top_k=2, block_size=32, causal=causal), sq, sk, 32)
    want = _brute(q, k, layout.to_dense(), causal)
    got = attention_recall(q, k, layout, causal=causal)
    assert got.dtype == torch.float64 and got.shape == (2, 4)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(attention_recall(q, k, layout, causal=causal, chunk_size=7), got, atol=1e-6)
    assert torch.allclose(attention_recall(q, k, layout.to_dense(), causal=causal), got, atol=1e-6)


def test_sparser_layout_has_lower_recall():
    q, k = _qk(sq=512, sk=512)
    wide = attention_recall(q, k, a_shape_layout(2, 4, 512, 512, sink=64, window=128))
    narrow = attention_recall(q, k, a_shape_layout(2, 4, 512, 512, sink=0, window=1))
    assert (narrow < wide).all() and (wide < 1).all()


def test_recall_errors_name_the_argument():
    q, k = _qk()
    layout = BlockLayout.from_block_mask(torch.ones(2, 3, 4, 4, dtype=torch.bool), 64, 64, 200, 200)
    with pytest.raises(ValueError, match="layout"):
        attention_recall(q, k, layout)
    with pytest.raises(TypeError, match="layout"):
        attention_recall(q, k, "all")
    with pytest.raises(ValueError, match="chunk_size"):
        attention_recall(q, k, torch.ones(1, 1, 200, 200, dtype=torch.bool), chunk_size=0)
    with pytest.raises(ValueError, match="k: expected"):
        attention_recall(q, k[:, :, :, :8], torch.ones(1, 1, 200, 200, dtype=torch.bool))


def test_many_layouts_at_once_equal_one_by_one():
    q, k = _qk(sq=300, sk=300, seed=9)
    layouts = [a_shape_layout(2, 4, 300, 300, sink=64, window=64),
               block_topk_layout(estimate_block_topk(q, k, top_k=2), 300, 300),
               a_shape_layout(2, 4, 300, 300, sink=0, window=1).to_dense()]
    together = attention_recall(q, k, layouts, chunk_size=50)
    assert together.shape == (3, 2, 4)
    for i, layout in enumerate(layouts):
        assert torch.allclose(together[i], attention_recall(q, k, layout), atol=1e-6)


def test_recall_on_sampled_rows_is_the_brute_force_mean_over_those_rows():
    from sparse_attn.recall import sampled_rows

    q, k = _qk(b=1, sq=300, sk=300, seed=7)
    layout = block_topk_layout(estimate_block_topk(q, k, top_k=2, block_size=32), 300, 300, 32)
    rows = sampled_rows(300, bands=3, band_rows=40)
    assert rows == [(0, 40), (130, 170), (260, 300)]
    kk = k.repeat_interleave(2, dim=1).double()
    s = (q.double() @ kk.transpose(-1, -2) * 16 ** -0.5).masked_fill(~torch.ones(300, 300).tril().bool(), float("-inf"))
    kept = (torch.softmax(s, -1) * layout.to_dense()).sum(-1)
    expected = torch.cat([kept[..., a:z] for a, z in rows], -1).mean(-1)
    got = attention_recall(q, k, layout, rows=rows, chunk_size=17)
    assert torch.allclose(got, expected, atol=1e-6)
    assert sampled_rows(100, bands=4, band_rows=30) == [(0, 100)]


def test_a_long_calls_recall_diagnostic_is_measured_on_sampled_rows(monkeypatch):
    """sparse_attention(recall=True) on a call longer than RECALL_ALL_ROWS measures sampled rows: the same value
    whether the call ran whole or in row chunks, equal to attention_recall over those rows of its layout."""
    from sparse_attn import methods
    from sparse_attn.methods import sparse_attention
    from sparse_attn.recall import sampled_rows

    g = torch.Generator().manual_seed(5)
    q, k, v = randn(g, 1, 4, 1024, 16, scale=2, device="cpu"), randn(g, 1, 2, 1024, 16, device="cpu"), \
        randn(g, 1, 2, 1024, 16, device="cpu")
    monkeypatch.setattr(methods, "RECALL_ALL_ROWS", 256)
    whole, chunked, full = {}, {}, {}
    sparse_attention(q, k, v, "a_shape", sink=64, window=128, min_seqlen=0, stats=whole, recall=True)
    monkeypatch.setattr(methods, "ROW_CHUNKS_FROM", 512)
    monkeypatch.setattr(methods, "ROW_CHUNK", 256)
    sparse_attention(q, k, v, "a_shape", sink=64, window=128, min_seqlen=0, stats=chunked, recall=True)
    layout = a_shape_layout(1, 4, 1024, 1024, sink=64, window=128, block_size=64)
    want = attention_recall(q, k, layout, rows=sampled_rows(1024))[0].double()
    assert torch.allclose(whole["recall"], want, atol=1e-6)
    assert torch.allclose(chunked["recall"], want, atol=1e-6)
    monkeypatch.setattr(methods, "RECALL_ALL_ROWS", 1 << 14)
    sparse_attention(q, k, v, "a_shape", sink=64, window=128, min_seqlen=0, stats=full, recall=True)
    assert not torch.allclose(full["recall"], want, atol=1e-4)  # every row: another value
