"""Page-mean decode selection against a plain PyTorch statement of its rule, written from the gathered keys
(per query head a softmax over the pages of scale * q . mean key, summed over the GQA group; the sink and
the latest pages forced; a tie at the cut may go either way), and bad inputs."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import DEV, generator, randn
from ops.test_paged_decode import assert_top_pages, paged_cache
from sparse_attn.estimators.page_mean import page_mean_logits, page_mean_scores, page_mean_select
from sparse_attn.kvcache import PageSummaries


def reference_scores(q, cache, n_sink, n_local, scale):
    b, hq, d = q.shape
    hkv = cache.num_kv_heads
    g = hq // hkv
    out = torch.full((b, hkv, cache.max_pages), float("-inf"))
    for i in range(b):
        k, _ = cache.gather(i)
        n = -(-k.shape[1] // cache.page_size)
        for h in range(hkv):
            logits = torch.zeros(g, n)
            for p in range(n):
                mean = k[h, p * cache.page_size:(p + 1) * cache.page_size].float().cpu().mean(0)
                for j in range(g):
                    logits[j, p] = scale * (q[i, h * g + j].float().cpu() @ mean)
            out[i, h, :n] = logits.softmax(-1).sum(0)
            for p in range(n):
                if p < n_sink or p >= n - n_local:
                    out[i, h, p] = float("inf")
    return out


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), group=st.sampled_from([1, 3, 4]), ps=st.sampled_from([16, 32]))
def test_scores_and_selection_follow_the_rule(seed, group, ps):
    gen = generator(seed)
    lens = [int(x) for x in torch.randint(1, 8 * ps, (2,), generator=gen)]
    cache = paged_cache(gen, lens, 2, 16, ps)
    q = randn(gen, 2, 2 * group, 16)
    scale = float(torch.empty(()).uniform_(0.1, 1.0, generator=gen))
    summaries = PageSummaries.build(cache)
    got = page_mean_scores(q, cache, summaries, n_sink=1, n_local=1, scale=scale).cpu()
    want = reference_scores(q, cache, 1, 1, scale)
    assert torch.equal(got == float("inf"), want == float("inf"))  # forced pages
    assert torch.equal(got == float("-inf"), want == float("-inf"))  # pages past the length
    finite = want.isfinite()
    assert torch.allclose(got[finite], want[finite], rtol=1e-4, atol=1e-5)
    sel = page_mean_select(q, cache, summaries, budget=3 * ps, sink=1, window=1, scale=scale)
    assert_top_pages(sel, want, cache, 3, tol=1e-5)


def test_long_rows_combine_the_softmax_over_page_blocks():
    """Sequences of more pages than one program scores (the softmax's max and sum combined over blocks), one of
    them ending in an empty last block, against the reference."""
    gen = generator(41)
    cache = paged_cache(gen, [150 * 16 + 5, 64 * 16, 1], 2, 16, 16)
    q = randn(gen, 3, 4, 16) * 3
    summaries = PageSummaries.build(cache)
    got = page_mean_scores(q, cache, summaries, n_sink=1, n_local=3, scale=0.5).cpu()
    want = reference_scores(q, cache, 1, 3, 0.5)
    assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got == float("inf"), want == float("inf"))
    finite = want.isfinite()
    assert torch.allclose(got[finite], want[finite], rtol=1e-4, atol=1e-6)
    sel = page_mean_select(q, cache, summaries, budget=20 * 16, sink=16, window=32, scale=0.5)  # 32 tokens: 3 pages
    assert_top_pages(sel, want, cache, 20, tol=1e-6)


def test_the_page_holding_the_querys_key_is_chosen():
    """A page whose keys all point along q wins over pages of noise, for every head of the group."""
    gen = generator(3)
    cache = paged_cache(gen, [40 * 16], 2, 32, 16)
    q = randn(gen, 1, 4, 32)
    k, _ = cache.gather(0)
    phys = int(cache.page_table[0, 17])
    cache.k[phys] = q[0, ::2].reshape(1, 2, 32).to(cache.k.dtype) * 2  # page 17: each kv head's first query
    summaries = PageSummaries.build(cache)
    sel = page_mean_select(q, cache, summaries, budget=4 * 16, sink=16, window=1)  # 2 forced, 2 chosen
    assert (sel.pages[0, :, :4] == 17).any(-1).all()


def test_bad_inputs_name_the_argument():
    gen = generator(2)
    cache = paged_cache(gen, [40, 20], 2, 16, 16)
    summaries = PageSummaries.build(cache)
    q = randn(gen, 2, 4, 16)
    with pytest.raises(ValueError, match="budget"):
        page_mean_select(q, cache, summaries, budget=8)
    with pytest.raises(ValueError, match="q: expected"):
        page_mean_logits(randn(gen, 2, 3, 16), cache, summaries)
    no_mean = PageSummaries(summaries.kmin, summaries.kmax, summaries.table, 16)
    with pytest.raises(ValueError, match="summaries"):
        page_mean_logits(q, cache, no_mean)
    assert DEV in (q.device.type, str(q.device))
