"""Vertical-slash attention kernel vs the fp32 reference with the same layout (the tolerance rule of
tests/helpers.py), and the plan: tile lists, spilled tails, the shared-first range order, explicit plans.

Tests without the `gpu` mark run on CPU tensors (the Triton interpreter), the explicit-plan ones on the GPU where
there is one; outputs and the index are poisoned."""
import functools
import logging

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import DEV, check_attention, count_launches, packed_qkv, qkv, randn, random_layout
from sparse_attn import ops
from sparse_attn.estimators.vertical_slash import build_vertical_slash_index
from sparse_attn.layouts import VerticalSlashLayout
from sparse_attn.ops import vertical_slash as vs
from sparse_attn.ops.reference import reference_attention
from sparse_attn.ops.vertical_slash import kernel as vs_kernel
from sparse_attn.ops.vertical_slash import not_supported_reasons, vertical_slash_attention

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

CPU = "cpu"
assert_close_to_reference = functools.partial(check_attention, vertical_slash_attention)


def diagonals_layout(b, hq, sq, sk, bq, nv, ns, device=CPU, seed=0):
    """nv random key columns and ns diagonals (half near the main one) through the index builder."""
    return random_layout(VerticalSlashLayout, seed, b, hq, sq, sk, bq, verticals=nv, slashes=ns, device=device)


def hand_made_layout(gen, b, h, sq, sk, bq, widths):
    """Per block: up to 6 ranges in order along the keys, widths drawn from `widths`, random gaps (0
    included: touching ranges), plus up to 5 columns outside them."""
    return random_layout(VerticalSlashLayout, gen, b, h, sq, sk, bq, widths=widths, device=CPU)


def grouped_layout(gen, b, hkv, group, sq, sk, bq, device=CPU):
    """A layout whose query heads of one kv head share most diagonals (as real heads do), plus a few of
    their own, and have random columns: blocks hold ranges that 0..group-1 other heads also cover."""
    return random_layout(VerticalSlashLayout, gen, b, hkv * group, sq, sk, bq, verticals=6, slashes=8, near=3,
                         near_width=2 * bq, shared=12, group=group, device=device)


def tile_lists(layout, lengths, num_heads, bn, causal, **kw):
    """kernel._tile_lists of a padded (not packed) layout."""
    dummy = layout.range_counts
    return vs_kernel._tile_lists(layout, (dummy, dummy), lengths, num_heads, bn, causal, False, **kw)


@st.composite
def attention_case(draw):
    return dict(
        b=draw(st.integers(1, 2)),
        hkv=draw(st.integers(1, 2)),
        group=draw(st.sampled_from([1, 2, 3])),
        sq=draw(st.integers(1, 150)),
        extra_k=draw(st.integers(-20, 80)),
        d=draw(st.sampled_from([16, 32, 64])),
        bq=draw(st.sampled_from([16, 32, 64])),
        dtype=draw(st.sampled_from([torch.float16, torch.float32])),
        causal=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@given(attention_case())
def test_matches_reference(case):
    c = case
    sq, sk = c["sq"], max(1, c["sq"] + c["extra_k"])
    hq = c["hkv"] * c["group"]
    q, k, v = qkv(c["seed"], c["b"], hq, c["hkv"], sq, sk, c["d"], dtype=c["dtype"], device=CPU)
    layout = diagonals_layout(c["b"], hq, sq, sk, c["bq"], nv=9, ns=6, seed=c["seed"])
    assert_close_to_reference(q, k, v, layout, causal=c["causal"])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_hand_made_ranges(causal, dtype):
    """Ranges from 1 key to a few tiles wide, touching or apart, several within one tile, in one call."""
    gen = torch.Generator().manual_seed(21)
    b, h, sq, sk, bq = 1, 4, 300, 520, 64
    layout = hand_made_layout(gen, b, h, sq, sk, bq, widths=[1, 3, 17, 64, 65, 100, 130])
    q, k, v = qkv(gen, b, h, 2, sq, sk, 32, dtype=dtype, device=CPU)
    assert_close_to_reference(q, k, v, layout, causal=causal)


def expected_tile_sections(layout, b, h, qb, bn, causal, split, spill=0):
    """Python model of one block's tile list: (BN-wide tiles every row sees (only with split), the other
    tiles every row sees, tiles that may cross the causal limit), each a list of (start, end) in range order,
    and the keys spilled: a range every row sees, wider than BN, whose last tile would hold 1..spill keys
    loses that tile, its keys gathered instead."""
    reach, first = block_reach(layout, qb, causal)
    wide, short, cross, spilled = [], [], [], []
    for r in range(int(layout.range_counts[b, h, qb])):
        start, end = int(layout.range_starts[b, h, qb, r]), min(int(layout.range_ends[b, h, qb, r]), reach)
        rest = max(end - start, 0) % bn
        if end <= first and end - start > bn and 0 < rest <= spill:
            spilled += range(end - rest, end)
            end -= rest
        for t in range(start, end, bn):
            tile = (t, min(t + bn, end))
            if tile[1] > first:
                cross.append(tile)
            else:
                (wide if split and tile[1] - t == bn else short).append(tile)
    return wide, short, cross, spilled


def block_reach(layout, qb, causal):
    """(keys below this are seen by some row of query block qb, keys below this by every row)."""
    sq, sk, bm = layout.seqlen_q, layout.seqlen_k, layout.block_size_q
    q0 = qb * bm
    if not causal:
        return sk, sk
    return min(sk, min(q0 + bm, sq) + sk - sq), max(min(sk, q0 + sk - sq + 1), 0)


@given(seed=st.integers(0, 2**31 - 1), causal=st.booleans(), extra_k=st.integers(-40, 120),
       bn=st.sampled_from([16, 32, 64]), split=st.booleans(), spill=st.sampled_from([0, 1, 7, "half", "max"]))
def test_plan_lists_each_blocks_tiles_in_three_sections(seed, causal, extra_k, bn, split, spill):
    """The plan's list, block by block: with split, the BN-wide tiles every row sees (the kernel may
    run them without a mask), then the other tiles every row sees (without split: all of them, in range
    order), then those that may cross the causal limit; together exactly the ranges clipped to what the
    block's rows can see, cut every BN keys, less the spilled tiles. After them the keys the block gathers:
    its visible columns every row sees, the spilled keys, its other visible columns."""
    gen = torch.Generator().manual_seed(seed)
    b, h, sq, bq = 2, 3, 200, 32
    sk = max(1, sq + extra_k)
    spill = {"half": bn // 2, "max": bn - 1}.get(spill, spill)
    layout = hand_made_layout(gen, b, h, sq, sk, bq,
                              widths=[1, 5, bn - 1, bn, bn + 1, bn + bn // 2, 2 * bn, 3 * bn + 7, 2 * bn - 1])
    counts, first_tile, t_start, t_end = tile_lists(layout, (sq, sk), h, bn, causal, split=split, spill=spill)
    sizes = (counts[..., 0] + counts[..., 2]).flatten()
    assert torch.equal(first_tile.flatten(), sizes.cumsum(0) - sizes)  # blocks one after the other
    for bi in range(b):
        for hi in range(h):
            for qb in range(layout.num_query_blocks):
                n_tiles, n_full, n_gathered, n_seen, n_wide, n_spill = counts[bi, hi, qb].tolist()
                at = int(first_tile[bi, hi, qb])
                got = list(zip(t_start[at:at + n_tiles].tolist(), t_end[at:at + n_tiles].tolist()))
                wide, short, cross, spilled = expected_tile_sections(layout, bi, hi, qb, bn, causal, split, spill)
                assert (n_wide, n_full, n_tiles) == (len(wide), len(wide) + len(short), len(got))
                assert got == wide + short + cross, (bi, hi, qb)
                reach, first = block_reach(layout, qb, causal)
                cols = layout.column_indices[bi, hi, qb, :int(layout.column_counts[bi, hi, qb])].tolist()
                want = [c for c in cols if c < first] + spilled + [c for c in cols if first <= c < reach]
                gathered = t_start[at + n_tiles:at + n_tiles + n_gathered].tolist()
                assert gathered == want, (bi, hi, qb)
                assert (n_spill, n_seen) == (len(spilled), len(want) - sum(first <= c < reach for c in cols))


def test_plan_spills_short_tails_of_wide_ranges():
    """The case spilling exists for: ranges one key wider than a tile lose their one-key tile (else the test
    above could pass with a plan that never spills)."""
    gen = torch.Generator().manual_seed(4)
    layout = hand_made_layout(gen, 1, 2, 256, 2048, 64, widths=[65])
    kept = tile_lists(layout, (256, 2048), 2, 64, True, spill=0)[0]
    spilled = tile_lists(layout, (256, 2048), 2, 64, True, spill=1)[0]
    assert spilled[..., 5].sum() > 0
    assert torch.equal(kept[..., 0] - spilled[..., 0], spilled[..., 5])  # one tile less per spilled key
    assert torch.equal(spilled[..., 2] - kept[..., 2], spilled[..., 5])


def shared_first_reference(layout, group):
    """Python model of kernel._group_order: per block, the ranges stably sorted by how few of the group's other
    heads have a range holding the range's middle key, as a list [b][h][qb] of (start, end) lists."""
    def ranges(bi, hi, qb):
        n = int(layout.range_counts[bi, hi, qb])
        return list(zip(layout.range_starts[bi, hi, qb, :n].tolist(), layout.range_ends[bi, hi, qb, :n].tolist()))

    b, h, nqb = layout.range_counts.shape
    out = []
    for bi in range(b):
        out.append([])
        for hi in range(h):
            out[bi].append([])
            others = [o for o in range(hi - hi % group, hi - hi % group + group) if o != hi]
            for qb in range(nqb):
                own = ranges(bi, hi, qb)
                other_ranges = [ranges(bi, o, qb) for o in others]

                def missing(r):
                    mid = r[0] + (r[1] - r[0]) // 2
                    return sum(not any(s <= mid < e for s, e in rs) for rs in other_ranges)

                out[bi][hi].append(sorted(own, key=missing))
    return out


@given(seed=st.integers(0, 2**31 - 1), group=st.sampled_from([2, 3, 4, 6]), hkv=st.integers(1, 2),
       b=st.integers(1, 2), bq=st.sampled_from([32, 64]), sq=st.integers(1, 200), extra_k=st.integers(-40, 200))
def test_group_order_sorts_each_blocks_ranges_shared_first(seed, group, hkv, b, bq, sq, extra_k):
    gen = torch.Generator().manual_seed(seed)
    sk = max(1, sq + extra_k)
    layout = grouped_layout(gen, b, hkv, group, sq, sk, bq)
    starts, ends = vs_kernel._group_order(layout, group)
    expected = shared_first_reference(layout, group)
    for bi in range(b):
        for hi in range(hkv * group):
            for qb in range(layout.num_query_blocks):
                n = int(layout.range_counts[bi, hi, qb])
                got = list(zip(starts[bi, hi, qb, :n].tolist(), ends[bi, hi, qb, :n].tolist()))
                assert got == expected[bi][hi][qb], (bi, hi, qb)


def test_group_order_moves_ranges():
    """The case the order exists for: some blocks' key order and shared-first order differ (else the test
    above could not tell a kernel that copies its input)."""
    layout = grouped_layout(torch.Generator().manual_seed(3), 1, 2, 4, 128, 1024, 16)
    starts, _ = vs_kernel._group_order(layout, 4)
    n = layout.range_counts
    live = torch.arange(layout.max_ranges) < n[..., None]
    assert ((starts != layout.range_starts) & live).any()


@pytest.mark.parametrize("causal", [True, False])
def test_plan_in_group_order_lists_the_same_tiles_shared_first(monkeypatch, causal):
    monkeypatch.setattr(vs_kernel, "GROUP_ORDER_MIN_KEYS", 0)
    gen = torch.Generator().manual_seed(5)
    group, sq, sk, bn = 3, 250, 300, 32
    layout = grouped_layout(gen, 2, 1, group, sq, sk, 32)
    expected = shared_first_reference(layout, group)
    b, h, nqb = layout.range_counts.shape
    m = layout.max_ranges
    padded = torch.tensor([[[(r + [(0, 0)] * m)[:m] for r in row] for row in bb] for bb in expected],
                          dtype=torch.int32)  # [b, h, nqb, m, (start, end)]
    reordered = VerticalSlashLayout(layout.range_counts, padded[..., 0].contiguous(), padded[..., 1].contiguous(),
                                    layout.column_counts, layout.column_indices, layout.block_size_q, sq, sk,
                                    validate=False)
    counts, first_tile, t_start, t_end = tile_lists(layout, (sq, sk), h, bn, causal, split=False, group=group)
    spill = min(vs_kernel.SPILL_KEYS, bn - 1)  # the plan's default
    moved = 0
    for bi in range(b):
        for hi in range(h):
            for qb in range(nqb):
                n_tiles = int(counts[bi, hi, qb, 0])
                at = int(first_tile[bi, hi, qb])
                got = list(zip(t_start[at:at + n_tiles].tolist(), t_end[at:at + n_tiles].tolist()))
                _, short, cross, _ = expected_tile_sections(reordered, bi, hi, qb, bn, causal, False, spill)
                assert got == short + cross, (bi, hi, qb)
                _, short0, cross0, _ = expected_tile_sections(layout, bi, hi, qb, bn, causal, False, spill)
                moved += got != short0 + cross0
    assert moved > 0


def force_group_order(monkeypatch):
    """The shared-first range order switched on at any length; returns a list that grows by one per use."""
    monkeypatch.setattr(vs_kernel, "GROUP_ORDER_MIN_KEYS", 0)
    calls = []
    real = vs_kernel._group_order
    monkeypatch.setattr(vs_kernel, "_group_order", lambda *a: (calls.append(1), real(*a))[1])
    return calls


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("group", [3, 4])
def test_group_order_attention_matches_reference(monkeypatch, causal, group):
    """Shared-first order forced on at a short length: the same attention (the fp32 reference's)."""
    calls = force_group_order(monkeypatch)
    gen = torch.Generator().manual_seed(group)
    sq, sk = 200, 260
    layout = grouped_layout(gen, 1, 2, group, sq, sk, 64)
    q, k, v = qkv(gen, 1, 2 * group, 2, sq, sk, 32, dtype=torch.float16, device=CPU)
    assert_close_to_reference(q, k, v, layout, causal=causal)
    assert calls


@pytest.mark.parametrize("wide_unmasked", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_wide_tiles_with_and_without_mask_match_reference_when_scores_jump(monkeypatch, wide_unmasked, causal):
    """Keys scaled up in places make later tiles' scores exceed the running max by far (and some keys fall
    far below it); BN-wide tiles run with or without a mask: both give the reference's answer."""
    for cfg in vs_kernel.CONFIG.values():
        monkeypatch.setitem(cfg, "wide_unmasked", wide_unmasked)
    gen = torch.Generator().manual_seed(5)
    b, h, sq, sk, bq, d = 1, 2, 256, 300, 64, 32
    layout = hand_made_layout(gen, b, h, sq, sk, bq, widths=[17, 64, 100, 130])
    q, k, v = qkv(gen, b, h, 1, sq, sk, d, device=CPU)
    k[:, :, 150:220] *= 6.0  # later range tiles jump far above the first ones
    k[:, :, torch.randperm(sk, generator=gen)[:40]] *= -4.0  # and some keys fall far below
    assert_close_to_reference(q, k, v, layout, causal=causal)
    assert_close_to_reference(q.half(), k.half(), v.half(), layout, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("group, sq, sk", [(2, 300, 520), (4, 131, 131), (4, 200, 90)])
def test_shared_heads_two_per_program(causal, group, sq, sk):
    """Heads sharing their index run two per program (one 128-row tile of two heads' 64-row blocks):
    same result as the reference; a layout without the promise, or an odd group, runs one per program."""
    gen = torch.Generator().manual_seed(group + sq)
    b, hkv, bq = 2, 2, 64
    hq = hkv * group
    layout = hand_made_layout(gen, b, hq // 2, sq, sk, bq, widths=[1, 5, 64, 65, 130]).repeat_heads(2)
    assert layout.shared_heads == 2 and layout.num_heads == hq
    assert vs_kernel.heads_per_program(layout, group, fp32=False) == 2
    assert vs_kernel.heads_per_program(layout, 3, fp32=False) == 1
    q, k, v = qkv(gen, b, hq, hkv, sq, sk, 32, dtype=torch.float16, device=CPU)
    assert_close_to_reference(q, k, v, layout, causal=causal)
    # HF's [B, S, H, D] memory, and packed varlen sequences
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert_close_to_reference(qt, kt, vt, layout, causal=causal)
    if sq <= sk:
        cu_q = torch.tensor([0, sq - 7, 2 * sq - 7], dtype=torch.int32)
        cu_k = torch.tensor([0, sk - 7, 2 * sk - 7], dtype=torch.int32)
        qp = q.transpose(1, 2).flatten(0, 1)[: 2 * sq - 7]
        kp, vp = (x.transpose(1, 2).flatten(0, 1)[: 2 * sk - 7] for x in (k, v))
        assert_close_to_reference(qp, kp, vp, layout, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_plan_of_shared_heads_holds_one_head_per_run():
    """Two heads per program plan only the first head of each pair: its counts and tile lists are the ones a
    plan of every head gives that head, and there are half as many tiles."""
    gen = torch.Generator().manual_seed(11)
    b, hq, sq, sk = 2, 8, 300, 520
    layout = hand_made_layout(gen, b, hq // 2, sq, sk, 64, widths=[1, 5, 64, 65, 130]).repeat_heads(2)
    every = tile_lists(layout, (sq, sk), hq, 64, True)
    pairs = tile_lists(layout, (sq, sk), hq, 64, True, hp=2)
    assert pairs[0].shape == (b, hq // 2, *every[0].shape[2:])
    assert torch.equal(pairs[0], every[0][:, ::2])

    def tiles(plan, block):
        counts, first, t_start, t_end = plan
        i, n = int(first.flatten()[block]), int(counts.flatten(0, 2)[block, 0])
        return t_start[i:i + n].tolist(), t_end[i:i + n].tolist()

    nqb = layout.num_query_blocks
    for bb in range(b):
        for run in range(hq // 2):
            for qb in range(nqb):
                assert tiles(pairs, (bb * hq // 2 + run) * nqb + qb) == tiles(every, (bb * hq + 2 * run) * nqb + qb)
    assert 2 * pairs[2].numel() in (every[2].numel(), every[2].numel() + 1)  # sized max(1, total)


def test_shared_heads_promise_is_checked():
    gen = torch.Generator().manual_seed(5)
    layout = hand_made_layout(gen, 1, 4, 100, 100, 32, widths=[3, 40])
    parts = dict(range_counts=layout.range_counts, range_starts=layout.range_starts, range_ends=layout.range_ends,
                 column_counts=layout.column_counts, column_indices=layout.column_indices, block_size_q=32,
                 seqlen_q=100, seqlen_k=100)
    with pytest.raises(ValueError, match="shared_heads=2 promises identical entries"):
        VerticalSlashLayout(**parts, shared_heads=2)
    with pytest.raises(ValueError, match="shared_heads: expected a divisor of the number of heads"):
        VerticalSlashLayout(**parts, shared_heads=3)
    twice = layout.repeat_heads(2)
    VerticalSlashLayout(**{n: getattr(twice, n) for n in parts}, shared_heads=2)  # the promise holds
    assert torch.equal(twice.to_dense()[:, ::2], layout.to_dense())


def test_rows_without_keys():
    """More queries than keys: the first rows see no key (0, lse -inf); one long range, many tiles."""
    q, k, v = qkv(1, 1, 2, 2, 200, 90, 32, dtype=torch.float16, device=CPU)
    layout = build_vertical_slash_index(torch.tensor([[[3, 50]] * 2]), torch.arange(80).expand(1, 2, 80), 200, 90, 32)
    out, lse = assert_close_to_reference(q, k, v, layout)
    assert (out[:, :, :110] == 0).all() and torch.isneginf(lse[:, :, :110]).all()


def test_transposed_views_and_scale():
    """HF hands over [B, S, H, D] memory viewed as [B, H, S, D]: read through strides, never copied."""
    q, k, v = qkv(2, 2, 4, 2, 70, d=32, dtype=torch.float16, device=CPU, hf=True)
    assert not q.is_contiguous() and not k.is_contiguous()
    layout = diagonals_layout(2, 4, 70, 70, 16, nv=5, ns=4)
    out, _ = assert_close_to_reference(q, k, v, layout, scale=0.3)
    assert out.stride() == q.stride()


def test_varlen_packed():
    lens_q, lens_k = [37, 1, 90], [60, 20, 90]
    q, k, v, cu_q, cu_k = packed_qkv(3, lens_q, lens_k, 4, 2, 32, dtype=torch.float16, device=CPU)
    layout = diagonals_layout(3, 4, max(lens_q), max(lens_k), 32, nv=7, ns=5, seed=3)
    assert_close_to_reference(q, k, v, layout, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert_close_to_reference(q, k, v, layout, causal=False, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_unsupported_falls_back_with_one_warning(caplog):
    q, k, v = qkv(4, 1, 2, 2, 40, d=24, device=CPU)
    layout = diagonals_layout(1, 2, 40, 40, 16, nv=3, ns=3)
    assert any("head_dim 24" in r for r in not_supported_reasons(q, k, v, layout))
    with caplog.at_level(logging.WARNING, logger="sparse_attn"):
        out = vertical_slash_attention(q, k, v, layout)
        vertical_slash_attention(q, k, v, layout)
    assert sum("head_dim 24" in r.message for r in caplog.records) == 1
    assert torch.allclose(out, reference_attention(q, k, v, layout, causal=True))
    q32, k32, v32 = qkv(5, 1, 2, 2, 40, d=32, device=CPU)
    assert not_supported_reasons(q32, k32, v32, layout) == []


def test_backend_choice_is_checked_and_gluon_falls_back_with_one_warning(monkeypatch, caplog):
    """SPARSE_ATTN_VS_BACKEND: a wrong value is an error naming it; "gluon" where the Gluon kernel cannot run
    (here: CPU tensors) gives the Triton kernel's result and says so once."""
    from sparse_attn import _checks

    q, k, v = qkv(3, 1, 2, 1, 100, d=32, device=CPU)
    layout = diagonals_layout(1, 2, 100, 100, 64, nv=10, ns=10)
    monkeypatch.setenv("SPARSE_ATTN_VS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend"):
        vertical_slash_attention(q, k, v, layout)
    monkeypatch.setenv("SPARSE_ATTN_VS_BACKEND", "gluon")
    monkeypatch.setattr(_checks, "_warned", set())
    with caplog.at_level(logging.WARNING):
        assert_close_to_reference(q, k, v, layout)
        assert_close_to_reference(q, k, v, layout)
    assert sum("Gluon backend" in r.getMessage() for r in caplog.records) == 1
    for unset in (True, False):  # "auto", the default, takes Triton here without a word
        if unset:
            monkeypatch.delenv("SPARSE_ATTN_VS_BACKEND")
        else:
            monkeypatch.setenv("SPARSE_ATTN_VS_BACKEND", "auto")
        monkeypatch.setattr(_checks, "_warned", set())
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert_close_to_reference(q, k, v, layout)
        assert not any("Gluon" in r.getMessage() for r in caplog.records)


def test_bad_inputs():
    q, k, v = qkv(6, 1, 2, 2, 40, d=16, device=CPU)
    layout = diagonals_layout(1, 2, 40, 40, 16, nv=3, ns=3)
    with pytest.raises(TypeError, match="layout: expected a VerticalSlashLayout"):
        vertical_slash_attention(q, k, v, torch.ones(1, 2, 40, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match="layout: expected batch"):
        vertical_slash_attention(q, k, v, diagonals_layout(1, 3, 40, 40, 16, nv=3, ns=3))
    with pytest.raises(ValueError, match="layout: expected seqlen_q"):
        vertical_slash_attention(q, k, v, diagonals_layout(1, 2, 30, 40, 16, nv=3, ns=3))
    with pytest.raises(ValueError, match="scale"):
        vertical_slash_attention(q, k, v, layout, scale=-1.0)
    with pytest.raises(ValueError, match="k: expected a number of kv heads"):
        vertical_slash_attention(q, randn(7, 1, 3, 40, 16, device=CPU), randn(8, 1, 3, 40, 16, device=CPU), layout)
    with pytest.raises(TypeError, match="k, v: expected the dtype of q"):
        vertical_slash_attention(q, k.half(), v.half(), layout)


# ------------------------------------------------------------------------------------------ explicit plans

PLAN_KERNELS = ("_count_kernel", "_tiles_kernel")  # these tests run on DEV: the GPU where there is one


@pytest.mark.parametrize("causal", [True, False])
def test_plan_is_reused_across_calls_with_one_launch(monkeypatch, causal):
    """A plan made once (the tile lists: two launches and one device sync) serves every call with its layout and
    shapes: each call is then the attention launch alone, with the output of a call that plans for itself, on
    fresh inputs too; nothing is ever stored on the layout."""
    gen = torch.Generator().manual_seed(31)
    sq, sk = 150, 190
    q, k, v = qkv(gen, 1, 4, 2, sq, sk, 32, dtype=torch.float16, device=DEV)
    layout = hand_made_layout(gen, 1, 4, sq, sk, 32, widths=[1, 5, 64, 65, 100]).to(DEV)
    before = dict(layout.__dict__)
    launches = count_launches(monkeypatch, vs_kernel, *PLAN_KERNELS, "_vs_attn_kernel")
    plan_launches = lambda: sum(len(launches[n]) for n in PLAN_KERNELS)  # noqa: E731
    own, _ = assert_close_to_reference(q, k, v, layout, causal=causal)
    assert (plan_launches(), len(launches["_vs_attn_kernel"])) == (2, 1)
    p = vs.plan(q, k, v, layout, causal=causal)
    assert isinstance(p, vs_kernel.Plan) and p.layout is layout and p.backend == "triton"
    assert plan_launches() == 4
    with_plan, _ = assert_close_to_reference(q, k, v, layout, causal=causal, plan=p)
    assert torch.equal(with_plan, own)
    for _ in range(2):
        q2, k2, v2 = qkv(gen, 1, 4, 2, sq, sk, 32, dtype=torch.float16, device=DEV)
        assert_close_to_reference(q2, k2, v2, layout, causal=causal, plan=p)
    assert (plan_launches(), len(launches["_vs_attn_kernel"])) == (4, 4)
    assert torch.equal(ops.attention(q, k, v, layout, causal=causal, plan=p), own)  # the family entry
    assert isinstance(ops.plan(q, k, v, layout, causal=causal), vs_kernel.Plan)
    assert layout.__dict__.keys() == before.keys()
    assert all(layout.__dict__[key] is value for key, value in before.items())


def test_a_plan_for_another_layout_or_other_shapes_is_refused():
    gen = torch.Generator().manual_seed(32)
    sq = 100
    q, k, v = qkv(gen, 1, 4, 2, sq, d=32, dtype=torch.float16, device=DEV)
    layout = diagonals_layout(1, 4, sq, sq, 32, nv=5, ns=6, seed=32, device=DEV)
    p = vs.plan(q, k, v, layout)
    twin = VerticalSlashLayout(*(t.clone() for t in layout._parts()), 32, sq, sq)  # the same entries
    with pytest.raises(ValueError, match="plan: made for another layout"):
        vertical_slash_attention(q, k, v, twin, plan=p)
    with pytest.raises(ValueError, match="plan: made for"):
        vertical_slash_attention(q, k, v, layout, causal=False, plan=p)
    with pytest.raises(ValueError, match="plan: made for"):
        vertical_slash_attention(q[:, :, :70], k[:, :, :70], v[:, :, :70], layout, plan=p)
    with pytest.raises(ValueError, match="plan: made for"):
        vertical_slash_attention(q.float(), k.float(), v.float(), layout, plan=p)
    with pytest.raises(ValueError, match="plan: made for"):  # the same heads, one kv head fewer
        vertical_slash_attention(q, k[:, :1], v[:, :1], layout, plan=p)
    with pytest.raises(TypeError, match="plan: expected what vertical_slash.plan"):
        vertical_slash_attention(q, k, v, layout, plan=p.tensors())
    qp, kp, vp, cu_q, cu_k = packed_qkv(gen, [37, 50], [37, 60], 4, 2, 32, dtype=torch.float16, device=DEV)
    packed = diagonals_layout(2, 4, 50, 60, 32, nv=5, ns=6, seed=33, device=DEV)
    pp = vs.plan(qp, kp, vp, packed, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert_close_to_reference(qp, kp, vp, packed, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, plan=pp)
    with pytest.raises(ValueError, match="plan: made for"):  # bound to its cu_seqlens
        vertical_slash_attention(qp, kp, vp, packed, cu_seqlens_q=cu_q.clone(), cu_seqlens_k=cu_k, plan=pp)
    wide = qkv(gen, 1, 4, 2, sq, d=24, device=DEV)  # head dim 24: the reference runs, no plan
    assert vs.plan(*wide, layout) is None


def test_plan_choices_heads_and_backend():
    """plan(..., heads=, backend=) override the kernel's choice (benchmarks): one head per program on a
    shared-heads layout, where two would be the default, gives the same attention."""
    gen = torch.Generator().manual_seed(34)
    sq, sk = 130, 130
    q, k, v = qkv(gen, 1, 4, 2, sq, sk, 32, dtype=torch.float16, device=DEV)
    layout = hand_made_layout(gen, 1, 2, sq, sk, 64, widths=[1, 5, 64, 65]).repeat_heads(2).to(DEV)
    default = vs.plan(q, k, v, layout)
    single = vs.plan(q, k, v, layout, heads=1, backend="triton")
    assert (default.heads, single.heads) == (2, 1) and single.backend == "triton"
    a, _ = assert_close_to_reference(q, k, v, layout, plan=default)
    b, _ = assert_close_to_reference(q, k, v, layout, plan=single)
    with pytest.raises(ValueError, match="heads"):
        vs.plan(q, k, v, layout, heads=4)


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("sq, sk", [(4096, 4096), (3001, 5003), (8192, 8192)])
def test_gpu_matches_reference(dtype, d, sq, sk):
    q, k, v = qkv(sq + d, 1, 8, 2, sq, sk, d, dtype=dtype, device="cuda")
    layout = diagonals_layout(1, 8, sq, sk, 64, nv=300, ns=200, device="cuda", seed=sq)
    assert_close_to_reference(q, k, v, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["gluon", "triton"])
def test_gpu_group_order_matches_reference(monkeypatch, backend):
    """The shared-first range order (on by default only from GROUP_ORDER_MIN_KEYS keys) forced on at 6K."""
    monkeypatch.setenv("SPARSE_ATTN_VS_BACKEND", backend)
    calls = force_group_order(monkeypatch)
    gen = torch.Generator().manual_seed(11)
    sq = sk = 6144
    layout = grouped_layout(gen, 1, 2, 4, sq, sk, 64, device="cuda")
    q, k, v = qkv(gen, 1, 8, 2, sq, sk, 128, dtype=torch.bfloat16, device="cuda")
    assert_close_to_reference(q, k, v, layout)
    assert calls


def packed_gpu_case(seed):
    """Three packed bf16 sequences on the GPU (one of a single query), 8 query / 2 kv heads, D=128: (q, k,
    v, layout, cu_seqlens_q, cu_seqlens_k)."""
    dev, dt = "cuda", torch.bfloat16
    q, k, v, cu_q, cu_k = packed_qkv(seed, [1000, 1, 4000], [3000, 100, 4000], 8, 2, 128, dtype=dt, device=dev)
    layout = diagonals_layout(3, 8, 4000, 4000, 64, nv=200, ns=100, device=dev, seed=seed)
    return q, k, v, layout, cu_q, cu_k


def count_gluon_calls(monkeypatch, backend, loads):
    """Select the attention backend and count the Gluon kernel's launches (made with `loads`)."""
    from sparse_attn.ops.vertical_slash import hopper

    calls = []
    real = hopper.forward
    monkeypatch.setattr(hopper, "forward", lambda *a, **kw: (calls.append(1), real(*a, loads=loads, **kw))[1])
    monkeypatch.setenv("SPARSE_ATTN_VS_BACKEND", backend)
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("loads", ["tma", "cp.async"])
def test_gpu_gluon_kernels_compile_under_a_jit_hook(monkeypatch, loads):
    """vLLM installs a Triton JIT hook, and Triton then serialises each compile's constexprs as JSON: a
    Gluon kernel whose constexprs do not serialise failed at its first compile under vLLM alone. Fresh
    compiles of both Hopper kernels with a hook set, against the reference."""
    import collections

    import triton

    from sparse_attn.ops.vertical_slash import hopper

    if not (hopper.AVAILABLE and torch.cuda.get_device_capability() == (9, 0)):
        pytest.skip("the Gluon kernels need sm_90")
    hooked = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", lambda *a, **kw: hooked.append(1) and False)
    for kern in (hopper._vs_hopper_ws_kernel, hopper._vs_hopper_kernel):
        monkeypatch.setattr(kern, "device_caches", collections.defaultdict(kern.create_binder))
    calls = count_gluon_calls(monkeypatch, "gluon", loads)
    q, k, v = qkv(11, 1, 4, 2, 3000, 3000, 128, dtype=torch.bfloat16, device="cuda")
    assert_close_to_reference(q, k, v, diagonals_layout(1, 4, 3000, 3000, 64, nv=80, ns=90, device="cuda"))
    assert len(calls) == 1 and hooked


@pytest.mark.gpu
def test_gpu_varlen_and_views():
    q, k, v, layout, cu_q, cu_k = packed_gpu_case(5)
    dev, dt = "cuda", torch.bfloat16
    assert_close_to_reference(q, k, v, layout, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    qh, kh, vh = qkv(6, 1, 8, 2, 4096, d=128, dtype=dt, device=dev, hf=True)
    assert_close_to_reference(qh, kh, vh, diagonals_layout(1, 8, 4096, 4096, 64, nv=100, ns=100, device=dev))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_shared_heads_pairs_and_tma(dtype):
    """Two heads per program with K/V through TMA, on contiguous and HF-transposed inputs; odd lengths."""
    sq = sk = 8000
    q, k, v = qkv(7, 1, 8, 2, sq, sk, 128, dtype=dtype, device="cuda")
    layout = diagonals_layout(1, 4, sq, sk, 64, nv=300, ns=400, device="cuda", seed=7).repeat_heads(2)
    assert vs_kernel.heads_per_program(layout, 4, fp32=False) == 2
    assert vs_kernel.tma_descriptors(k, v, 64, False)[0] is not None
    assert_close_to_reference(q, k, v, layout)
    qh, kh, vh = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert_close_to_reference(qh, kh, vh, layout)


@pytest.mark.gpu
def test_gpu_long_sequence():
    """32K keys, MInference-like budgets (1000 vertical, 2048 slash), 2 heads of one kv head."""
    s, d, dt = 32768, 128, torch.bfloat16
    q, k, v = qkv(6, 1, 2, 1, s, s, d, dtype=dt, device="cuda")
    layout = diagonals_layout(1, 2, s, s, 64, nv=1000, ns=2048, device="cuda", seed=6)
    assert_close_to_reference(q, k, v, layout)


@pytest.mark.gpu
@pytest.mark.parametrize("loads", ["tma", "cp.async"])
def test_gpu_gluon_varlen_packed_matches_reference(monkeypatch, loads):
    """The Gluon kernels on packed varlen inputs (the warp-specialised one reads K/V through a [T, Hkv * D]
    view whose rows start at each sequence's first key), with a sequence of one query, causal and not."""
    from sparse_attn.ops.vertical_slash import hopper

    if not (hopper.AVAILABLE and torch.cuda.get_device_capability() == (9, 0)):
        pytest.skip("the Gluon kernels need sm_90")
    calls = count_gluon_calls(monkeypatch, "gluon", loads)
    q, k, v, layout, cu_q, cu_k = packed_gpu_case(7)
    for causal in (True, False):
        assert_close_to_reference(q, k, v, layout, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert len(calls) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["gluon-tma", "gluon-cp.async", "triton", "auto"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d, group, sq, sk, kv", [(128, 4, 4096, 4096, "contiguous"), (64, 1, 3001, 5003, "hf"),
                                                  (128, 2, 2500, 1900, "padded")])
def test_gpu_backends_match_reference(monkeypatch, backend, causal, d, group, sq, sk, kv):
    """The attention backends (the Gluon Hopper kernels: warp-specialised with a TMA loader, and every tile
    through cp.async; the Triton kernel; "auto", the default) against the reference, with K/V contiguous, as
    HF's transposed views and with a padded last dim (which TMA does not take: cp.async there). The Gluon
    kernel must really have run where the device is sm_90."""
    from sparse_attn.ops.vertical_slash import hopper

    backend, _, loads = backend.partition("-")
    calls = count_gluon_calls(monkeypatch, backend, loads or "tma")
    gen = torch.Generator().manual_seed(sq + d + group)
    dt = torch.bfloat16
    q = randn(gen, 1, 2 * group, sq, d, device="cuda", dtype=dt)
    if kv == "contiguous":
        k, v = randn(gen, 2, 1, 2, sk, d, device="cuda", dtype=dt)
    elif kv == "hf":
        k, v = randn(gen, 2, 1, sk, 2, d, device="cuda", dtype=dt).transpose(2, 3)
    else:
        k, v = randn(gen, 2, 1, 2, sk, d + 16, device="cuda", dtype=dt)[..., :d]
    layout = diagonals_layout(1, 2 * group, sq, sk, 64, nv=200, ns=300, device="cuda", seed=sq + d)
    assert_close_to_reference(q, k, v, layout, causal=causal)
    gluon_here = hopper.AVAILABLE and torch.cuda.get_device_capability() == (9, 0)
    expected = backend == "gluon" or (backend == "auto" and kv != "padded")  # auto: the TMA loader's layouts only
    assert len(calls) == (1 if expected and gluon_here else 0)
