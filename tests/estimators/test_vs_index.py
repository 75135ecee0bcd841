"""Vertical-slash index builder: the definition (brute force), backend agreement, errors. Its outputs start
poisoned (padding past the counts may stay so)."""
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparse_attn.estimators.vertical_slash as vertical_slash_pattern
from helpers import qkv
from sparse_attn.estimators.vertical_slash import build_vertical_slash_index
from sparse_attn.estimators.vertical_slash import index

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def brute_force(vertical, slash, seqlen_q, seqlen_k, block_size_q):
    """{(b, h, query block): (ranges, columns)} straight from the definition, in Python."""
    off = seqlen_k - seqlen_q
    out = {}
    for b in range(vertical.shape[0]):
        for h in range(vertical.shape[1]):
            for qb in range(-(-seqlen_q // block_size_q)):
                q0, q1 = qb * block_size_q, min((qb + 1) * block_size_q, seqlen_q)
                pieces = sorted(
                    (max(0, q0 + off - o), min(seqlen_k, q1 + off - o))
                    for o in set(slash[b, h].tolist())
                    if max(0, q0 + off - o) < min(seqlen_k, q1 + off - o)
                )
                merged = []
                for s, e in pieces:
                    if merged and s <= merged[-1][1]:
                        merged[-1] = (merged[-1][0], max(merged[-1][1], e))
                    else:
                        merged.append((s, e))
                cols = sorted(
                    j for j in set(vertical[b, h].tolist())
                    if j <= q1 - 1 + off and not any(s <= j < e for s, e in merged)
                )
                out[b, h, qb] = (merged, cols)
    return out


def live_entries(layout):
    out = {}
    for b in range(layout.batch):
        for h in range(layout.num_heads):
            for qb in range(layout.num_query_blocks):
                rc = int(layout.range_counts[b, h, qb])
                cc = int(layout.column_counts[b, h, qb])
                ranges = list(zip(layout.range_starts[b, h, qb, :rc].tolist(), layout.range_ends[b, h, qb, :rc].tolist()))
                out[b, h, qb] = (ranges, layout.column_indices[b, h, qb, :cc].tolist())
    return out


def assert_same_layout(a, b):
    """Same counts and the same live entries (padding past the counts is unspecified)."""
    for name in ("range_counts", "column_counts"):
        assert torch.equal(getattr(a, name), getattr(b, name).to(a.device)), name
    rl = torch.arange(a.max_ranges, device=a.device) < a.range_counts.unsqueeze(-1)
    cl = torch.arange(a.max_columns, device=a.device) < a.column_counts.unsqueeze(-1)
    for name, live, width in (("range_starts", rl, a.max_ranges), ("range_ends", rl, a.max_ranges),
                              ("column_indices", cl, a.max_columns)):
        x, y = getattr(a, name), getattr(b, name).to(a.device)[..., :width]
        assert torch.equal(x[live], y[live]), name


@st.composite
def index_case(draw):
    sq = draw(st.integers(1, 160))
    sk = draw(st.integers(max(1, sq - 40), sq + 60))
    bq = draw(st.sampled_from([16, 32, 64]))
    nv, ns = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    near = draw(st.booleans())  # diagonals near the main one merge often
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    vertical = torch.randint(0, sk, (2, 2, nv), generator=g, dtype=dtype)
    slash = torch.randint(0, min(sk, 3 * bq) if near else sk, (2, 2, ns), generator=g, dtype=dtype)
    return vertical, slash, sq, sk, bq


@given(index_case())
def test_builders_match_definition(case):
    vertical, slash, sq, sk, bq = case
    expected = brute_force(vertical, slash, sq, sk, bq)
    for backend in ("torch", "triton"):
        layout = build_vertical_slash_index(vertical, slash, sq, sk, bq, backend=backend)
        layout.check_values()
        assert layout.max_ranges <= slash.shape[-1] and layout.max_columns <= vertical.shape[-1]
        assert live_entries(layout) == expected, backend


@given(index_case())
def test_dense_mask_on_causal_entries(case):
    """On causally visible entries the layout admits exactly: some diagonal's band of the row's block,
    or a vertical column."""
    vertical, slash, sq, sk, bq = case
    layout = build_vertical_slash_index(vertical, slash, sq, sk, bq, backend="torch")
    off = sk - sq
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    band = j <= i + off
    q0 = i // bq * bq
    for b in range(2):
        for h in range(2):
            diag = torch.zeros(sq, sk, dtype=torch.bool)
            for o in slash[b, h].tolist():
                # block rows share the block's band: keys [q0 + off - o, q1 + off - o)
                diag |= (j >= q0 + off - o) & (j < torch.clamp(q0 + bq, max=sq) + off - o)
            cols = torch.zeros(sk, dtype=torch.bool)
            cols[vertical[b, h].long()] = True
            expected = (diag | cols[None, :]) & band
            assert torch.equal(layout.to_dense()[b, h] & band, expected)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernel on the interpreter")
@given(index_case(), st.booleans())
def test_prepare_kernel_gives_the_torch_tables(case, ascending_runs):
    """`_prepare_triton` (one Triton launch) gives `_prepare`'s per-head tables exactly: runs of both
    widths including their padding, run counts, both covered tables, sorted verticals and output widths;
    repeats in both inputs, blocks wider than the query."""
    vertical, slash, sq, sk, bq = case
    if ascending_runs:  # long runs that merge across chunk boundaries of the kernel's scan
        slash = torch.arange(slash.shape[-1], dtype=slash.dtype).expand_as(slash).clamp(max=sk - 1)
    a = index._prepare(vertical, slash, sq, sk, bq)
    b = index._prepare_triton(vertical, slash, sq, sk, bq)
    for name in ("run_hi", "run_lo", "run_count", "covered", "verticals"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.max_ranges, a.max_columns) == (b.max_ranges, b.max_columns)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernel on the interpreter")
@given(index_case())
def test_assume_sorted_skips_the_sorts_with_the_same_tables(case):
    """Rows sorted ascending (repeats kept), as the estimator returns them: assume_sorted gives the sorting
    path's tables and layout exactly."""
    vertical, slash, sq, sk, bq = case
    vertical, slash = vertical.sort(-1).values, slash.sort(-1).values
    a = index._prepare_triton(vertical, slash, sq, sk, bq)
    b = index._prepare_triton(vertical, slash, sq, sk, bq, assume_sorted=True)
    for name in ("run_hi", "run_lo", "run_count", "covered", "verticals"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.max_ranges, a.max_columns) == (b.max_ranges, b.max_columns)
    assert_same_layout(build_vertical_slash_index(vertical, slash, sq, sk, bq, backend="triton"),
                       build_vertical_slash_index(vertical, slash, sq, sk, bq, backend="triton", assume_sorted=True))


def test_dispatch_assumes_sorted_only_for_the_estimators_output(monkeypatch):
    """build_pattern skips the sorts for a VerticalSlashChoice (sorted by construction) and sorts a plain
    tuple, which may come in any order."""
    from sparse_attn import dispatch
    from sparse_attn.estimators import VerticalSlashChoice, estimate_vertical_slash

    seen = []
    real = vertical_slash_pattern.build_vertical_slash_index
    monkeypatch.setattr(vertical_slash_pattern, "build_vertical_slash_index",
                        lambda *a, **kw: seen.append(kw["assume_sorted"]) or real(*a, **kw))
    g = torch.Generator().manual_seed(3)
    q, k, _ = qkv(g, 1, 4, 2, 96, d=16, device="cpu")
    configs = [{"pattern": "vertical_slash", "vertical_size": 9, "slash_size": 7}] * 4
    est = estimate_vertical_slash(q, k, vertical_size=9, slash_size=7, last_q=16, backend="torch")
    assert isinstance(est, VerticalSlashChoice)
    assert all(bool((x[..., 1:] >= x[..., :-1]).all()) for x in est)
    typed = dispatch.build_pattern("vertical_slash", est, q, k, configs, block_size=16)
    shuffled = tuple(x.flip(-1) for x in est)  # a plain tuple, descending: must be sorted by the builder
    plain = dispatch.build_pattern("vertical_slash", shuffled, q, k, configs, block_size=16)
    assert seen == [True, False]
    assert_same_layout(typed, plain)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernel on the interpreter")
def test_prepare_kernel_long_inputs_and_range_errors(monkeypatch):
    """Several scan chunks (small chunks forced) and covered parts; out-of-range ids raise the same errors."""
    monkeypatch.setattr(index, "_PREP_CHUNK", 16)
    monkeypatch.setattr(index, "_PREP_PER_PROGRAM", 2)
    g = torch.Generator().manual_seed(4)
    sq, sk = 300, 517
    vertical = torch.randint(0, sk, (1, 2, 90), generator=g)
    slash = torch.cat([torch.arange(40).expand(1, 2, 40), torch.randint(0, sk, (1, 2, 50), generator=g)], -1)
    a = index._prepare(vertical, slash, sq, sk, 32)
    b = index._prepare_triton(vertical, slash, sq, sk, 32)
    for name in ("run_hi", "run_lo", "run_count", "covered", "verticals"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.max_ranges, a.max_columns) == (b.max_ranges, b.max_columns)
    with pytest.raises(ValueError, match="vertical_indices: expected key ids"):
        index._prepare_triton(vertical + sk, slash, sq, sk, 32)
    with pytest.raises(ValueError, match="slash_indices: expected diagonal offsets"):
        index._prepare_triton(vertical, slash - 100, sq, sk, 32)


def test_backends_agree_larger():
    g = torch.Generator().manual_seed(1)
    sq, sk = 700, 1000
    vertical = torch.randint(0, sk, (1, 3, 50), generator=g)
    slash = torch.cat([torch.arange(30).expand(1, 3, 30), torch.randint(0, sk, (1, 3, 40), generator=g)], -1)
    a = build_vertical_slash_index(vertical, slash, sq, sk, 64, backend="torch")
    b = build_vertical_slash_index(vertical, slash, sq, sk, 64, backend="triton")
    assert_same_layout(a, b)
    assert a.max_ranges == b.max_ranges and a.max_columns == b.max_columns


def test_any_order_and_repeats():
    v = torch.tensor([[[9, 3, 3, 70, 0]]])
    s = torch.tensor([[[5, 0, 5, 1]]])
    a = build_vertical_slash_index(v, s, 100, 100, 32, backend="torch")
    b = build_vertical_slash_index(v.unique(dim=-1), s.unique(dim=-1), 100, 100, 32, backend="torch")
    assert_same_layout(a, b)
    # block 0 (rows 0..31): diagonals 0, 1, 5 merge into [0, 32); columns 0, 3, 9 are inside it
    assert a.range_counts[0, 0, 0] == 1 and a.range_starts[0, 0, 0, 0] == 0 and a.range_ends[0, 0, 0, 0] == 32
    assert a.column_counts[0, 0, 0] == 0
    # block 3 (rows 96..99): [91, 100) merged, then 0, 3, 9, 70 are columns
    assert a.column_indices[0, 0, 3, : a.column_counts[0, 0, 3]].tolist() == [0, 3, 9, 70]


@pytest.mark.parametrize(
    "vertical, slash, match",
    [
        (torch.tensor([[[0, 100]]]), torch.tensor([[[0]]]), "vertical_indices: expected key ids in"),
        (torch.tensor([[[-1]]]), torch.tensor([[[0]]]), "vertical_indices: expected key ids in"),
        (torch.tensor([[[1]]]), torch.tensor([[[-2]]]), "slash_indices: expected diagonal offsets"),
        (torch.tensor([[[1]]]), torch.tensor([[[100]]]), "slash_indices: expected diagonal offsets"),
        (torch.tensor([[[1.0]]]), torch.tensor([[[0]]]), "vertical_indices: expected dtype"),
        (torch.tensor([[1]]), torch.tensor([[[0]]]), "vertical_indices: expected a tensor with 3"),
        (torch.tensor([[[1]]]), torch.tensor([[[0]], [[0]]]), "slash_indices: expected leading shape"),
        (torch.zeros(1, 1, 0, dtype=torch.long), torch.tensor([[[0]]]), "at least one entry"),
    ],
)
def test_bad_inputs(vertical, slash, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_vertical_slash_index(vertical, slash, 100, 100, 64, backend="torch")


def test_bad_arguments():
    v, s = torch.tensor([[[1]]]), torch.tensor([[[0]]])
    with pytest.raises(ValueError, match="backend"):
        build_vertical_slash_index(v, s, 10, 10, backend="numpy")
    with pytest.raises(ValueError, match="seqlen_q"):
        build_vertical_slash_index(v, s, 0, 10)
    with pytest.raises(ValueError, match="block_size_q"):
        build_vertical_slash_index(v, s, 10, 10, block_size_q=-64)
    with pytest.raises(ValueError, match="backend='cuda'"):
        build_vertical_slash_index(v, s, 10, 10, backend="cuda")


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(131072, 131072), (100_001, 131_071), (4097, 4097)])
def test_gpu_backends_identical(seqlen_q, seqlen_k):
    from sparse_attn import _cuda

    assert _cuda.load() is not None, f"CUDA extension: {_cuda.load_error()}"
    g = torch.Generator(device="cuda").manual_seed(seqlen_q)
    b, h, nv, ns = 1, 4, 1000, 6096
    vertical = torch.randint(0, seqlen_k, (b, h, nv), device="cuda", generator=g)
    # half of the diagonals near the main one (they merge), half anywhere (they mostly do not)
    near = torch.randint(0, 8192, (b, h, ns // 2), device="cuda", generator=g)
    far = torch.randint(0, seqlen_k, (b, h, ns - ns // 2), device="cuda", generator=g)
    slash = torch.cat([near.clamp(max=seqlen_k - 1), far], -1).int()
    layouts = [build_vertical_slash_index(vertical, slash, seqlen_q, seqlen_k, 64, backend=be)
               for be in ("cuda", "triton", "torch")]
    for other in layouts[1:]:
        assert_same_layout(layouts[0], other)
    assert build_vertical_slash_index(vertical, slash, seqlen_q, seqlen_k, 64).max_ranges == layouts[0].max_ranges
