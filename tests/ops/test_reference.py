"""The fp32 reference: equals torch SDPA, handles layouts, GQA, varlen and chunking, rejects bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from helpers import packed_qkv, poison, qkv, random_layout
from sparse_attn import BlockLayout, VerticalSlashLayout, reference_attention
from sparse_attn.ops import sdpa_layout_attention

CPU = "cpu"


def sdpa(q, k, v, mask=None, causal=False):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    sq, sk = q.shape[2], k.shape[2]
    if causal:
        band = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
        mask = band if mask is None else mask & band
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@st.composite
def shapes(draw):
    kv = draw(st.integers(1, 3))
    return dict(
        b=draw(st.integers(1, 2)), kv=kv, h=kv * draw(st.integers(1, 3)), d=draw(st.sampled_from([8, 16, 32, 64])),
        sq=draw(st.integers(1, 50)), extra=draw(st.integers(0, 20)), seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_qkv(s, dtype=torch.float32):
    return qkv(s["seed"], s["b"], s["h"], s["kv"], s["sq"], s["sq"] + s["extra"], s["d"], dtype=dtype, device=CPU)


def block_layout(s, sq, sk, block, density, seed_offset):
    """Random key blocks (not only causal ones, the diagonal not forced) for the shapes of case s."""
    return random_layout(BlockLayout, s["seed"] + seed_offset, s["b"], s["h"], sq, sk, block, density=density,
                         causal=False, diagonal=False, device=CPU)


@given(shapes(), st.booleans())
def test_matches_sdpa_dense_causal_gqa(s, causal):
    q, k, v = make_qkv(s)
    out, lse = reference_attention(q, k, v, causal=causal, return_lse=True, chunk_size=7)
    assert torch.allclose(out, sdpa(q, k, v, causal=causal), atol=1e-5, rtol=1e-5)
    group = s["h"] // s["kv"]
    scores = q @ k.repeat_interleave(group, 1).transpose(-1, -2) / math.sqrt(s["d"])
    if causal:
        sq, sk = scores.shape[-2:]
        scores = scores.masked_fill(torch.arange(sk)[None, :] > torch.arange(sq)[:, None] + sk - sq, -math.inf)
    assert torch.allclose(lse, scores.logsumexp(-1), atol=1e-5)


@given(shapes(), st.booleans(), st.sampled_from([4, 8, 16]))
def test_block_layout_equals_its_dense_mask(s, causal, block):
    q, k, v = make_qkv(s)
    sq, sk = q.shape[2], k.shape[2]
    layout = block_layout(s, sq, sk, block, 0.6, 1)
    dense = layout.to_dense()
    out, lse = reference_attention(q, k, v, layout, causal=causal, return_lse=True, chunk_size=5)
    expected, expected_lse = reference_attention(q, k, v, dense, causal=causal, return_lse=True)
    assert torch.allclose(out, expected, atol=1e-6) and torch.allclose(lse, expected_lse, atol=1e-6)
    band = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
    full = dense & band if causal else dense
    visible = full.any(-1)
    ref = sdpa(q, k, v, mask=full)
    assert torch.allclose(out[visible], ref[visible], atol=1e-5)
    # Rows that see no key: output 0 and lse -inf, never NaN.
    assert (out[~visible] == 0).all() and torch.isneginf(lse[~visible]).all()


@given(shapes(), st.booleans(), st.sampled_from([4, 8]), st.integers(1, 9))
def test_sdpa_layout_path_equals_reference(s, causal, block, rows):
    """The CPU path of the methods (SDPA under the layout's mask, by row chunks) computes the reference."""
    q, k, v = make_qkv(s)
    sq, sk = q.shape[2], k.shape[2]
    layout = block_layout(s, sq, sk, block, 0.5, 2)
    with pytest.MonkeyPatch.context() as mp:  # its output starts as NaN: every element must be written
        poison(mp, torch, "empty_like")
        out = sdpa_layout_attention(q, k, v, layout, causal=causal, rows=rows)
    assert not torch.isnan(out).any()
    assert torch.allclose(out, reference_attention(q, k, v, layout, causal=causal), atol=1e-5)


def test_sdpa_layout_path_vertical_slash_half_precision():
    g = torch.Generator().manual_seed(5)
    q, k, v = qkv(g, 1, 4, 2, 37, d=16, dtype=torch.bfloat16, device=CPU)
    # per query block of 8 rows: up to two key ranges and two loose columns, per head
    layout = random_layout(VerticalSlashLayout, g, 1, 4, 37, 37, 8, widths=[1, 9], max_ranges=2, columns=2, device=CPU)
    out = sdpa_layout_attention(q, k, v, layout, causal=True, rows=16)
    ref = reference_attention(q, k, v, layout, causal=True)
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), ref.float(), atol=1e-2)


@given(st.lists(st.integers(0, 30), min_size=1, max_size=4), st.integers(0, 2**31 - 1), st.booleans())
def test_varlen_packed_equals_per_sequence(lengths, seed, causal):
    g = torch.Generator().manual_seed(seed)
    h, kv, d = 4, 2, 16
    extra = torch.randint(0, 5, (len(lengths),), generator=g).tolist()
    lk = [a + e for a, e in zip(lengths, extra)]
    q, k, v, cu_q, cu_k = packed_qkv(g, lengths, lk, h, kv, d, device=CPU)
    out, lse = reference_attention(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    for i, (a, e) in enumerate(zip(cu_q.tolist(), cu_q.tolist()[1:])):
        if e == a:
            continue
        qs = q[a:e].transpose(0, 1)[None]
        ks = k[cu_k[i] : cu_k[i + 1]].transpose(0, 1)[None]
        vs = v[cu_k[i] : cu_k[i + 1]].transpose(0, 1)[None]
        o, l = reference_attention(qs, ks, vs, causal=causal, return_lse=True)
        assert torch.allclose(out[a:e], o[0].transpose(0, 1), atol=1e-6)
        assert torch.equal(torch.isinf(lse[a:e]), torch.isinf(l[0].transpose(0, 1)))


def test_low_precision_mode_differs_but_stays_close():
    g = torch.Generator().manual_seed(0)
    q, k, v = qkv(g, 1, 2, 2, 64, d=32, dtype=torch.bfloat16, device=CPU)
    hi = reference_attention(q, k, v, causal=True).float()
    lo = reference_attention(q, k, v, causal=True, upcast=False).float()
    assert lo.dtype == hi.dtype and not torch.equal(hi, lo)
    assert (hi - lo).abs().max() < 0.1


def test_long_input_is_chunked_not_quadratic():
    # 1 head x 8K queries x 8K keys would be 256 MiB of scores at once; chunks keep it far below.
    q = torch.randn(1, 1, 8192, 16)
    k = torch.randn(1, 1, 8192, 16)
    out = reference_attention(q, k, k, causal=True, chunk_size=512)
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(q=torch.randn(2, 4, 8)), "q: expected a tensor with 4 dimensions"),
        (dict(k=torch.randn(1, 3, 8, 16), v=torch.randn(1, 3, 8, 16)), "kv heads that divides"),
        (dict(v=torch.randn(1, 2, 9, 16)), "v: expected the shape of k"),
        (dict(k=torch.randn(1, 2, 8, 8), v=torch.randn(1, 2, 8, 8)), "k: expected head_dim 16"),
        (dict(k=torch.randn(1, 2, 8, 16, dtype=torch.float64)), "k: expected dtype|k, v: expected the dtype"),
        (dict(q=torch.randint(0, 3, (1, 4, 8, 16))), "q: expected dtype"),
        (dict(mask=torch.ones(1, 4, 8, 8)), "mask: expected dtype"),
        (dict(mask=torch.ones(1, 3, 8, 8, dtype=torch.bool)), "mask: expected shape"),
        (dict(mask="causal"), "mask: expected None"),
        (dict(cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int32)), "pass both"),
    ],
)
def test_rejects_bad_input(kwargs, match):
    args = dict(q=torch.randn(1, 4, 8, 16), k=torch.randn(1, 2, 8, 16), v=torch.randn(1, 2, 8, 16), mask=None)
    args.update(kwargs)
    q, k, v, mask = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("mask")
    with pytest.raises((ValueError, TypeError), match=match):
        reference_attention(q, k, v, mask, **args)


def test_rejects_layout_that_does_not_fit():
    layout = BlockLayout.from_block_mask(torch.ones(1, 2, 1, 1, dtype=torch.bool), 16, 16, 8, 8)
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="layout: expected batch 1 and 4 query heads"):
        reference_attention(q, k, k, layout)


def test_rejects_bad_cu_seqlens():
    q, k = torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    good = torch.tensor([0, 3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q: expected the last entry"):
        reference_attention(q, k, k, cu_seqlens_q=torch.tensor([0, 3, 7], dtype=torch.int32), cu_seqlens_k=good)
    with pytest.raises(TypeError, match="cu_seqlens_k: expected dtype"):
        reference_attention(q, k, k, cu_seqlens_q=good, cu_seqlens_k=good.long())
    with pytest.raises(ValueError, match="non-decreasing"):
        reference_attention(q, k, k, cu_seqlens_q=torch.tensor([0, 5, 3, 8], dtype=torch.int32),
                            cu_seqlens_k=torch.tensor([0, 3, 5, 8], dtype=torch.int32))
