"""FlexPrefill: the decision, both selections and the layout against plain PyTorch statements of the rules
(tie rule: equal scores go to the lower id; an entry is taken while the kept mass is below gamma), the
fused pooled scoring against torch, and bad budgets."""
import math

import pytest
import torch

import triton
import triton.language as tl

from helpers import generator, poison, poison_, qkv, randn
from sparse_attn.estimators.flexprefill import flexprefill_choice, flexprefill_layout
from sparse_attn.methods import check_method_kwargs, sparse_attention
from sparse_attn.recall import attention_recall


def _take(scores, candidates, forced, gamma, minimum):
    """The selection rule as a loop over python floats: forced ids, then by (-score, id) while the kept
    mass is below gamma (every candidate for gamma >= 1), then topped up to `minimum` in the same order."""
    ranked = sorted((c for c in candidates if c not in forced), key=lambda c: (-scores[c], c))
    chosen, mass = list(forced), sum(scores[c] for c in forced)
    rest = []
    for c in ranked:
        if gamma < 1 and mass >= gamma:
            rest.append(c)
            continue
        chosen.append(c)
        mass += scores[c]
    chosen += rest[:max(0, minimum - len(chosen))]
    return set(chosen)


def reference_choice(q, k, gamma, tau, bs, min_budget):
    """Per (batch, head): ("qa", {query block: set of key blocks}) or ("vs", columns, diagonal offsets)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    off = sk - sq
    scale = d ** -0.5
    length = max(1, min(bs, sq, sk))
    nq, nk = math.ceil(sq / bs), math.ceil(sk / bs)
    out = {}
    for bi in range(b):
        for h in range(hq):
            qh, kh = q[bi, h].double(), k[bi, h // g].double()
            col, slash = [0.0] * sk, [0.0] * sk
            for t in range(sq - length, sq):
                s = (kh @ qh[t]) * scale
                s[t + off + 1:] = float("-inf")
                p = torch.softmax(s, 0)
                for j in range(min(sk, t + off + 1)):
                    col[j] += float(p[j]) / length
                    slash[t + off - j] += float(p[j]) / length
            true = torch.tensor([sum(col[kb * bs:(kb + 1) * bs]) for kb in range(nk)], dtype=torch.float64)
            true = true / true.sum()
            kpool = torch.stack([kh[kb * bs:(kb + 1) * bs].mean(0) for kb in range(nk)])
            pooled = torch.softmax(kpool @ qh[sq - length:].mean(0) * scale, 0)
            mid = (pooled + true) / 2

            def kl(a):
                return sum(float(x) * math.log(float(x) / float(m)) for x, m in zip(a, mid) if x > 0)

            if 0.5 * kl(pooled) + 0.5 * kl(true) < tau[h]:
                sets = {}
                for qb in range(nq):
                    last = min(qb * bs + bs, sq) - 1 + off
                    visible = [kb for kb in range(nk) if kb * bs <= last]
                    if not visible:
                        sets[qb] = set()
                        continue
                    qpool = qh[qb * bs:min(sq, qb * bs + bs)].mean(0)
                    probs = torch.softmax(kpool[visible] @ qpool * scale, 0)
                    scores = {kb: float(p) for kb, p in zip(visible, probs)}
                    sets[qb] = _take(scores, visible, sorted({0, visible[-1]}), gamma[h], math.ceil(min_budget / bs))
                out[bi, h] = ("qa", sets)
            else:
                window = [sk + o for o in range(max(1, min(min_budget, sk)))]  # diagonals kept first
                both = _take(dict(enumerate(col + slash)), range(2 * sk), [0, *window], gamma[h], 0)
                cols, diags = {e for e in both if e < sk}, {e - sk for e in both if e >= sk}
                ranked = [0] + sorted(range(1, sk), key=lambda j: (-col[j], j))
                out[bi, h] = ("vs", cols | set(ranked[:min_budget]), diags)
    return out


def reference_mask(ref, b, hq, sq, sk, bs):
    """Rule 4 written out: bool [b, hq, sq, sk] (before the causal mask)."""
    mask = torch.zeros(b, hq, sq, sk, dtype=torch.bool)
    off = sk - sq
    for (bi, h), entry in ref.items():
        if entry[0] == "qa":
            for qb, blocks in entry[1].items():
                for kb in blocks:
                    mask[bi, h, qb * bs:qb * bs + bs, kb * bs:kb * bs + bs] = True
            continue
        _, cols, diags = entry
        for qb in range(math.ceil(sq / bs)):
            rows = range(qb * bs, min(sq, qb * bs + bs))
            last = rows[-1] + off
            for j in cols:
                if j <= last:
                    mask[bi, h, rows.start:rows.stop, j] = True
            for o in diags:  # the block's range of diagonal o: keys [q0 + off - o, q1 + off - o)
                lo, hi = max(0, rows.start + off - o), min(sk, rows.stop + off - o)
                if lo < hi:
                    mask[bi, h, rows.start:rows.stop, lo:hi] = True
    return mask


def _choice_sets(choice, bs):
    out = {}
    b, h = choice.query_aware.shape
    for bi in range(b):
        for hi in range(h):
            if bool(choice.query_aware[bi, hi]):
                sets = {}
                for qb in range(choice.range_counts.shape[2]):
                    n = int(choice.range_counts[bi, hi, qb])
                    ranges = zip(choice.range_starts[bi, hi, qb, :n].tolist(),
                                 choice.range_ends[bi, hi, qb, :n].tolist())
                    sets[qb] = {j // bs for a, z in ranges for j in range(a, z)}
                out[bi, hi] = ("qa", sets)
            else:
                out[bi, hi] = ("vs", {int(x) for x in choice.columns[bi, hi]}, {int(x) for x in choice.slashes[bi, hi]})
    return out


CASES = [  # seed, b, hq, hkv, sq, sk, d, bs, min_budget
    (0, 1, 4, 2, 200, 200, 32, 32, 64),
    (1, 2, 4, 1, 97, 230, 64, 16, 0),
    (2, 1, 6, 3, 130, 130, 32, 16, 100),
    (3, 1, 2, 2, 64, 300, 32, 32, 0),
]


@pytest.mark.parametrize("seed,b,hq,hkv,sq,sk,d,bs,min_budget", CASES)
def test_choice_and_layout_equal_the_written_out_rules(seed, b, hq, hkv, sq, sk, d, bs, min_budget):
    gen = generator(seed)
    q, k, _ = qkv(gen, b, hq, hkv, sq, sk, d, device="cpu")
    q = q * 3  # peaked scores: selections of very different sizes
    gamma = [0.5, 0.9, 0.97, 1.0, 0.8, 0.3][:hq]
    tau = [0.0, 1.0, 0.05, 0.3, 1.0, 0.0][:hq]
    choice = flexprefill_choice(q, k, gamma, tau, block_size=bs, min_budget=min_budget, backend="torch")
    ref = reference_choice(q, k, gamma, tau, bs, min_budget)
    assert _choice_sets(choice, bs) == ref
    layout = flexprefill_layout(choice, sq, sk, block_size=bs, backend="torch")
    layout.check_values()
    off = sk - sq
    causal = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + off
    assert torch.equal(layout.to_dense() & causal, reference_mask(ref, b, hq, sq, sk, bs) & causal)


def test_layout_of_query_aware_heads_alone_equals_the_written_out_rule():
    """Every head query-aware: the layout is the ranges alone (no vertical-slash index), as rule 4 writes it."""
    q, k, _ = qkv(8, 2, 4, 2, 150, 190, 32, device="cpu")
    q = q * 3
    gamma = [0.5, 0.9, 0.8, 0.97]
    choice = flexprefill_choice(q, k, gamma, 1.0, block_size=16, min_budget=32, backend="torch")
    ref = reference_choice(q, k, gamma, [1.0] * 4, 16, 32)
    assert _choice_sets(choice, 16) == ref
    layout = flexprefill_layout(choice, 150, 190, block_size=16, backend="torch")
    layout.check_values()
    causal = torch.arange(190)[None, :] <= torch.arange(150)[:, None] + 40
    assert torch.equal(layout.to_dense() & causal, reference_mask(ref, 2, 4, 150, 190, 16) & causal)


@pytest.mark.parametrize("seed,b,hq,hkv,sq,sk,d,bs,min_budget",
                         CASES + [(4, 1, 4, 2, 150, 100, 64, 16, 40), (5, 2, 2, 1, 333, 333, 32, 32, 0)])
def test_fused_scoring_and_builders_give_the_torch_layout(seed, b, hq, hkv, sq, sk, d, bs, min_budget, monkeypatch):
    """The Triton path (every kernel output poisoned before it is written) chooses what the torch statement of
    the rules chooses: GQA, odd lengths, fewer keys than queries (rows that see nothing), head dims 32 / 64."""
    q, k, _ = qkv(seed, b, hq, hkv, sq, sk, d, device="cpu")
    q = q * 3
    if seed % 2:  # strided views (sequence-major storage), as the HF adapter passes them
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
    # kv heads whose query heads are all query-aware, all vertical-slash (no diagonal sums skipped), or mixed
    gamma, tau = [0.9, 0.7, 0.95, 0.99, 1.0, 0.6][:hq], [1.0, 1.0, 0.0, 0.0, 0.1, 1.0][:hq]
    ref = flexprefill_choice(q, k, gamma, tau, block_size=bs, min_budget=min_budget, backend="torch")
    with monkeypatch.context() as m:
        poison(m, torch, "empty")
        got = flexprefill_choice(q, k, gamma, tau, block_size=bs, min_budget=min_budget, backend="triton")
    assert _choice_sets(got, bs) == _choice_sets(ref, bs)
    a = flexprefill_layout(ref, sq, sk, block_size=bs, backend="torch")
    c = flexprefill_layout(got, sq, sk, block_size=bs, backend="triton")
    assert torch.equal(a.to_dense(), c.to_dense())


def test_rows_with_more_runs_than_the_first_width_are_written_again(monkeypatch):
    """The Triton path writes ranges up to a width fixed before the sync; wider rows make it run again."""
    from sparse_attn.estimators.flexprefill import select

    q, k, _ = qkv(6, 1, 2, 1, 300, 300, 32, device="cpu")
    q = q * 3
    ref = flexprefill_choice(q, k, 0.6, 1.0, block_size=16, min_budget=0, backend="torch")
    assert int(ref.range_counts.max()) > 1
    monkeypatch.setattr(select, "_RANGE_ELEMENTS", 1)
    got = flexprefill_choice(q, k, 0.6, 1.0, block_size=16, min_budget=0, backend="triton")
    assert _choice_sets(got, 16) == _choice_sets(ref, 16)


def test_triton_path_is_a_few_launches_and_no_torch_compute(monkeypatch):
    """The Triton path: each kernel launched once (the scores' max / sum pass, then its column sums and, after the
    decision, the other heads' diagonal sums; pooling of k and of the query-aware heads' q, the decision (two), the
    fused query-aware selection, the vertical-slash selection and write) and no
    torch compute between them: no sort, top-k, scan, scatter, gather, softmax or matmul (only allocations,
    the budgets' checks on the host and the one read of the widths)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from helpers import count_launches
    from sparse_attn.estimators.flexprefill import probs_triton, vs_triton
    from sparse_attn.estimators.vertical_slash import scores_triton

    launches = {**count_launches(monkeypatch, probs_triton, "_pool_kernel", "_decide_parts_kernel", "_decide_kernel",
                                 "_query_aware_kernel"),
                **count_launches(monkeypatch, vs_triton, "_vs_select_kernel", "_vs_write_kernel"),
                **count_launches(monkeypatch, scores_triton, "_lse_kernel", "_scores_kernel")}
    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    q, k, _ = qkv(7, 1, 4, 2, 200, 200, 32, device="cpu")
    q = q * 3
    with Record():
        choice = flexprefill_choice(q, k, 0.9, [1.0, 0.0, 1.0, 0.0], block_size=32, backend="triton")
    assert choice.query_aware.tolist() == [[True, False, True, False]]
    assert {name: len(grids) for name, grids in launches.items()} == {
        "_pool_kernel": 2, "_decide_parts_kernel": 1, "_decide_kernel": 1, "_query_aware_kernel": 1,
        "_vs_select_kernel": 1, "_vs_write_kernel": 1, "_lse_kernel": 1, "_scores_kernel": 2}
    compute = {"sort", "argsort", "topk", "cumsum", "scatter", "scatter_", "gather", "index_put_", "nonzero",
               "index_select", "where", "cat", "_softmax", "bmm", "mm", "sum", "mean", "masked_fill_", "div"}
    assert not compute & set(ops), sorted(compute & set(ops))
    assert ops.count("_local_scalar_dense") <= 3  # the widths (one read) and the budgets' checks


@pytest.mark.parametrize("step", [None, 2])
@pytest.mark.parametrize("seed,sq,sk,d,bs", [(0, 300, 2100, 32, 16), (1, 200, 200, 64, 64), (2, 97, 4500, 32, 16)])
def test_decision_kernel_flips_at_the_written_out_divergence(seed, sq, sk, d, bs, step, monkeypatch):
    """Rule 1 on the GPU path (chunks of key blocks in parallel, then the softmax's max and sum over the chunks):
    each head's flag flips between tau just below and just above its Jensen-Shannon divergence written out in
    float64. Many key blocks (more than one chunk, the largest pooled logit late), few, fewer queries than keys;
    the per-head program reading its chunks' sums in one step or in several (step 2)."""
    from sparse_attn.estimators.flexprefill import probs_triton
    from sparse_attn.estimators.flexprefill.probs_triton import decide_triton, pool_triton
    from sparse_attn.estimators.flexprefill.select import last_block_scores

    if step:
        monkeypatch.setattr(probs_triton, "_DECIDE_STEP", step)
    hq, hkv = 8, 2
    q, k, _ = qkv(seed, 1, hq, hkv, sq, sk, d, device="cpu")
    q = q * torch.linspace(0.5, 4.0, hq).view(1, hq, 1, 1)  # heads from flat to peaked
    k[:, :, sk - 3 * bs:] += 2.0 * q[:, ::hq // hkv, -1:]  # late keys near the last queries: the max comes late
    scale = d ** -0.5
    length = min(bs, sq, sk)
    nk = math.ceil(sk / bs)
    v, _ = last_block_scores(q, k, block_size=bs, scale=scale, backend="torch")
    jsd = []
    for h in range(hq):
        qh, kh = q[0, h].double(), k[0, h // (hq // hkv)].double()
        kpool = torch.stack([kh[kb * bs:(kb + 1) * bs].mean(0) for kb in range(nk)])
        pooled = torch.softmax(kpool @ qh[sq - length:].mean(0) * scale, 0)
        true = torch.stack([v[0, h, kb * bs:(kb + 1) * bs].double().sum() for kb in range(nk)])
        true = true / true.sum()
        mid = (pooled + true) / 2
        kl = [float((a * (a / mid).log()).where(a > 0, 0.0).sum()) for a in (pooled, true)]
        jsd.append(0.5 * kl[0] + 0.5 * kl[1])
    jsd = torch.tensor(jsd)
    assert jsd.max() > 1.5 * jsd.min() > 0  # heads of different shapes
    kp = pool_triton(k, bs)
    for factor, expected in ((0.999, False), (1.001, True)):
        got = decide_triton(q, kp, v * length, (jsd * factor).float(), block_size=bs, length=length, scale=scale)
        assert got.bool().tolist() == [[expected] * hq], (factor, jsd.tolist())


def test_scores_skip_the_diagonals_of_flagged_heads_only():
    """The scores' second pass with flags: diagonal sums of every program that holds an unflagged head equal the
    unflagged call's, the others are zero; column sums alone equal the full call's."""
    from sparse_attn.estimators.vertical_slash import scores_triton
    from sparse_attn.estimators.vertical_slash.scores_triton import last_rows_lse, scores_from_lse

    q, k, _ = qkv(9, 2, 8, 2, 150, 170, 32, device="cpu")
    lse = last_rows_lse(q, k, 16, 0.2, True)
    v, s = scores_from_lse(q, k, lse, 16, 0.2, True)
    v_only, none = scores_from_lse(q, k, lse, 16, 0.2, True, slashes=False)
    assert none is None and torch.equal(v_only, v)
    flag = torch.tensor([[1, 1, 1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.int8)
    _, s_some = scores_from_lse(q, k, lse, 16, 0.2, True, columns=False, skip=flag)
    hg = scores_triton._heads_per_program(4, 16, scores_triton._SCORES_ROWS)  # query heads a program holds
    kept = (flag == 0).view(2, 8 // hg, hg).any(-1, keepdim=True).expand(2, 8 // hg, hg).reshape(2, 8)
    assert kept.any() and not kept.all()
    assert torch.equal(s_some[kept], s[kept]) and not s_some[~kept].any()


def _mixed_heads(gen, sq=512, d=32, targets=24):
    """Head 0 attends to its local window (keys close to the query), head 1 to `targets` scattered keys."""
    base = randn(gen, sq, d, device="cpu")
    pos = torch.arange(sq, dtype=torch.float32)
    freq = torch.arange(d // 2, dtype=torch.float32)
    ang = pos[:, None] * 0.02 * (1 + freq[None, :]) / (d // 2)
    rot = torch.cat([ang.cos(), ang.sin()], -1) * 3.0
    q0, k0 = rot + 0.1 * base, rot.clone()
    targets = torch.randperm(sq, generator=gen)[:targets]
    key_dir = randn(gen, d, device="cpu")
    key_dir = key_dir / key_dir.norm()
    k1 = randn(gen, sq, d, device="cpu") * 0.3
    k1[targets] += key_dir * 8
    q1 = key_dir.expand(sq, d) * 6 + 0.3 * randn(gen, sq, d, device="cpu")
    q = torch.stack([q0, q1])[None]
    k = torch.stack([k0, k1])[None]
    return q, k


def test_scattered_head_goes_vertical_slash_and_keeps_its_mass_sparsely():
    q, k = _mixed_heads(generator(11), sq=1024, targets=8)
    choice = flexprefill_choice(q, k, 0.9, 0.1, block_size=32, min_budget=0, backend="torch")
    assert choice.query_aware.tolist() == [[True, False]]
    layout = flexprefill_layout(choice, q.shape[2], k.shape[2], block_size=32, backend="torch")
    recall = attention_recall(q, k, layout)
    density = layout.head_density()
    # rows before a target cannot see it: their mass is spread, so recall stays a little under gamma there
    assert float(recall[0, 1]) >= 0.88 and float(density[0, 1]) < 0.1
    assert float(recall[0, 0]) >= 0.95 and float(density[0, 0]) < 0.25


def test_tau_forces_the_kind_and_gamma_one_is_dense():
    q, k, v = qkv(3, 1, 4, 2, 150, 150, 32, device="cpu")
    assert not flexprefill_choice(q, k, 0.9, 0.0, block_size=32).query_aware.any()
    assert flexprefill_choice(q, k, 0.9, 1.0, block_size=32).query_aware.all()
    for tau in (0.0, 1.0):
        choice = flexprefill_choice(q, k, 1.0, tau, block_size=32, min_budget=0)
        layout = flexprefill_layout(choice, 150, 150, block_size=32, backend="torch")
        assert layout.density() == pytest.approx(1.0)


def test_method_equals_reference_on_its_layout_bottom_right():
    from sparse_attn.ops.reference import reference_attention

    q, k, v = qkv(4, 1, 4, 2, 70, 200, 32, device="cpu")
    stats = {}
    out = sparse_attention(q, k, v, "flexprefill", gamma=0.8, min_seqlen=0, block_size=32, min_budget=0, stats=stats)
    choice = flexprefill_choice(q, k, 0.8, 0.1, block_size=32, min_budget=0)
    layout = flexprefill_layout(choice, 70, 200, block_size=32, backend="torch")
    torch.testing.assert_close(out, reference_attention(q, k, v, layout, causal=True), atol=2e-5, rtol=1e-4)
    assert stats["density"].mean() < 1


@pytest.mark.parametrize("kwargs,match", [
    ({"gamma": 0.0}, "gamma"), ({"gamma": 1.5}, "gamma"), ({"gamma": float("nan")}, "gamma"),
    ({"tau": -0.1}, "tau"), ({"min_budget": -1}, "min_budget"), ({"block_size": 0}, "block_size"),
])
def test_bad_budgets_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_method_kwargs("flexprefill", kwargs)


def test_block_size_the_kernels_do_not_take_is_refused():
    q, k, v = qkv(5, 1, 2, 1, 100, 100, 32, device="cpu")
    with pytest.raises(ValueError, match="block_size"):
        sparse_attention(q, k, v, "flexprefill", block_size=48, min_seqlen=0)
    with pytest.raises(ValueError, match="gamma"):
        flexprefill_choice(q, k, [0.9, 0.0], 0.1, block_size=32)


@triton.jit
def _band_kernel(P, BUF, NVIS, GAMMA, STARTS, ENDS, COUNTS, rows, nk, heads, min_blocks, width, block_size, seqlen_k,
                 BM: tl.constexpr, BT: tl.constexpr, CAP: tl.constexpr):
    """The fused kernel's selection step on given probabilities: one band of `rows` rows per (batch, head)."""
    from sparse_attn.estimators.flexprefill.probs_triton import _select_band

    bh = tl.program_id(0)
    r = tl.arange(0, BM)
    live = r < rows
    nvis = tl.load(NVIS + r, mask=live, other=0)
    row = (bh * rows + r).to(tl.int64)
    runs = _select_band(P, BUF + bh * BM * CAP, row * nk, live, nvis, tl.max(nvis, 0), tl.load(GAMMA + bh % heads),
                        min_blocks, STARTS, ENDS, row * width, width, block_size, seqlen_k, tl.zeros([BM], tl.float32),
                        tl.zeros([BM], tl.float32), BM, BT, CAP, False)
    tl.store(COUNTS + row, runs, mask=live)


@pytest.mark.parametrize("min_blocks,levels,unit,cap",
                         [(0, 4, 64, 64), (3, 4, 64, 64), (40, 4, 64, 4), (3, 40, 1024, 4), (0, 40, 1024, 16)])
def test_sort_free_band_selection_equals_the_sorted_rule_with_ties(min_blocks, levels, unit, cap):
    """The fused kernel's selection (no sort: bisections, runs from a running count) against take_until on
    probabilities on a grid of 1/64 or 1/1024 (sums exact): many exact ties, and gammas that land on a tie, below the
    forced mass, past the visible mass, and at 1; tiles of 16 blocks over rows of up to 37; registers for 4, 16 or
    64 candidates a row (searches that pass over the band before they copy, or copy at once)."""
    from sparse_attn.estimators.flexprefill.select import keep_mask

    gen = generator(9 + min_blocks)
    b, h, rows, nk, bs, sq, sk = 2, 5, 6, 37, 16, 400, 590
    row0 = 10
    last = (torch.arange(row0, row0 + rows) * bs + bs).clamp(max=sq) - 1 + (sk - sq)
    blocks = torch.arange(nk)
    visible = blocks[None, :] * bs <= last[:, None]
    p = torch.randint(0, levels, (b, h, rows, nk), generator=gen).float() * visible / unit  # not normalized
    nvis = visible.sum(-1).int()
    forced = visible & ((blocks[None, :] == 0) | (blocks[None, :] == nvis[:, None] - 1))
    gamma = torch.tensor([0.5, 1 / 64, 1.0, 0.75, 2 / 64])
    ref = keep_mask(p, visible, forced, gamma.view(1, h, 1), min_blocks)
    width = 19
    starts = poison_(torch.empty(b, h, rows, width, dtype=torch.int32))
    ends = poison_(torch.empty_like(starts))
    counts = poison_(torch.empty(b, h, rows, dtype=torch.int32))
    buf = poison_(torch.empty(b * h, 8 * cap))
    _band_kernel[(b * h,)](p, buf, nvis, gamma, starts, ends, counts, rows, nk, h, min_blocks, width, bs, sk, BM=8,
                           BT=16, CAP=cap)
    got = torch.zeros_like(ref)
    for idx in torch.cartesian_prod(torch.arange(b), torch.arange(h), torch.arange(rows)).tolist():
        n = int(counts[tuple(idx)])
        assert n <= width
        for a, z in zip(starts[tuple(idx)][:n].tolist(), ends[tuple(idx)][:n].tolist()):
            assert a < z and a % bs == 0 and (z % bs == 0 or z == sk)
            got[tuple(idx)][a // bs:-(-z // bs)] = True
    assert torch.equal(got, ref)


@pytest.mark.parametrize("tile,cap", [(2048, 4096), (16, 8)])
def test_sort_free_vertical_slash_selection_equals_the_torch_rule_with_ties(tile, cap, monkeypatch):
    """Rule 3's kernels against select_vertical_slash on masses on a grid of 1/1024: ties across columns and
    diagonals, gammas on a tie, below the forced mass, past the total and at 1, windows of 1 to every diagonal
    with top-ups to min_budget columns; heads flagged query-aware keep column 0 and diagonal 0; ids ascending
    behind zero padding, widths the widest row.
    Small tiles and register cap: several tiles a pass, searches that pass over the row before they copy."""
    from sparse_attn.estimators.flexprefill import vs_triton
    from sparse_attn.estimators.flexprefill.select import select_vertical_slash
    from sparse_attn.estimators.flexprefill.vs_triton import (vertical_slash_select_triton,
                                                              vertical_slash_write_triton)

    monkeypatch.setattr(vs_triton, "_BT", tile)
    monkeypatch.setattr(vs_triton, "_CAP", cap)

    gen = generator(13)
    b, h, n = 2, 6, 75
    length = 4
    # multiples of 1/1024 below 40/1024 (sums exact, ~4 ties per value); head 3's total is below its gamma
    v = torch.randint(0, 40, (b, h, n), generator=gen).float() * length / 1024
    s = torch.randint(0, 40, (b, h, n), generator=gen).float() * length / 1024
    v[:, 3] /= 8
    s[:, 3] /= 8
    gamma = torch.tensor([0.5, 1 / 64, 1.0, 0.75, 3 / 64, 0.9])
    flag = torch.tensor([[0, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0]], dtype=torch.int8)
    for min_budget in (0, 7, 60, 200):
        stats = torch.zeros(3, dtype=torch.int32)
        plan = vertical_slash_select_triton(v, s, length, gamma, flag, stats, min_budget=min_budget)
        cols, slashes = vertical_slash_write_triton(plan, length, int(stats[1]), int(stats[2]))
        ref_c, ref_s = select_vertical_slash(v / length, s / length, gamma, min_budget=min_budget)
        for got, ref in ((cols, ref_c), (slashes, ref_s)):
            assert torch.equal(got, got.sort(-1).values)
            widest = 0
            for bi in range(b):
                for hi in range(h):
                    want = {0} if flag[bi, hi] else set(ref[bi, hi].tolist())
                    assert set(got[bi, hi].tolist()) == want
                    widest = max(widest, len(want))
            assert got.shape[-1] == widest


@pytest.mark.gpu
@pytest.mark.parametrize("sq,sk", [(4096, 4096), (3001, 5003)])
def test_gpu_choice_equals_the_torch_rule_and_attention_its_reference(sq, sk):
    """On CUDA (fused scoring, sort-free selection, Triton / CUDA index builders) in fp32: the layout the
    torch rule gives on the CPU; in bf16 the method's output equals the reference over its layout."""
    from helpers import assert_close
    from sparse_attn.ops.reference import reference_attention

    q, k, v = qkv(sq, 1, 8, 2, sq, sk, 128, device="cpu")
    q = q * 2
    gamma, tau = [0.9, 0.8, 0.95, 0.9, 0.7, 0.9, 0.99, 0.9], [1.0, 1.0, 0.0, 0.1, 1.0, 0.0, 0.1, 0.1]
    ref = flexprefill_choice(q, k, gamma, tau, block_size=64, backend="torch")
    got = flexprefill_choice(q.cuda(), k.cuda(), gamma, tau, block_size=64)
    assert torch.equal(got.query_aware.cpu(), ref.query_aware)
    a = flexprefill_layout(ref, sq, sk, block_size=64, backend="torch")
    c = flexprefill_layout(got, sq, sk, block_size=64).to("cpu")
    assert a.density() == pytest.approx(c.density(), abs=1e-3)  # fp32 rounding may move a block at gamma
    qb, kb, vb = (x.cuda().to(torch.bfloat16) for x in (q, k, v))
    stats = {}
    out = sparse_attention(qb, kb, vb, "flexprefill", min_seqlen=0, stats=stats)
    choice = flexprefill_choice(qb, kb, 0.9, 0.1, block_size=64)
    layout = flexprefill_layout(choice, sq, sk, block_size=64)
    assert_close(out, reference_attention(qb, kb, vb, layout, causal=True),
                 reference_attention(qb, kb, vb, layout, causal=True, upcast=False))


def sink_heavy_qk(s, device, hq=4):
    """q [1, hq, s, 128], k [1, 1, s, 128] bf16: Gaussian, plus one direction of norm 12 shared by every query
    and the first 64 keys, so each query puts most of its mass (~90 % at 1M keys) on that block."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, hq, s, 128, device=device, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, 1, s, 128, device=device, dtype=torch.bfloat16, generator=gen)
    u = torch.randn(128, device=device, generator=gen)
    u = (u / u.norm() * 12).to(torch.bfloat16)
    q += u
    k[:, :, :64] += u
    return q, k


@pytest.mark.gpu
def test_gpu_one_million_tokens_fit():
    """1M tokens, 4 query / 1 kv heads of D=128 in bf16 whose mass concentrates on a sink block: the estimator
    and the index fit (nothing Sq x Sk) and the layout is sparse. (Plain Gaussian q and k spread their mass
    nearly uniformly: reaching gamma = 0.9 then takes ~90 % of the keys, which is the rule, not a fault.)"""
    s = 1 << 20
    q, k = sink_heavy_qk(s, "cuda")
    torch.cuda.reset_peak_memory_stats()
    choice = flexprefill_choice(q, k, 0.9, 0.1, block_size=64)
    layout = flexprefill_layout(choice, s, s, block_size=64)
    assert layout.density() < 0.1
    assert torch.cuda.max_memory_allocated() < 40 * 2**30
