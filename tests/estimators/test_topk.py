"""The fused top-k of the vertical-slash estimator (sparse_attn.estimators.vertical_slash.topk_triton) equals an
fp32 torch reference with the same rules: the first n_forced ids raised above every score, ties at the
threshold to the lower ids, ids ascending, rows below the widest budget padded in front with id 0."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import DEV, poison_
from sparse_attn.estimators.vertical_slash import topk_triton
from sparse_attn.estimators.vertical_slash.topk_triton import topk_ids_sorted


def _reference(scores, sizes, n_forced, ceiling):
    s = scores.double().clone()
    n = min(n_forced, s.shape[-1])
    s[..., :n] = ceiling + 1 + torch.arange(n, 0, -1, dtype=s.dtype)
    width = int(sizes.max())
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    out = torch.zeros(*s.shape[:2], width, dtype=torch.int32)
    for h, k in enumerate(sizes.tolist()):
        out[:, h, width - k :] = order[:, h, :k].sort(-1).values.to(torch.int32)
    return out


def _scores(b, h, n, seed, kind):
    g = torch.Generator().manual_seed(seed)
    if kind == "rand":
        return torch.rand(b, h, n, generator=g)
    if kind == "signed":  # negative scores and a spread of exponents
        return torch.randn(b, h, n, generator=g) * torch.exp2(torch.randint(-20, 20, (b, h, n), generator=g).float())
    # few distinct values: long runs of ties, zeros included
    return torch.randint(0, 4, (b, h, n), generator=g).float() / 4


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 4), n=st.integers(1, 300), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["rand", "signed", "ties"]), uniform=st.booleans(), forced=st.integers(1, 40),
       data=st.data())
def test_topk_ids_sorted_equals_reference(b, h, n, seed, kind, uniform, forced, data):
    s0, s1 = _scores(b, h, n, seed, kind), _scores(b, h, n, seed + 1, kind)
    if uniform:
        sizes = [torch.full((h,), data.draw(st.integers(1, n))) for _ in range(2)]
    else:
        sizes = [torch.tensor(data.draw(st.lists(st.integers(1, n), min_size=h, max_size=h))) for _ in range(2)]
    ceiling = float(max(s0.max(), s1.max()))
    outs = [poison_(torch.empty(b, h, int(sz.max()), dtype=torch.int32, device=DEV)) for sz in sizes]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(topk_triton, "_BLOCK", 32)  # several chunks per row, several blocks per chunk
        mp.setattr(topk_triton, "_CHUNK", 64)
        got = topk_ids_sorted((s0.to(DEV), s1.to(DEV)), sizes, (forced, forced + 3), ceiling, out=outs)
    assert got[0] is outs[0] and got[1] is outs[1]
    assert torch.equal(got[0].cpu(), _reference(s0, sizes[0], forced, ceiling))
    assert torch.equal(got[1].cpu(), _reference(s1, sizes[1], forced + 3, ceiling))


def test_topk_ids_sorted_rejects_bad_arguments():
    s = torch.rand(1, 2, 50, device=DEV)
    ok = [torch.tensor([5, 5]), torch.tensor([3, 3])]
    with pytest.raises(ValueError, match="scores: expected two float32 tensors of one shape"):
        topk_ids_sorted((s, s.double()), ok, (1, 1), 1.0)
    with pytest.raises(ValueError, match="sizes: expected budgets in"):
        topk_ids_sorted((s, s), [torch.tensor([5, 51]), ok[1]], (1, 1), 1.0)
    with pytest.raises(ValueError, match="n_forced: expected >= 1"):
        topk_ids_sorted((s, s), ok, (0, 1), 1.0)
    with pytest.raises(ValueError, match="out: expected contiguous int32 tensors"):
        topk_ids_sorted((s, s), ok, (1, 1), 1.0, out=(torch.empty(1, 2, 5, dtype=torch.int64, device=DEV),
                                                       torch.empty(1, 2, 3, dtype=torch.int32, device=DEV)))


@pytest.mark.gpu
@pytest.mark.parametrize("n", [131072, 1 << 20])
def test_topk_ids_sorted_long_rows_on_gpu(n):
    """The estimator's shapes (32 heads, 1000 / 6096 of 128K and 1M): the same ids as the reference."""
    g = torch.Generator(device="cuda").manual_seed(n)
    s0 = torch.rand(1, 32, n, device="cuda", generator=g)
    s1 = torch.rand(1, 32, n, device="cuda", generator=g) ** 8  # many tiny values
    sizes = [torch.full((32,), 1000), torch.full((32,), 6096)]
    got = topk_ids_sorted((s0, s1), sizes, (64, 64), 1.0)
    for out, s, sz in zip(got, (s0, s1), sizes):
        assert torch.equal(out.cpu(), _reference(s.cpu(), sz, 64, 1.0))
