"""Paged decode: the split-K kernel against the fp32 reference over exactly the selected pages (shuffled page
tables, varlen batches, partial last pages, GQA groups, every page size), dense equals SDPA, the page
summaries (incremental = rebuild), Quest's and A-shape's selections against plain PyTorch statements of their
rules, bad inputs, and a whole decode step in a CUDA graph (GPU)."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from helpers import DEV, assert_close, generator, poison, randn, smallest_budget
from sparse_attn.estimators.a_shape import a_shape_pages
from sparse_attn.estimators.quest import quest_scores, quest_select
from sparse_attn.kvcache import PAGE_SIZES, PagedKVCache, PageSummaries
from sparse_attn.layouts import PageSelection
from sparse_attn.ops import paged_decode
from sparse_attn.ops.paged_decode import dense_selection, paged_decode_attention, reference_decode
from sparse_attn.patterns import get_pattern, list_patterns

DECODE_PATTERNS = [name for name in list_patterns() if get_pattern(name).decode]

LOW = torch.float16 if DEV == "cpu" else torch.bfloat16  # the interpreter's bf16 dot is unreliable


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    poison(monkeypatch, paged_decode, "_outputs")


def paged_cache(gen, lens, hkv, d, ps, *, dtype=torch.float32, spare=3):
    """A paged cache with shuffled pages: [num_pages, ps, hkv, d] storage with `spare` unused pages, a table as
    wide as the longest sequence needs plus one (the extra entries point at used pages: never read)."""
    gen = generator(gen)
    need = [max(1, -(-n // ps)) for n in lens]
    width = max(need) + 1
    total = sum(need) + spare
    k = randn(gen, total, ps, hkv, d, dtype=dtype)
    v = randn(gen, total, ps, hkv, d, dtype=dtype)
    perm = torch.randperm(total, generator=gen)
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[at:at + n].to(torch.int32)
        table[b, n:] = perm[0]
        at += n
    return PagedKVCache(k, v, table.to(DEV), torch.tensor(lens, dtype=torch.int32, device=DEV), ps)


def random_selection(gen, cache: PagedKVCache, heads: int, width: int) -> PageSelection:
    """Per (sequence, head) a random subset of its pages (distinct, any order), its count random too."""
    gen = generator(gen)
    b = cache.batch
    n = cache.num_pages_of().cpu()
    pages = torch.zeros(b, heads, width, dtype=torch.int32)
    counts = torch.zeros(b, heads, dtype=torch.int32)
    for i in range(b):
        for h in range(heads):
            c = int(torch.randint(0, min(width, int(n[i])) + 1, (1,), generator=gen))
            pages[i, h, :c] = torch.randperm(int(n[i]), generator=gen)[:c].to(torch.int32)
            pages[i, h, c:] = 9999  # past the count: never read
            counts[i, h] = c
    return PageSelection(pages.to(DEV), counts.to(DEV), cache.page_size)


def _check(q, cache, selection=None):
    out = paged_decode_attention(q, cache, selection)
    ref = reference_decode(q.float(), _as_float(cache), selection)
    low = reference_decode(q, cache, selection) if q.dtype != torch.float32 else None
    assert not out.isnan().any(), "an output element was never written"
    assert_close(out, ref, low)
    return out


def _as_float(cache: PagedKVCache) -> PagedKVCache:
    return PagedKVCache(cache.k.float(), cache.v.float(), cache.page_table, cache.seqlens, cache.page_size,
                        contiguous=cache.contiguous, validate=False)


@given(seed=st.integers(0, 2**31 - 1), ps=st.sampled_from(PAGE_SIZES), group=st.sampled_from([1, 3, 4]),
       shared=st.booleans())
def test_selected_pages_equal_the_reference(seed, ps, group, shared):
    gen = generator(seed)
    lens = [int(x) for x in torch.randint(1, 5 * ps, (3,), generator=gen)]
    hkv, d = 2, 32
    cache = paged_cache(gen, lens, hkv, d, ps)
    q = randn(gen, 3, hkv * group, d)
    selection = random_selection(gen, cache, 1 if shared else hkv, width=4)
    _check(q, cache, selection)


@given(seed=st.integers(0, 2**31 - 1), ps=st.sampled_from(PAGE_SIZES), group=st.sampled_from([1, 2, 4]),
       shared=st.booleans(), batch=st.integers(1, 4))
def test_head_density_counts_the_tokens_each_query_head_reads(seed, ps, group, shared, batch):
    """Per query head, the mean over sequences of tokens read / length, against the selection's token mask
    (a partial last page counts its valid tokens only; entries past a count are not read)."""
    gen = generator(seed)
    lens = [int(x) for x in torch.randint(1, 6 * ps, (batch,), generator=gen)]
    hkv = 2
    cache = paged_cache(gen, lens, hkv, 16, ps)
    selection = random_selection(gen, cache, 1 if shared else hkv, width=5)
    mask = selection.token_mask(cache.seqlens, max(lens))
    per_kv = mask.sum(-1).double() / cache.seqlens.view(-1, 1).double()  # [B, H]
    want = per_kv.expand(-1, hkv).repeat_interleave(group, 1).mean(0)
    got = paged_decode.head_density(selection, cache.seqlens, hkv * group)
    assert got.dtype == torch.float64 and got.shape == (hkv * group,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("ps", PAGE_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, LOW])
@pytest.mark.parametrize("d", [64, 128])
def test_dense_paged_equals_sdpa_on_the_gathered_cache(ps, dtype, d):
    gen = generator(ps + d)
    lens = [ps * 3 + 5, 1, ps * 2]  # a partial last page, a single token, exact pages
    cache = paged_cache(gen, lens, 2, d, ps, dtype=dtype)
    q = randn(gen, 3, 8, d, dtype=dtype)
    out = _check(q, cache)
    for b, n in enumerate(lens):
        k, v = cache.gather(b)
        want = F.scaled_dot_product_attention(q[b, :, None].float(), k.float().repeat_interleave(4, 0),
                                              v.float().repeat_interleave(4, 0))[:, 0]
        assert_close(out[b].float(), want, floor=2e-3 if dtype != torch.float32 else 1e-5)


def test_contiguous_cache_is_read_in_place_and_splits_do_not_matter():
    gen = generator(7)
    k = randn(gen, 2, 2, 150, 32)
    v = randn(gen, 2, 2, 150, 32)
    lens = torch.tensor([150, 77], dtype=torch.int32, device=DEV)
    cache = PagedKVCache.from_contiguous(k, v, page_size=32, seqlens=lens)
    assert cache.k.data_ptr() == k.data_ptr()
    q = randn(gen, 2, 6, 32)
    one = paged_decode_attention(q, cache, num_splits=1)
    many = paged_decode_attention(q, cache, num_splits=5)
    assert_close(many, one)
    _check(q, cache)
    out4 = paged_decode_attention(q[:, :, None], cache)  # [B, Hq, 1, D] in, the same shape out
    assert out4.shape == (2, 6, 1, 32) and torch.allclose(out4[:, :, 0], one, atol=1e-6)


def test_a_budget_covering_the_context_is_dense_and_empty_selections_give_zero():
    gen = generator(3)
    cache = paged_cache(gen, [70, 33], 2, 32, 16)
    q = randn(gen, 2, 4, 32)
    summaries = PageSummaries.build(cache)
    full = quest_select(q, cache, summaries, budget=cache.max_pages * 16, sink=0, window=0)
    assert torch.allclose(paged_decode_attention(q, cache, full), reference_decode(q, cache), atol=1e-5)
    none = PageSelection(torch.zeros(2, 1, 2, dtype=torch.int32, device=DEV),
                         torch.zeros(2, 1, dtype=torch.int32, device=DEV), 16)
    assert torch.equal(paged_decode_attention(q, cache, none), torch.zeros_like(q))


def _summaries_equal(a: PageSummaries, b: PageSummaries, cache: PagedKVCache) -> None:
    n = cache.num_pages_of().cpu()
    for i in range(cache.batch):
        for p in range(int(n[i])):
            sa, sb = int(a.table[i, p]), int(b.table[i, p])
            assert torch.equal(a.kmin[sa], b.kmin[sb]) and torch.equal(a.kmax[sa], b.kmax[sb]), (i, p)
            assert torch.allclose(a.kmean[sa], b.kmean[sb], atol=1e-6), (i, p)


@pytest.mark.parametrize("ps", [16, 32])
def test_incremental_summaries_equal_a_rebuild_after_many_appends(ps):
    gen = generator(ps)
    hkv, d, cap = 2, 16, 6 * ps
    lens0 = [5, ps]
    cache = paged_cache(gen, [cap, cap], hkv, d, ps)  # storage for the whole run
    lens = torch.tensor(lens0, dtype=torch.int32, device=DEV)
    view = PagedKVCache(cache.k, cache.v, cache.page_table, lens.clone(), ps)
    summaries = PageSummaries.build(view)
    for _ in range(3 * ps + 3):  # one token a step: only the page it lands in is recomputed
        lens += 1
        view = PagedKVCache(cache.k, cache.v, cache.page_table, lens.clone(), ps, validate=False)
        last = torch.div(lens - 1, ps, rounding_mode="floor").to(torch.int32)
        summaries.update(view, last)
    _summaries_equal(summaries, PageSummaries.build(view), view)
    ref = {}
    for b in range(2):
        k, _ = view.gather(b)
        for p in range(-(-k.shape[1] // ps)):
            part = k[:, p * ps:(p + 1) * ps]
            ref[b, p] = (part.amin(1), part.amax(1), part.float().mean(1))
            slot = int(summaries.table[b, p])
            assert torch.equal(summaries.kmin[slot], ref[b, p][0]) and torch.equal(summaries.kmax[slot], ref[b, p][1])
            assert torch.allclose(summaries.kmean[slot].float(), ref[b, p][2], atol=1e-5)


def _quest_reference(q, cache, n_sink, n_local):
    """Per (sequence, kv head, page) the bound sum over the group's heads of sum_d max(q_d min_d, q_d max_d),
    written as the definition (no linearisation), from the gathered keys."""
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    out = torch.full((b, hkv, cache.max_pages), float("-inf"))
    for i in range(b):
        k, _ = cache.gather(i)
        n = -(-k.shape[1] // cache.page_size)
        for p in range(n):
            part = k[:, p * cache.page_size:(p + 1) * cache.page_size].float()
            mn, mx = part.amin(1), part.amax(1)  # [hkv, d]
            for h in range(hkv):
                qs = q[i, h * g:(h + 1) * g].float().cpu()
                out[i, h, p] = torch.maximum(qs * mn[h].cpu(), qs * mx[h].cpu()).sum()
                if p < n_sink or p >= n - n_local:
                    out[i, h, p] = float("inf")
    return out


@given(seed=st.integers(0, 2**31 - 1), group=st.sampled_from([1, 2, 4]), ps=st.sampled_from([16, 32]),
       heads_per_program=st.sampled_from([1, 2]))
def test_quest_scores_and_selection_follow_the_rule(seed, group, ps, heads_per_program):
    from sparse_attn.estimators import quest

    quest._HEADS_PER_PROGRAM, keep = heads_per_program, quest._HEADS_PER_PROGRAM  # the scores' launch shapes
    try:
        _check_quest_rule(seed, group, ps)
    finally:
        quest._HEADS_PER_PROGRAM = keep


def _check_quest_rule(seed, group, ps):
    gen = generator(seed)
    lens = [int(x) for x in torch.randint(1, 8 * ps, (2,), generator=gen)]
    cache = paged_cache(gen, lens, 2, 16, ps)
    q = randn(gen, 2, 2 * group, 16)
    summaries = PageSummaries.build(cache)
    got = quest_scores(q, cache, summaries, n_sink=1, n_local=1).cpu()
    want = _quest_reference(q, cache, 1, 1)
    assert torch.equal(got == float("inf"), want == float("inf"))  # forced pages
    assert torch.equal(got == float("-inf"), want == float("-inf"))  # pages past the length
    finite = want.isfinite()
    assert torch.allclose(got[finite], want[finite], rtol=1e-4, atol=1e-4)
    budget = 3 * ps
    sel = quest_select(q, cache, summaries, budget=budget, sink=1, window=1)
    assert_top_pages(sel, want, cache, 3, tol=1e-4)


def assert_top_pages(sel, want, cache, k, *, tol):
    """Per (sequence, kv head): min(k, its pages) distinct valid pages, the first and the latest among them,
    the others the best by the reference scores `want` (a tie at the cut may go either way)."""
    n = cache.num_pages_of().cpu()
    for i in range(want.shape[0]):
        for h in range(want.shape[1]):
            c = int(sel.counts[i, h])
            assert c == min(k, int(n[i]))
            chosen = set(sel.pages[i, h, :c].tolist())
            assert len(chosen) == c and chosen <= set(range(int(n[i])))
            assert 0 in chosen and int(n[i]) - 1 in chosen  # the sink and the latest page
            rest = sorted(range(int(n[i])), key=lambda p: -float(want[i, h, p]))
            if c < int(n[i]):
                cut = float(want[i, h, rest[c - 1]])
                assert all(float(want[i, h, p]) >= cut - tol for p in chosen)


@pytest.mark.parametrize("seed", range(3))
def test_page_top_k_keeps_the_best_pages_lowest_first_on_ties(seed):
    """top_pages against its rule on the device kernel's path: per row the k best marked scores, ties at the
    k-th score to the lower page, ids ascending; the row's count min(k, its pages). Scores drawn from a few
    values (many ties), rows longer than one block of the kernel, varlen batches."""
    from sparse_attn.estimators._pages import mark_pages, top_pages

    gen = generator(300 + seed)
    ps = 16
    lens = [int(x) for x in torch.randint(1, 1400 * ps, (3,), generator=gen)]
    cache = paged_cache(gen, lens, 2, 8, ps, spare=0)
    n_pages = cache.max_pages
    raw = torch.randint(-3, 4, (3, 2, n_pages), generator=gen).float() * 0.5
    raw += torch.where(torch.rand(3, 2, n_pages, generator=gen) < 0.5, 0.0, torch.randn(3, 2, n_pages, generator=gen))
    scores = mark_pages(raw.to(DEV), cache, 1, 2)
    kernel = DEV == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    for k in (1, 5, 37, n_pages):
        sel = top_pages(scores, cache, k)
        s = scores.cpu()
        n = cache.num_pages_of().cpu()
        for i in range(3):
            for h in range(2):
                order = sorted(range(n_pages), key=lambda p: (-float(s[i, h, p]), p))[:k]
                c = int(sel.counts[i, h])
                assert c == min(k, int(n[i]))
                got = sel.pages[i, h].tolist()
                if kernel:
                    assert got == sorted(order)  # the exact rule, every entry
                else:  # torch.topk: the same pages in score order
                    assert sorted(got[:c]) == sorted(order[:c])


def test_quest_bound_is_an_upper_bound_of_every_key_score():
    gen = generator(11)
    cache = paged_cache(gen, [200], 1, 16, 16)
    q = randn(gen, 1, 1, 16)
    summaries = PageSummaries.build(cache)
    scores = quest_scores(q, cache, summaries, n_sink=0, n_local=0).cpu()
    k, _ = cache.gather(0)
    dots = (k[0].float().cpu() @ q[0, 0].float().cpu())
    for p in range(-(-200 // 16)):
        assert scores[0, 0, p] >= dots[p * 16:(p + 1) * 16].max() - 1e-5


def test_a_shape_pages_are_the_sink_and_the_window():
    gen = generator(5)
    cache = paged_cache(gen, [300, 40, 64 * 3], 1, 16, 64)
    sel = a_shape_pages(cache, sink=64, window=100)
    mask = sel.token_mask(cache.seqlens, 300).cpu()
    for b, n in enumerate([300, 40, 192]):
        seen = mask[b, 0, :n]
        assert seen[:64].all() and seen[max(0, n - 100):n].all()  # the sink tokens and the last `window`
        pages_read = -(-int(seen.sum()) // 64)
        assert pages_read <= 1 + math.ceil((100 + 63) / 64)


def test_bad_inputs_name_the_argument():
    gen = generator(2)
    cache = paged_cache(gen, [40, 20], 2, 16, 16)
    bad = cache.page_table.clone()
    bad[0, 1] = 10_000
    with pytest.raises(ValueError, match="page_table"):
        PagedKVCache(cache.k, cache.v, bad, cache.seqlens, 16)
    with pytest.raises(ValueError, match="seqlens"):
        PagedKVCache(cache.k, cache.v, cache.page_table, cache.seqlens + 1000, 16)
    with pytest.raises(ValueError, match="page_size"):
        PagedKVCache(cache.k, cache.v, cache.page_table, cache.seqlens, 8)
    with pytest.raises(ValueError, match="k: expected pages"):
        PagedKVCache(cache.k, cache.v, cache.page_table, cache.seqlens, 32)
    summaries = PageSummaries.build(cache)
    q = randn(gen, 2, 4, 16)
    with pytest.raises(ValueError, match="budget"):
        quest_select(q, cache, summaries, budget=8)
    with pytest.raises(TypeError, match="q: expected the cache's dtype"):
        paged_decode_attention(q.half(), cache)
    with pytest.raises(ValueError, match="q: expected"):
        paged_decode_attention(randn(gen, 2, 3, 16), cache)
    other = PageSelection(torch.zeros(2, 1, 1, dtype=torch.int32, device=DEV),
                          torch.ones(2, 1, dtype=torch.int32, device=DEV), 32)
    with pytest.raises(ValueError, match="selection: page_size"):
        paged_decode_attention(q, cache, other)
    # A table pointing outside the storage, accepted unchecked, still reads inside it (clamped), never past it.
    unchecked = PagedKVCache(cache.k, cache.v, bad, cache.seqlens, 16, validate=False)
    assert not paged_decode_attention(q, unchecked).isnan().any()


def test_many_splits_combine_in_chunks():
    """More splits than the combine step merges at once (it takes them in chunks): same as the reference."""
    gen = generator(13)
    cache = paged_cache(gen, [2500, 1900], 2, 16, 16)
    q = randn(gen, 2, 6, 16)
    many = paged_decode_attention(q, cache, num_splits=40)
    assert_close(many, reference_decode(q, cache), floor=1e-5)


def _select_call(pattern, cache, summaries, q):
    """The pattern's decode selection at its sparsest sweep entry (its options at their defaults)."""
    p = get_pattern(pattern)
    kwargs = {o.name: o.default for o in p.options}
    kwargs.update(smallest_budget(pattern, int(cache.seqlens.max()), cache.page_size))
    return lambda: p.select(q, cache, summaries, scale=None, **kwargs)


def _counted(sel: PageSelection):
    """Per (sequence, head) the pages within the count, as a set (the contract: any order; entries past the
    count are never read, so unspecified) and the counts."""
    c, pages = sel.counts.cpu(), sel.pages.cpu()
    return c.tolist(), [[sorted(pages[b, h, : int(c[b, h])].tolist()) for h in range(c.shape[1])]
                        for b in range(c.shape[0])]


@pytest.mark.parametrize("pattern", DECODE_PATTERNS)
def test_decode_selections_define_every_counted_entry(monkeypatch, pattern):
    """With every torch.empty of the call poisoned (outputs and scratch), each decode pattern's selection
    counts and lists the same pages as a clean call: no counted entry comes from memory the call did not
    write, so a CUDA-graph replay (its own memory pool) selects what the eager call does."""
    gen = generator(17)
    ps = get_pattern(pattern).decode_page_size
    cache = paged_cache(gen, [ps * 40 + 5, ps * 3, 7], 2, 16, ps)
    summaries = PageSummaries.build(cache)
    select = _select_call(pattern, cache, summaries, randn(gen, 3, 4, 16))
    clean = _counted(select())
    poison(monkeypatch, torch, "empty")
    assert _counted(select()) == clean


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", DECODE_PATTERNS)
def test_gpu_decode_selections_replay_from_a_cuda_graph(pattern):
    gen = generator(3)
    ps = get_pattern(pattern).decode_page_size
    cache = paged_cache(gen, [ps * 300 + 5, ps * 70, 1, ps * 2], 8, 128, ps, dtype=torch.bfloat16)
    summaries = PageSummaries.build(cache)
    select = _select_call(pattern, cache, summaries, randn(gen, 4, 32, 128, dtype=torch.bfloat16))
    eager = select()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = select()
    graph.replay()
    torch.cuda.synchronize()
    assert _counted(captured) == _counted(eager)


@pytest.mark.gpu
def test_gpu_decode_step_captures_in_a_cuda_graph():
    gen = generator(1)
    dtype = torch.bfloat16
    cache = paged_cache(gen, [5000, 3000, 4097], 8, 128, 32, dtype=dtype)
    q = randn(gen, 3, 32, 128, dtype=dtype)
    summaries = PageSummaries.build(cache)

    def step():
        summaries.update(cache, torch.div(cache.seqlens - 1, 32, rounding_mode="floor").to(torch.int32))
        return paged_decode_attention(q, cache, quest_select(q, cache, summaries, budget=1024))

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    sel = quest_select(q, cache, summaries, budget=1024)
    assert_close(eager.float(), reference_decode(q.float(), _as_float(cache), sel),
                 reference_decode(q, cache, sel).float())


def test_decode_state_keeps_its_page_table_until_the_cache_crosses_a_page():
    from sparse_attn.decode import DecodeState

    gen = generator(3)
    state = DecodeState()
    k = randn(gen, 2, 2, 200, 32)
    first = state.view(k[:, :, :100], k[:, :, :100], 32)
    assert torch.equal(first.page_table.cpu(), torch.arange(8, dtype=torch.int32).view(2, 4))
    again = state.view(k[:, :, :128], k[:, :, :128], 32)  # still 4 pages
    assert again.page_table is first.page_table and int(again.seqlens[0]) == 128
    crossed = state.view(k[:, :, :129], k[:, :, :129], 32)  # 5 pages
    assert torch.equal(crossed.page_table.cpu(), torch.arange(10, dtype=torch.int32).view(2, 5))
    with pytest.raises(ValueError, match="page_table"):
        PagedKVCache.from_contiguous(k, k, 32, page_table=first.page_table[:, :3])
