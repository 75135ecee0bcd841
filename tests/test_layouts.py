"""Sparse-index types: round trips, density without dense masks, and validation errors."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import random_layout
from sparse_attn import BlockLayout, VerticalSlashLayout
from sparse_attn.layouts import KeySums, Layout, causal_tile_entries

CPU = "cpu"


def causal_band(sq, sk):
    return torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)


def brute_density(dense, causal, sq, sk):
    band = causal_band(sq, sk) if causal else torch.ones(sq, sk, dtype=torch.bool)
    return (dense & band).sum((-1, -2)).double() / band.sum()


@st.composite
def block_layouts(draw):
    """Random BlockLayouts (any key blocks, empty query blocks included) of odd sizes."""
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    bq, bk = draw(st.sampled_from([4, 8, 16])), draw(st.sampled_from([4, 8, 16]))
    sq, sk = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    seed = draw(st.integers(0, 2**31 - 1))
    p = draw(st.floats(0.0, 1.0))
    return random_layout(BlockLayout, seed, b, h, sq, sk, bq, block_size_k=bk, density=p, causal=False,
                         diagonal=False, device=CPU)


@given(block_layouts(), st.booleans())
def test_block_layout_round_trip_and_density(layout, causal):
    bq, bk, sq, sk = layout.block_size_q, layout.block_size_k, layout.seqlen_q, layout.seqlen_k
    layout.check_values()
    block_mask = layout.to_block_mask()
    again = BlockLayout.from_block_mask(block_mask, bq, bk, sq, sk)
    assert torch.equal(again.counts, layout.counts) and torch.equal(again.indices, layout.indices)
    assert torch.equal(again.to_block_mask(), block_mask)
    dense = layout.to_dense()
    expected = block_mask.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[..., :sq, :sk]
    assert torch.equal(dense, expected)
    got = layout.head_density(causal)
    assert torch.allclose(got, brute_density(dense, causal, sq, sk), atol=1e-12)
    assert 0.0 <= layout.density(causal) <= 1.0


@given(block_layouts())
def test_block_layout_density_varlen(layout):
    sq, sk = layout.seqlen_q, layout.seqlen_k
    g = torch.Generator().manual_seed(sq * 100 + sk)
    lq = torch.randint(0, sq + 1, (layout.batch,), generator=g).tolist()
    lk = torch.randint(0, sk + 1, (layout.batch,), generator=g).tolist()
    got = layout.head_density(True, lq, lk)
    for b in range(layout.batch):
        dense = layout.mask_rows(b, 0, max(lq[b], 1), lk[b])[:, : lq[b]]
        band = causal_band(lq[b], lk[b])
        if band.sum() == 0:
            assert (got[b] == 0).all()
        else:
            assert torch.allclose(got[b], (dense & band).sum((-1, -2)).double() / band.sum())


@st.composite
def vs_layouts(draw):
    """Random vertical-slash layouts (ranges of any width, touching or apart, and columns outside them)."""
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    bq = draw(st.sampled_from([4, 8, 16]))
    sq, sk = draw(st.integers(1, 60)), draw(st.integers(1, 60))
    seed = draw(st.integers(0, 2**31 - 1))
    return random_layout(VerticalSlashLayout, seed, b, h, sq, sk, bq, widths=[1, 2, 3, 5, 8, 13],
                         max_ranges=draw(st.integers(1, 4)), columns=draw(st.integers(1, 6)), device=CPU)


def brute_vs_dense(layout):
    b, h, nq = layout.range_counts.shape
    out = torch.zeros(b, h, nq * layout.block_size_q, layout.seqlen_k, dtype=torch.bool)
    bq = layout.block_size_q
    for i in range(b):
        for j in range(h):
            for q in range(nq):
                rows = slice(q * bq, (q + 1) * bq)
                for r in range(layout.range_counts[i, j, q]):
                    out[i, j, rows, layout.range_starts[i, j, q, r] : layout.range_ends[i, j, q, r]] = True
                for c in range(layout.column_counts[i, j, q]):
                    out[i, j, rows, layout.column_indices[i, j, q, c]] = True
    return out[:, :, : layout.seqlen_q]


@given(vs_layouts(), st.booleans(), st.sampled_from([None, 1, 7]))
def test_vertical_slash_layout_dense_and_density(layout, causal, step_elements):
    """Density against a brute-force count of the dense mask; step_elements: the entry count run a query
    block or a few at a time (as on long inputs)."""
    import sparse_attn.layouts as layouts_module

    dense = layout.to_dense()
    assert torch.equal(dense, brute_vs_dense(layout))
    saved = layouts_module._ENTRY_COUNT_ELEMENTS
    layouts_module._ENTRY_COUNT_ELEMENTS = saved if step_elements is None else step_elements
    try:
        got = layout.head_density(causal)
    finally:
        layouts_module._ENTRY_COUNT_ELEMENTS = saved
    assert torch.allclose(got, brute_density(dense, causal, layout.seqlen_q, layout.seqlen_k), atol=1e-12)


@given(st.integers(0, 40), st.integers(0, 40), st.integers(0, 40), st.integers(0, 40), st.integers(-20, 20))
def test_causal_tile_entries_matches_counting(q0, q1, k0, k1, offset):
    i = torch.arange(q0, max(q0, q1))[:, None]
    j = torch.arange(k0, max(k0, k1))[None, :]
    assert causal_tile_entries(q0, q1, k0, k1, offset).item() == int((j <= i + offset).sum())


def valid_block_layout():
    counts = torch.tensor([[[1, 2]]], dtype=torch.int32)
    indices = torch.tensor([[[[0, -1], [0, 1]]]], dtype=torch.int32)
    return counts, indices


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c, i: (c, i.long()), "indices: expected dtype"),
        (lambda c, i: (c.float(), i), "counts: expected dtype"),
        (lambda c, i: (c, i[..., :1, :]), "indices: expected leading shape"),
        (lambda c, i: (c + 5, i), "counts: expected values in"),
        (lambda c, i: (c, torch.tensor([[[[0, -1], [0, 7]]]], dtype=torch.int32)), "key-block ids in"),
        (lambda c, i: (c, torch.tensor([[[[0, -1], [1, 0]]]], dtype=torch.int32)), "strictly increasing"),
        (lambda c, i: (c, torch.tensor([[[[0, -1], [1, 1]]]], dtype=torch.int32)), "strictly increasing"),
        (lambda c, i: (c[..., :1], i[..., :1, :]), "counts of shape"),
    ],
)
def test_block_layout_rejects_bad_input(mutate, match):
    counts, indices = mutate(*valid_block_layout())
    with pytest.raises((ValueError, TypeError), match=match):
        BlockLayout(counts, indices, block_size_q=16, block_size_k=16, seqlen_q=32, seqlen_k=32)


def test_block_layout_rejects_bad_sizes():
    counts, indices = valid_block_layout()
    with pytest.raises(ValueError, match="block_size_k"):
        BlockLayout(counts, indices, block_size_q=16, block_size_k=0, seqlen_q=32, seqlen_k=32)
    with pytest.raises(ValueError, match="block_mask: expected last dim"):
        BlockLayout.from_block_mask(torch.ones(1, 1, 2, 3, dtype=torch.bool), 16, 16, 32, 32)


def vs_parts():
    one = torch.ones(1, 1, 1, dtype=torch.int32)
    return dict(
        range_counts=one.clone(),
        range_starts=torch.tensor([[[[2]]]], dtype=torch.int32),
        range_ends=torch.tensor([[[[5]]]], dtype=torch.int32),
        column_counts=one * 2,
        column_indices=torch.tensor([[[[0, 7]]]], dtype=torch.int32),
    )


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("range_starts", torch.tensor([[[[6]]]], dtype=torch.int32), "start < end"),
        ("range_ends", torch.tensor([[[[99]]]], dtype=torch.int32), "end <= seqlen_k"),
        ("column_indices", torch.tensor([[[[7, 0]]]], dtype=torch.int32), "strictly increasing"),
        ("column_indices", torch.tensor([[[[0, 3]]]], dtype=torch.int32), "inside one of its query block's ranges"),
        ("column_indices", torch.tensor([[[[0, 16]]]], dtype=torch.int32), r"key ids in \[0, 16\)"),
        ("column_indices", torch.tensor([[[[0, 7]]]], dtype=torch.int64), "column_indices: expected dtype"),
        ("column_counts", torch.full((1, 1, 1), 3, dtype=torch.int32), "column_counts: expected values"),
    ],
)
def test_vertical_slash_layout_rejects_bad_input(field, value, match):
    parts = vs_parts()
    parts[field] = value
    with pytest.raises((ValueError, TypeError), match=match):
        VerticalSlashLayout(**parts, block_size_q=16, seqlen_q=16, seqlen_k=16)


def test_vertical_slash_layout_rejects_overlapping_ranges():
    parts = vs_parts()
    parts["range_counts"] = parts["range_counts"] * 2
    parts["range_starts"] = torch.tensor([[[[2, 4]]]], dtype=torch.int32)
    parts["range_ends"] = torch.tensor([[[[5, 6]]]], dtype=torch.int32)
    parts["column_indices"] = torch.tensor([[[[0, 8]]]], dtype=torch.int32)
    with pytest.raises(ValueError, match="non-overlapping"):
        VerticalSlashLayout(**parts, block_size_q=16, seqlen_q=16, seqlen_k=16)


@given(st.sampled_from([BlockLayout, VerticalSlashLayout]), st.integers(0, 2**31 - 1), st.integers(1, 70),
       st.integers(1, 70), st.sampled_from([4, 8, 16]))
def test_mass_overrides_equal_the_mask_definition(kind, seed, sq, sk, block):
    """row_mass (a chunk of softmax rows) and kept (per-block sums prepared once as KeySums, self-attention
    geometry) of each layout type equal the generic Layout forms, which read the layout's boolean mask;
    to(device) keeps every entry."""
    g = torch.Generator().manual_seed(seed)
    options = dict(density=0.4, causal=False) if kind is BlockLayout else dict(widths=[1, 2, 5, 13])
    layout = random_layout(kind, g, 1, 2, sq, sk, block, device=CPU, **options)
    p = torch.rand(2, sq, sk, generator=g, dtype=torch.float64)
    for row_start in sorted({0, sq // 3}):
        rows = p[:, row_start:]
        want = Layout.row_mass(layout, rows, 0, row_start)
        assert torch.allclose(layout.row_mass(rows, 0, row_start), want, atol=1e-12)
    square = random_layout(kind, g, 1, 2, sk, sk, block, device=CPU, **options)
    sums = KeySums.of(torch.rand(2, square.num_query_blocks, sk, generator=g), block)
    assert torch.allclose(square.kept(sums), Layout.kept(square, sums), atol=1e-9)
    moved = layout.to(CPU)
    assert type(moved) is kind and torch.equal(moved.to_dense(), layout.to_dense())
