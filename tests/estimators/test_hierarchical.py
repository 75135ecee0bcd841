"""Hierarchical (coarse-to-fine top-k) pattern: the Triton search and the torch search against a plain Python
statement of the same search (tie rule: equal representative scores go to the branch with the lower first
unit), for prefill (key blocks per query block, GQA, bottom-right causal) and decode (pages of a paged
cache, varlen, partial last page); attention over the chosen layout against the fp32 reference; bad budgets.
The registry-parametrized tests (test_methods, test_hf*, the profiler) cover the pattern's method."""
import math

import pytest
import torch

from helpers import DEV, assert_close, generator, poison, qkv, randn
from sparse_attn.estimators.hierarchical import SAMPLES, hierarchical_layout, hierarchical_pages
from sparse_attn.kvcache import PagedKVCache, PageSummaries
from sparse_attn.layouts import BlockLayout
from sparse_attn.methods import sparse_attention
from sparse_attn.ops import attention
from sparse_attn.ops.reference import reference_attention


def reference_search(score, hi, m, samples=SAMPLES):
    """The search written out for one query block: candidates 1 .. hi - 1, `score(unit, single)` a float (single:
    the branch is one unit)."""
    n = max(hi - 1, 0)
    if n <= m:
        return list(range(1, hi))
    width = 1
    while n > 2 * m * width:
        width *= 2
    branches = [(s, width) for s in range(1, hi, width)]
    while True:
        def rep(branch):
            s, size = branch
            return max(score(s + (j * size) // samples, size == 1) for j in range(samples)
                       if s + (j * size) // samples < hi)
        kept = sorted(branches, key=lambda br: (-rep(br), br[0]))[:m]
        size = kept[0][1]
        if size == 1:
            return sorted(s for s, _ in kept)
        branches = [(c, size // 2) for s, _ in kept for c in (s, s + size // 2) if c < hi]


def block_stats(x, block_size):
    """Each block's element-wise mean, max and min over its own rows (float64 [B, H, nblocks, D] each)."""
    blocks = [x[:, :, j:j + block_size].double() for j in range(0, x.shape[2], block_size)]
    return tuple(torch.stack([f(b) for b in blocks], 2) for f in (lambda b: b.mean(2), lambda b: b.amax(2),
                                                                   lambda b: b.amin(2)))


def reference_layout_blocks(q, k, top_k, block_size, local):
    """Per (batch, head, query block) the kept key blocks: [0] + searched + the `local` last visible ones."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    nq, nk = -(-sq // block_size), -(-sk // block_size)
    qbar = block_stats(q, block_size)[0]
    kbar, kmax, kmin = block_stats(k, block_size)

    def unit_score(x, kv, u, single):
        """A single unit: half the block-mean dot, half Quest's bound over the block's keys; a branch of several
        (its first unit): half the block-mean dot, half the dot with the keys' element-wise midrange."""
        if single:
            bound = torch.maximum(x * kmax[bi, kv, u], x * kmin[bi, kv, u]).sum()
        else:
            bound = x @ ((kmax[bi, kv, u] + kmin[bi, kv, u]) / 2)
        return float(0.5 * (x @ kbar[bi, kv, u]) + 0.5 * bound)
    out = {}
    for bi in range(b):
        for h in range(hq):
            for i in range(nq):
                last = min(i * block_size + block_size, sq) - 1 + sk - sq
                diag = min(last // block_size, nk - 1) if last >= 0 else -1
                if diag < 0:
                    out[bi, h, i] = []
                    continue
                hi = max(diag - local + 1, 1)
                unit = lambda u, single: unit_score(qbar[bi, h, i], h // (hq // hkv), u, single)  # noqa: E731
                out[bi, h, i] = [0] + reference_search(unit, hi, top_k[h]) + list(range(hi, diag + 1))
    return out


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty of the call comes back poisoned (outputs, the kernels' scratch, the block means): an
    entry a kernel forgets to write, or reads before writing, fails the comparison instead of passing by luck."""
    poison(monkeypatch, torch, "empty")


def valid_prefix(ids, counts):
    """{row: the first counts[row] ids}: what the layouts' and selections' contracts define (entries past a
    count are unspecified: never read, not compared)."""
    c, ids = counts.cpu(), ids.cpu()
    return {key: ids[key][: int(c[key])].tolist() for key in ((b, h) for b in range(c.shape[0])
                                                            for h in range(c.shape[1]))}


def layout_blocks(layout):
    c, idx = layout.counts.cpu(), layout.indices.cpu()
    return {key: idx[key][: int(c[key])].tolist() for key in ((b, h, i) for b in range(c.shape[0])
                                                            for h in range(c.shape[1]) for i in range(c.shape[2]))}


def integer_qkv(seed, b, hq, hkv, sq, sk, d):
    """Small integers: every block mean and dot product is exact in float32, so equal scores tie exactly."""
    gen = generator(seed)
    q, k = (torch.randint(-2, 3, shape, generator=gen).float().to(DEV)
            for shape in ((b, hq, sq, d), (b, hkv, sk, d)))
    return q, k


CASES = [  # b, hq, hkv, sq, sk, d, block_size, top_k per head, local
    (1, 4, 2, 200, 200, 32, 16, [1, 2, 3, 5], 1),
    (2, 2, 1, 70, 520, 64, 16, [4, 2], 2),
    (1, 2, 2, 40, 1000, 16, 32, [3, 6], 3),
    (1, 2, 1, 64, 400, 16, 16, [1, 1], 1),  # top_k 1 everywhere: the smallest key tensors
]


@pytest.mark.parametrize("exact", [False, True], ids=["gaussian", "integer-ties"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[3]}x{c[4]}" for c in CASES])
@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch"])
def test_prefill_selection_equals_the_written_out_search(poisoned_empty, case, exact, use_triton):
    b, hq, hkv, sq, sk, d, bs, top_k, local = case
    if exact:  # whole blocks: means of integers over a power of two are exact
        sq, sk = sq // bs * bs, sk // bs * bs
        q, k = integer_qkv(sq + sk, b, hq, hkv, sq, sk, d)
    else:
        q, k, _ = qkv(sq + sk, b, hq, hkv, sq, sk, d)
    layout = hierarchical_layout(q, k, top_k, block_size=bs, local=local, use_triton=use_triton)
    layout.check_values()
    assert layout.indices.shape[-1] == min(-(-sk // bs), 1 + max(top_k) + local)
    assert layout_blocks(layout) == reference_layout_blocks(q, k, top_k, bs, local)


@pytest.mark.parametrize("heads", [1, 8])
def test_prefill_programs_of_one_or_all_heads_of_a_group_select_the_same(monkeypatch, poisoned_empty, heads):
    """The prefill kernel searches several query heads of a kv head per program (a launch constant): one head
    per program or the whole group of 4 (per-head top_k, so the heads' root widths and level counts differ)
    selects what the written-out search does."""
    from sparse_attn.estimators import hierarchical

    monkeypatch.setattr(hierarchical, "_PREFILL_HEADS", heads)
    q, k, _ = qkv(21, 1, 8, 2, 130, 420, 16)
    top_k = [1, 3, 6, 2, 5, 4, 2, 7]
    layout = hierarchical_layout(q, k, top_k, block_size=16, local=2, use_triton=True)
    assert layout_blocks(layout) == reference_layout_blocks(q, k, top_k, 16, 2)


@pytest.mark.parametrize("s, bs, d", [(300, 64, 64), (130, 32, 16), (128, 128, 32)])
def test_key_summaries_equal_the_block_min_mean_max(poisoned_empty, s, bs, d):
    """The Triton key block summaries [mean / 2 + (max + min) / 4, (max - min) / 4] against torch over each
    block's own rows (the last block partial where s is not a multiple of bs); keys of either sign, strided."""
    from sparse_attn.estimators.hierarchical import key_summaries

    k = randn(generator(s * d), 2, s, 3, d, scale=2.0).transpose(1, 2)  # [B, H, S, D] as a strided view
    got = key_summaries(k, bs, torch.float32)
    mean, top, bottom = block_stats(k, bs)
    want = torch.cat([0.5 * mean + 0.25 * (top + bottom), 0.25 * (top - bottom)], -1)
    assert got.shape == (2, 3, -(-s // bs), 2 * d)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_prefill_search_prunes_when_it_should():
    """Enough blocks that every query block in the second half searches several levels: counts are exactly
    1 + top_k + local there, and the chosen blocks are not simply the first or last ones."""
    q, k, _ = qkv(5, 1, 2, 1, 1024, 1024, 16)
    layout = hierarchical_layout(q, k, 3, block_size=16, local=1, use_triton=False)
    assert (layout.counts[..., 32:] == 5).all()
    chosen = layout.indices[..., 32:, 1:4]
    assert chosen.float().std() > 4


@pytest.mark.parametrize("sq,sk,d,hq,hkv", [(192, 192, 64, 4, 2), (130, 400, 32, 2, 1)])
def test_attention_over_the_layout_equals_the_fp32_reference(poisoned_outputs, sq, sk, d, hq, hkv):
    q, k, v = qkv(sq * d, 2, hq, hkv, sq, sk, d)
    layout = hierarchical_layout(q, k, [2, 1, 3, 2][:hq], block_size=16, local=1, use_triton=False)
    assert layout.density() < 1
    out = attention(q, k, v, layout, causal=True)
    assert_close(out, reference_attention(q, k, v, layout, causal=True))


def _paged_cache(seed, b, hkv, d, ps, lengths, dtype=torch.float32):
    """A paged cache with its pages scattered over the storage (shuffled table) and spare pages."""
    gen = generator(seed)
    per = -(-max(lengths) // ps)
    n_pages = b * per + 3
    k = randn(gen, n_pages, ps, hkv, d, dtype=dtype)
    v = randn(gen, n_pages, ps, hkv, d, dtype=dtype)
    table = torch.randperm(n_pages, generator=gen)[: b * per].view(b, per).to(torch.int32).to(DEV)
    cache = PagedKVCache(k, v, table, torch.tensor(lengths, dtype=torch.int32, device=DEV), ps)
    return cache, PageSummaries.build(cache)


def reference_pages(q, cache, summaries, top_k, local):
    """Per (sequence, kv head) the set of pages: 0, searched, the `local` last; Quest bounds summed over
    the group."""
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    out = {}
    for bi in range(b):
        n = -(-int(cache.seqlens[bi]) // cache.page_size)
        for h in range(hkv):
            qs = q[bi, h * g:(h + 1) * g].double()

            def unit(p, single):  # decode: Quest's bound at every level
                slot = int(summaries.table[bi, p])
                mn, mx = summaries.kmin[slot, h].double(), summaries.kmax[slot, h].double()
                return float(torch.maximum(qs * mn, qs * mx).sum())

            if n == 0:
                out[bi, h] = []
                continue
            hi = max(n - local, 1)
            out[bi, h] = sorted([0] + reference_search(unit, hi, top_k) + list(range(hi, n)))
    return out


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "torch"])
@pytest.mark.parametrize("ps,lengths,top_k,local,g", [(16, [900, 333, 20, 1], 3, 2, 2), (32, [1000, 545], 5, 1, 3),
                                                     (16, [700, 64], 40, 2, 1), (16, [500, 40], 1, 1, 2)])
def test_decode_selection_equals_the_written_out_search(monkeypatch, use_triton, ps, lengths, top_k, local, g):
    hkv, d = 2, 32
    cache, summaries = _paged_cache(ps + top_k, len(lengths), hkv, d, ps, lengths)
    poison(monkeypatch, torch, "empty")  # after the summaries are built
    q = randn(generator(top_k), len(lengths), hkv * g, d)
    sel = hierarchical_pages(q, cache, summaries, top_k=top_k, local=local, use_triton=use_triton)
    assert sel.width == min(cache.max_pages, 1 + top_k + local) and sel.pages.shape[1] == hkv
    got = {(bi, h): sorted(sel.pages[bi, h, : int(sel.counts[bi, h])].tolist())
           for bi in range(len(lengths)) for h in range(hkv)}
    assert got == reference_pages(q, cache, summaries, top_k, local)


def test_decode_through_the_method_reads_the_selected_pages():
    """The method's decode side (a contiguous cache read as 64-token pages) equals the reference over the tokens
    of the pages it reports; its density is theirs."""
    q, k, v = qkv(11, 1, 4, 2, 1, 2000, 32)
    stats = {}
    out = sparse_attention(q, k, v, "hierarchical", top_k=4, local=2, min_seqlen=512, stats=stats)
    cache = PagedKVCache.from_contiguous(k, v, page_size=64)
    sel = hierarchical_pages(q, cache, PageSummaries.build(cache), top_k=4, local=2)
    mask = sel.token_mask(cache.seqlens, 2000).repeat_interleave(2, 1)[:, :, None]  # [B, Hq, 1, S]
    assert_close(out, reference_attention(q, k, v, mask, causal=True))
    # Page 0, 4 searched pages and the last two (page 31 holds 2000 - 31 * 64 = 16 tokens).
    assert torch.allclose(stats["density"], torch.full((4,), (6 * 64 + 16) / 2000, dtype=torch.float64))


def test_bad_budgets_are_named():
    q, k, v = qkv(1, 1, 2, 1, 128, 128, 16)
    with pytest.raises(ValueError, match=r"top_k: expected values >= 1"):
        hierarchical_layout(q, k, 0, block_size=16)
    with pytest.raises(ValueError, match=r"top_k: expected an int or 2 values"):
        hierarchical_layout(q, k, [1, 2, 3], block_size=16)
    with pytest.raises(ValueError, match=r"local: expected an int >= 1"):
        hierarchical_layout(q, k, 2, block_size=16, local=0)
    with pytest.raises(ValueError, match=r"method 'hierarchical': 'top_k' must be an int >= 1, got 0"):
        sparse_attention(q, k, v, "hierarchical", top_k=0, min_seqlen=0)
    cache = PagedKVCache.from_contiguous(k, v, page_size=16)
    with pytest.raises(ValueError, match=r"top_k: expected an int >= 1 \(pages the search picks\), got 2.5"):
        hierarchical_pages(q[:, :, 0], cache, PageSummaries.build(cache), top_k=2.5)


def test_search_levels_grow_with_the_log_of_the_length():
    """The number of scorings per query block is log2(root width) + 1: one more per doubling of the keys."""
    from sparse_attn.estimators.hierarchical import search_plan

    assert search_plan(10, 16) == (0, 0)
    levels = [search_plan(n, 64)[1] for n in (2 ** 13, 2 ** 14, 2 ** 15)]
    assert levels == [7, 8, 9] and search_plan(8193, 64) == (128, 8)
    assert all(math.ceil(n / search_plan(n, 64)[0]) in range(65, 129) for n in (129, 1000, 5000, 2 ** 14 + 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("top_k", [32, 64])
def test_gpu_search_at_128k_equals_the_torch_search(top_k):
    """The benchmark's shape (32 query / 8 kv heads, D=128, bf16, 128K): the prefill search kernel once faulted
    here (an illegal address with its length arguments unspecialised) while 4K-32K passed."""
    q, k, _ = qkv(5, 1, 32, 8, 1 << 17, 1 << 17, 128, dtype=torch.bfloat16, device="cuda")
    a = hierarchical_layout(q, k, top_k, block_size=64, use_triton=True)
    torch.cuda.synchronize()
    b = hierarchical_layout(q[:, :, -(1 << 14):], k, top_k, block_size=64, use_triton=False)  # the last 256 blocks
    assert torch.equal(a.counts[..., -256:], b.counts)
    tail = BlockLayout(a.counts[..., -256:], a.indices[:, :, -256:], 64, 64, 1 << 14, 1 << 17, validate=False)
    rows_a, rows_b = layout_blocks(tail), layout_blocks(b)
    assert sum(rows_a[key] == rows_b[key] for key in rows_a) / len(rows_a) > 0.99  # float order may flip near-ties


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernels_equal_the_torch_search_and_decode_captures_in_a_graph():
    q, k, _ = qkv(3, 1, 8, 2, 4096, 4096, 128, dtype=torch.bfloat16, device="cuda")
    a = hierarchical_layout(q, k, 16, block_size=64, use_triton=True)
    b = hierarchical_layout(q, k, 16, block_size=64, use_triton=False)
    rows_a, rows_b = layout_blocks(a), layout_blocks(b)  # the blocks each counts; padding unspecified
    same = sum(rows_a[key] == rows_b[key] for key in rows_a) / len(rows_a)
    assert torch.equal(a.counts, b.counts) and same > 0.99  # float order may flip near-ties
    cache, summaries = _paged_cache(4, 4, 2, 128, 64, [5000, 3001, 64, 7777], dtype=torch.bfloat16)
    cache = PagedKVCache(cache.k.cuda(), cache.v.cuda(), cache.page_table.cuda(), cache.seqlens.cuda(), 64)
    summaries = PageSummaries.build(cache)
    qd = torch.randn(4, 8, 128, device="cuda", dtype=torch.bfloat16)
    sel = hierarchical_pages(qd, cache, summaries, top_k=16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        again = hierarchical_pages(qd, cache, summaries, top_k=16)
    graph.replay()
    torch.cuda.synchronize()
    # Entries past a count are unspecified (PageSelection: never read); the graph's pool holds other bytes.
    assert torch.equal(again.counts, sel.counts)
    assert valid_prefix(again.pages, again.counts) == valid_prefix(sel.pages, sel.counts)
    torch_sel = hierarchical_pages(qd, cache, summaries, top_k=16, use_triton=False)
    assert torch.equal(torch_sel.counts, sel.counts)
    same = [sorted(a) == sorted(b) for a, b in zip(valid_prefix(sel.pages, sel.counts).values(),
                                                  valid_prefix(torch_sel.pages, torch_sel.counts).values())]
    assert sum(same) >= len(same) - 1  # float order may flip a near-tie


@pytest.mark.parametrize("top_k,sparse", [(1, True), (64, False)], ids=["tiny", "full"])
def test_hf_generate_decodes_through_the_search(top_k, sparse):
    """A patched tiny Llama (dense prefill, hierarchical decode over 64-token pages of its cache): a tiny
    top_k changes the decode logits and reads a fraction of the cache; a top_k past the pages decodes dense."""
    transformers = pytest.importorskip("transformers")
    import sparse_attn

    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=128,
                                      max_position_embeddings=1024)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 600), generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def decode_logits(steps=2):
        cache = transformers.DynamicCache()
        model(ids[:, :-steps], past_key_values=cache, use_cache=True)
        return torch.stack([model(ids[:, -steps + i:][:, :1], past_key_values=cache, use_cache=True).logits[:, -1]
                            for i in range(steps)], 1)

    dense = decode_logits()
    sparse_attn.patch(model, "quest", min_seqlen=0, decode="hierarchical", decode_config={"top_k": top_k})
    try:
        got = decode_logits()
        stats = sparse_attn.get_stats(model)
        generated = model.generate(ids[:, :500], max_new_tokens=2, do_sample=False, pad_token_id=0)
    finally:
        sparse_attn.unpatch(model)
    # a top_k reading half the cache or more decodes dense (sparse_attn.decode.DECODE_MIN_RATIO)
    assert stats.decode[1].pattern == ["hierarchical" if sparse else "dense"] * 4 and generated.shape == (1, 502)
    if sparse:
        assert (got - dense).abs().max() > 1e-3 and 0 < stats.density("decode") < 0.5
    else:
        assert_close(got, dense, floor=1e-4)
        assert stats.density("decode") == pytest.approx(1.0)
