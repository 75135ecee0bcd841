"""XAttention: the strided antidiagonal block scores and the cumulative-tau selection against plain PyTorch
statements of the same rules (tie rule: equal scores go to the lower key block id), and bad inputs."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import generator, qkv
from sparse_attn.estimators.xattention import antidiagonal_block_scores, xattention_select
from sparse_attn.methods import check_method_kwargs


def reference_scores(q, k, block_size, stride, causal=True):
    """Every antidiagonal sum written out: tile (r, c) sums q[rS + s] . k[cS + S - 1 - s] over s (tokens past
    the ends are zero), scaled by d^-0.5 / S, softmaxed over the key groups the group's last row may see."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    nqg, nkg = -(-sq // stride), -(-sk // stride)
    qp = torch.zeros(b, hq, nqg * stride, d)
    qp[:, :, :sq] = q.float()
    kp = torch.zeros(b, hkv, nkg * stride, d)
    kp[:, :, :sk] = k.float()
    scores = torch.zeros(b, hq, nqg, nkg)
    for s in range(stride):
        qs = qp[:, :, s::stride]  # [b, hq, nqg, d]
        ks = kp[:, :, stride - 1 - s::stride].repeat_interleave(g, 1)
        scores += qs @ ks.transpose(-1, -2)
    scores *= d ** -0.5 / stride
    last_row = torch.clamp((torch.arange(nqg) + 1) * stride, max=sq) - 1
    visible = (torch.arange(nkg)[None, :] * stride <= last_row[:, None] + (sk - sq)) if causal else \
        torch.ones(nqg, nkg, dtype=torch.bool)
    p = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    nq, nk = -(-sq // block_size), -(-sk // block_size)
    per = block_size // stride
    out = torch.zeros(b, hq, nq, nk)
    for qb in range(nq):
        rows = range(qb * per, min((qb + 1) * per, nqg))
        for kb in range(nk):
            cols = range(kb * per, min((kb + 1) * per, nkg))
            out[:, :, qb, kb] = p[:, :, list(rows)][:, :, :, list(cols)].sum((-1, -2)) / len(rows)
    return out


def reference_select(score, sq, sk, block_size, tau, causal=True):
    """Per (batch, head, query block) the set of kept key blocks, the rule written as a loop."""
    b, h, nq, nk = score.shape
    keep = torch.zeros(b, h, nq, nk, dtype=torch.bool)
    for qb in range(nq):
        last = min(qb * block_size + block_size, sq) - 1 + (sk - sq)
        diag = min(last // block_size, nk - 1) if causal else nk - 1
        if last < 0 and causal:
            continue
        for bi in range(b):
            for hi in range(h):
                forced = sorted({0, diag})
                rest = sorted((kb for kb in range(diag + 1) if kb not in forced),
                              key=lambda kb: (-float(score[bi, hi, qb, kb]), kb))
                mass = sum(float(score[bi, hi, qb, kb]) for kb in forced)
                chosen = list(forced)
                for kb in rest:
                    if mass >= tau[hi] and tau[hi] < 1:
                        break
                    chosen.append(kb)
                    mass += float(score[bi, hi, qb, kb])
                keep[bi, hi, qb, chosen] = True
    return keep


@given(seed=st.integers(0, 2**31 - 1), stride=st.sampled_from([4, 8, 16]), sq=st.integers(1, 260),
       extra=st.integers(0, 90), group=st.sampled_from([1, 2, 3]))
def test_block_scores_equal_the_written_out_rule(seed, stride, sq, extra, group):
    q, k, _ = qkv(seed, b=1, hq=2 * group, hkv=2, sq=sq, sk=sq + extra, d=16, device="cpu")
    got = antidiagonal_block_scores(q, k, block_size=64, stride=stride)
    want = reference_scores(q, k, 64, stride)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@given(seed=st.integers(0, 2**31 - 1), taus=st.lists(st.sampled_from([0.3, 0.6, 0.9, 1.0]), min_size=4, max_size=4),
       sq=st.integers(64, 330), causal=st.booleans())
def test_selection_equals_the_written_out_rule(seed, taus, sq, causal):
    gen = generator(seed)
    q, k, _ = qkv(gen, b=2, hq=4, hkv=2, sq=sq, sk=sq, d=16, device="cpu")
    q = q * 3  # sharper attention: the budgets then differ
    layout = xattention_select(q, k, taus, block_size=32, stride=8, causal=causal)
    layout.check_values()
    score = antidiagonal_block_scores(q, k, block_size=32, stride=8, causal=causal)
    want = reference_select(score, sq, sq, 32, taus, causal)
    assert torch.equal(layout.to_block_mask().cpu(), want)


@pytest.mark.parametrize("min_blocks, elements", [(1, 1), (2, 1), (3, 4096)])
def test_selection_in_chunks_of_query_blocks_equals_one_chunk(monkeypatch, min_blocks, elements):
    """A long prompt's selection runs in chunks of query blocks (each chunk's lists as wide as its own
    longest): chunks of 1-3 blocks give the layout of the written-out rule."""
    from sparse_attn.estimators import xattention as xa

    q, k, _ = qkv(generator(min_blocks + elements), b=1, hq=4, hkv=2, sq=301, sk=333, d=16, device="cpu")
    taus = [0.3, 0.6, 0.9, 1.0]
    score = antidiagonal_block_scores(q * 3, k, block_size=32, stride=8)
    monkeypatch.setattr(xa, "_MIN_CHUNK_BLOCKS", min_blocks)
    monkeypatch.setattr(xa, "_CHUNK_ELEMENTS", elements)
    layout = xattention_select(q * 3, k, taus, block_size=32, stride=8)
    layout.check_values()
    assert torch.equal(layout.to_block_mask().cpu(), reference_select(score, 301, 333, 32, taus, True))


def test_tau_one_keeps_every_visible_block_and_small_tau_fewer():
    q, k, _ = qkv(5, b=1, hq=2, hkv=1, sq=300, d=16, device="cpu")
    full = xattention_select(q * 4, k, 1.0, block_size=32, stride=8)
    assert full.density(causal=True) == pytest.approx(1.0)
    small = xattention_select(q * 4, k, 0.3, block_size=32, stride=8)
    assert small.density(causal=True) < 0.9


def test_bad_budgets_name_the_argument():
    q, k, _ = qkv(1, b=1, hq=2, hkv=1, sq=128, d=16, device="cpu")
    with pytest.raises(ValueError, match="stride"):
        xattention_select(q, k, 0.9, block_size=64, stride=12)
    with pytest.raises(ValueError, match="stride"):
        xattention_select(q, k, 0.9, block_size=64, stride=-8)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="tau"):
            check_method_kwargs("xattention", {"tau": bad})
    with pytest.raises(ValueError, match="stride"):
        check_method_kwargs("xattention", {"stride": 0})


@pytest.mark.parametrize("sq,sk,d,stride,block,group,causal", [
    (150, 150, 32, 8, 64, 2, True), (130, 200, 48, 4, 32, 1, True), (97, 97, 16, 16, 64, 3, False),
    (1100, 1300, 16, 8, 64, 1, True), (700, 700, 16, 4, 32, 2, True)])  # several programs: causal stops
def test_fused_scores_and_selection_equal_the_torch_path(sq, sk, d, stride, block, group, causal):
    """The fused Triton scoring (interpreter here) against the chunked torch scoring: the scores within float
    rounding, a band of query blocks alone, and the selection the same blocks."""
    q, k, _ = qkv(sq + sk, b=2, hq=2 * group, hkv=2, sq=sq, sk=sk, d=d, device="cpu")
    q = q * 2
    want = antidiagonal_block_scores(q, k, block_size=block, stride=stride, causal=causal, backend="torch")
    got = antidiagonal_block_scores(q, k, block_size=block, stride=stride, causal=causal, backend="triton")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    nq = want.shape[2]
    if nq > 2:
        band = antidiagonal_block_scores(q, k, block_size=block, stride=stride, causal=causal, qb0=1, qb1=nq - 1,
                                         backend="triton")
        torch.testing.assert_close(band, want[:, :, 1:nq - 1], atol=1e-6, rtol=1e-5)
    taus = [0.5, 0.9, 0.97, 1.0, 0.7, 0.8][:2 * group]
    a = xattention_select(q, k, taus, block_size=block, stride=stride, causal=causal, backend="torch")
    b = xattention_select(q, k, taus, block_size=block, stride=stride, causal=causal, backend="triton")
    assert torch.equal(a.to_block_mask(), b.to_block_mask())


@pytest.mark.gpu
@pytest.mark.parametrize("sq,sk,stride,block,group", [(4096, 4096, 8, 64, 4), (3000, 5000, 16, 128, 4)])
def test_gpu_fused_scores_and_selection_equal_the_torch_path(sq, sk, stride, block, group):
    """On CUDA in bf16 (tensor-core dots, several programs per head, causal stops): the fused scores against
    the chunked torch scoring of the same values in float32 (bf16 products are exact in float32, so only the
    order of the sums differs), and the same blocks selected but for near-ties at tau."""
    q, k, _ = qkv(sq + sk, b=1, hq=2 * group, hkv=2, sq=sq, sk=sk, d=128, dtype=torch.bfloat16, device="cuda")
    want = antidiagonal_block_scores(q.float(), k.float(), block_size=block, stride=stride, causal=True,
                                     backend="torch")
    got = antidiagonal_block_scores(q, k, block_size=block, stride=stride, causal=True, backend="triton")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-3)
    a = xattention_select(q.float(), k.float(), 0.9, block_size=block, stride=stride, causal=True, backend="torch")
    b = xattention_select(q, k, 0.9, block_size=block, stride=stride, causal=True, backend="triton")
    same = (a.to_block_mask() == b.to_block_mask()).float().mean().item()
    assert same >= 0.999, f"{same:.5f} of the blocks agree"
