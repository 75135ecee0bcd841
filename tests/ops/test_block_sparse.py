"""Block-sparse attention kernel vs the fp32 reference (the tolerance rule of tests/helpers.py).

CPU: the Triton kernel through the interpreter (tiny shapes, fp16/fp32: the interpreter's bf16 dot is
wrong). GPU (`gpu` mark): bf16/fp16 up to 128K tokens. Every run writes into poisoned outputs, so an
element the kernel forgets to write fails the comparison.
"""
import functools

import pytest
import torch
from hypothesis import given, strategies as st

import helpers
from helpers import DEV, check_attention, count_launches, packed_qkv, qkv
from helpers import randn as rand
from sparse_attn import ops
from sparse_attn._triton import LaunchCache, tma_descriptors
from sparse_attn.layouts import BlockLayout
from sparse_attn.ops import block_sparse as bs
from sparse_attn.ops.block_sparse import block_sparse_attention, not_supported_reasons
from sparse_attn.ops.block_sparse import kernel as bs_kernel
from sparse_attn.ops.reference import reference_attention

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

assert_close = functools.partial(check_attention, block_sparse_attention)


def random_layout(gen, batch, heads, sq, sk, bq, bk, density, device=DEV, beyond_diagonal=False):
    """Random key blocks per query block, the causal diagonal block always kept (unless none is visible);
    beyond_diagonal: blocks past it too (for non-causal runs). helpers.random_layout's BlockLayouts."""
    return helpers.random_layout(BlockLayout, gen, batch, heads, sq, sk, bq, block_size_k=bk, density=density,
                                 causal=not beyond_diagonal, device=device)


# ---------------------------------------------------------------- CPU (interpreter) and GPU, small shapes

@given(
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float16, torch.float32]),
    causal=st.booleans(),
    blocks=st.sampled_from([(16, 16), (32, 16), (16, 32), (32, 32), (64, 64)]),
    sq=st.integers(1, 150),
    extra_k=st.integers(-40, 60),
    hkv=st.sampled_from([1, 2]),
    group=st.sampled_from([1, 3]),
    head_dim=st.sampled_from([16, 32, 64]),
    density=st.floats(0.0, 1.0),
)
def test_random_layouts(seed, dtype, causal, blocks, sq, extra_k, hkv, group, head_dim, density):
    gen = torch.Generator().manual_seed(seed)
    sk = max(1, sq + extra_k)
    b = 1 + seed % 2
    q = rand(gen, b, hkv * group, sq, head_dim, dtype=dtype)
    k = rand(gen, b, hkv, sk, head_dim, dtype=dtype)
    v = rand(gen, b, hkv, sk, head_dim, dtype=dtype)
    layout = random_layout(gen, b, hkv * group, sq, sk, *blocks, density, beyond_diagonal=not causal)
    assert_close(q, k, v, layout, causal=causal)


@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_large_blocks_gqa(block, head_dim):
    gen = torch.Generator().manual_seed(block + head_dim)
    sq = sk = 2 * block + 37  # a partial last block
    q = rand(gen, 1, 4, sq, head_dim, dtype=torch.float16)
    k = rand(gen, 1, 2, sk, head_dim, dtype=torch.float16)
    v = rand(gen, 1, 2, sk, head_dim, dtype=torch.float16)
    assert_close(q, k, v, random_layout(gen, 1, 4, sq, sk, block, block, 0.5))


def test_blocks_listed_past_the_diagonal_are_skipped():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (rand(gen, 1, 2, 90, 32, dtype=torch.float32) for _ in range(3))
    full = BlockLayout.from_block_mask(torch.ones(1, 2, 6, 6, dtype=torch.bool, device=DEV), 16, 16, 90, 90)
    assert_close(q, k, v, full, causal=True)


def test_rows_without_keys_are_zero_with_lse_minus_inf():
    gen = torch.Generator().manual_seed(2)
    sq, sk = 70, 30  # bottom-right causal: the first 40 rows see no key
    q = rand(gen, 1, 2, sq, 16, dtype=torch.float16)
    k, v = (rand(gen, 1, 1, sk, 16, dtype=torch.float16) for _ in range(2))
    mask = torch.ones(1, 2, 5, 2, dtype=torch.bool, device=DEV)
    mask[0, 1, 4] = False  # and one query block lists nothing
    layout = BlockLayout.from_block_mask(mask, 16, 16, sq, sk)
    out, lse = block_sparse_attention(q, k, v, layout, return_lse=True)
    assert (out[:, :, :40] == 0).all() and (lse[:, :, :40] == float("-inf")).all()
    assert (out[0, 1, 64:] == 0).all() and (lse[0, 1, 64:] == float("-inf")).all()
    assert_close(q, k, v, layout)


def count_launches_of_both(monkeypatch):
    """(plan launches, attention launches), every launch through the JIT: remembered fast launches are off."""
    monkeypatch.setattr(bs_kernel, "_fast", LaunchCache(0))
    grids = count_launches(monkeypatch, bs_kernel, "_plan_kernel", "_attn_kernel")
    return grids["_plan_kernel"], grids["_attn_kernel"]


@pytest.mark.parametrize("causal", [True, False])
def test_plan_is_reused_across_calls_with_one_launch_fewer(monkeypatch, causal):
    """A plan made once serves every call with its layout and shapes: one launch per call instead of two, the
    same output as a call that plans for itself, on fresh inputs too; nothing is ever stored on the layout."""
    gen = torch.Generator().manual_seed(11)
    sq = 100
    q, k, v = qkv(gen, 1, 2, 1, sq, d=32, dtype=torch.float16)
    layout = random_layout(gen, 1, 2, sq, sq, 16, 16, 0.4, beyond_diagonal=True)
    before = dict(layout.__dict__)
    plans, attns = count_launches_of_both(monkeypatch)
    own = assert_close(q, k, v, layout, causal=causal)[0]  # no plan: planned in the call
    assert (len(plans), len(attns)) == (1, 1)
    p = bs.plan(q, k, v, layout, causal=causal)
    assert isinstance(p, bs_kernel.Plan) and p.layout is layout
    assert (len(plans), len(attns)) == (2, 1)
    with_plan = assert_close(q, k, v, layout, causal=causal, plan=p)[0]
    assert torch.equal(with_plan, own)
    for _ in range(2):  # fresh inputs of the same shapes: the same plan
        q2, k2, v2 = qkv(gen, 1, 2, 1, sq, d=32, dtype=torch.float16)
        assert_close(q2, k2, v2, layout, causal=causal, plan=p)
    assert (len(plans), len(attns)) == (2, 4)
    assert ops.plan(q, k, v, layout, causal=causal).bounds.tolist() == p.bounds.tolist()  # the family entry
    assert torch.equal(ops.attention(q, k, v, layout, causal=causal, plan=p), own)
    assert layout.__dict__.keys() == before.keys()
    assert all(layout.__dict__[key] is value for key, value in before.items())


def test_a_call_without_a_plan_sees_in_place_edits_of_the_layout():
    """Nothing is cached behind the caller's back: a layout edited in place (its counts cut to one key block
    per query block) and shorter inputs than the layout covers give the reference's result."""
    gen = torch.Generator().manual_seed(12)
    sq = 100
    q, k, v = qkv(gen, 1, 2, 1, sq, d=32, dtype=torch.float16)
    layout = random_layout(gen, 1, 2, sq, sq, 16, 16, 0.4, beyond_diagonal=True)
    assert_close(q, k, v, layout, causal=False)
    keep = layout.counts.clone()
    layout.counts.fill_(1)  # in place: only each block's first listed key block remains
    assert_close(q, k, v, layout, causal=False)
    layout.counts.copy_(keep)
    assert_close(q[:, :, :70], k[:, :, :70], v[:, :, :70], layout)  # other lengths


def test_a_plan_for_another_layout_or_other_shapes_is_refused():
    gen = torch.Generator().manual_seed(13)
    sq = 100
    q, k, v = qkv(gen, 1, 2, 1, sq, d=32, dtype=torch.float16)
    layout = random_layout(gen, 1, 2, sq, sq, 16, 16, 0.4)
    p = bs.plan(q, k, v, layout, causal=True)
    twin = BlockLayout(layout.counts.clone(), layout.indices.clone(), 16, 16, sq, sq)  # same geometry
    with pytest.raises(ValueError, match="plan: made for another layout"):
        block_sparse_attention(q, k, v, twin, plan=p)
    with pytest.raises(ValueError, match="plan: made for"):
        block_sparse_attention(q, k, v, layout, causal=False, plan=p)
    with pytest.raises(ValueError, match="plan: made for"):
        block_sparse_attention(q[:, :, :70], k[:, :, :70], v[:, :, :70], layout, plan=p)
    with pytest.raises(TypeError, match="plan: expected what block_sparse.plan"):
        block_sparse_attention(q, k, v, layout, plan=p.bounds)
    # packed inputs: the plan is bound to its cu_seqlens
    qp, kp, vp, cu_q, cu_k = packed_qkv(gen, [37, 50], [37, 60], 2, 1, 32, dtype=torch.float16)
    packed = random_layout(gen, 2, 2, 50, 60, 16, 16, 0.5)
    pp = bs.plan(qp, kp, vp, packed, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert_close(qp, kp, vp, packed, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, plan=pp)
    with pytest.raises(ValueError, match="plan: made for"):
        block_sparse_attention(qp, kp, vp, packed, cu_seqlens_q=cu_q.clone(), cu_seqlens_k=cu_k, plan=pp)


def test_no_plan_where_the_kernel_does_not_run():
    gen = torch.Generator().manual_seed(14)
    q, k, v = qkv(gen, 1, 2, 2, 40, d=16, dtype=torch.float16)
    assert bs.plan(q, k, v, random_layout(gen, 1, 2, 40, 40, 24, 24, 1.0)) is None  # blocks of 24: the reference


def test_non_contiguous_hf_views():
    gen = torch.Generator().manual_seed(3)
    b, s, hq, hkv, d = 2, 100, 4, 2, 32
    q, k, v = qkv(gen, b, hq, hkv, s, d=d, dtype=torch.float16, hf=True)  # [B, H, S, D] views of [B, S, H, D]
    assert not q.is_contiguous() and not k.is_contiguous()
    out, _ = assert_close(q, k, v, random_layout(gen, b, hq, s, s, 32, 32, 0.6))
    assert out.stride() == q.stride()


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_packed(causal):
    gen = torch.Generator().manual_seed(4 + causal)
    lens_q, lens_k = [37, 0, 64, 5], [37, 9, 80, 1]
    q, k, v, cu_q, cu_k = packed_qkv(gen, lens_q, lens_k, 4, 2, 32, dtype=torch.float16)
    layout = random_layout(gen, 4, 4, max(lens_q), max(lens_k), 16, 16, 0.7, beyond_diagonal=True)
    assert_close(q, k, v, layout, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


@pytest.mark.parametrize("config", [bs_kernel.Config(16, 16, 4, 2), bs_kernel.Config(32, 16, 4, 2)])
def test_tiles_smaller_than_layout_blocks(config, monkeypatch):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (rand(gen, 1, 2, 120, 32, dtype=torch.float16) for _ in range(3))
    monkeypatch.setattr(bs_kernel, "default_config", lambda *a: config)
    assert_close(q, k, v, random_layout(gen, 1, 2, 120, 120, 64, 64, 0.6))


def test_default_config_table():
    bf16 = torch.bfloat16
    two_per_sm = bs_kernel.default_config(128, bf16, 128, 128, 8, 8192)
    assert (two_per_sm.block_m, two_per_sm.block_n, two_per_sm.num_stages, two_per_sm.maxnreg) == (128, 64, 2, 128)
    long_sparse = bs_kernel.default_config(128, bf16, 128, 128, 130, 131072)  # 128K at ~10 %: 128x128
    assert (long_sparse.block_m, long_sparse.block_n, long_sparse.maxnreg) == (128, 128, 0)
    for cfg in (two_per_sm, long_sparse, bs_kernel.default_config(64, torch.float16, 64, 64, 3, 200),
                bs_kernel.default_config(128, bf16, 128, 128), bs_kernel.default_config(32, torch.float32, 128, 128)):
        assert 128 % cfg.block_m == 0 and 128 % cfg.block_n == 0


@pytest.mark.parametrize("config", [bs_kernel.Config(128, 64, 8, 2, maxnreg=128)])
def test_two_programs_per_sm_config_on_the_interpreter(config, monkeypatch):
    gen = torch.Generator().manual_seed(16)
    q, k, v = (rand(gen, 1, 2, 300, 32, dtype=torch.float16) for _ in range(3))
    monkeypatch.setattr(bs_kernel, "default_config", lambda *a: config)
    assert_close(q, k, v, random_layout(gen, 1, 2, 300, 300, 128, 128, 0.6))


def test_custom_scale():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (rand(gen, 1, 2, 50, 16, dtype=torch.float32) for _ in range(3))
    layout = random_layout(gen, 1, 2, 50, 50, 16, 16, 0.8)
    out = block_sparse_attention(q, k, v, layout, scale=0.3)
    ref = reference_attention(q, k, v, layout, causal=True, scale=0.3)
    assert torch.allclose(out, ref, atol=1e-5)


# ---------------------------------------------------------------- fallbacks and input errors

def test_fallbacks_name_their_reason():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (rand(gen, 1, 2, 40, 16, dtype=torch.float16) for _ in range(3))
    odd = random_layout(gen, 1, 2, 40, 40, 24, 24, 1.0)
    assert any("block_size_q" in r for r in not_supported_reasons(q, k, v, odd))
    ref = reference_attention(q, k, v, odd, causal=True)
    assert torch.equal(block_sparse_attention(q, k, v, odd), ref)
    wide = rand(gen, 1, 2, 40, 264, dtype=torch.float16)
    assert any("head_dim" in r for r in not_supported_reasons(wide, wide, wide, odd))
    ok = random_layout(gen, 1, 2, 40, 40, 16, 16, 1.0)
    assert not_supported_reasons(q, k, v, ok) == []
    assert any("scale" in r for r in not_supported_reasons(q, k, v, ok, scale=-1.0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only limitation")
def test_bf16_under_the_interpreter_falls_back():
    gen = torch.Generator().manual_seed(8)
    q, k, v = (rand(gen, 1, 2, 40, 16, dtype=torch.bfloat16) for _ in range(3))
    layout = random_layout(gen, 1, 2, 40, 40, 16, 16, 1.0)
    assert any("bfloat16" in r for r in not_supported_reasons(q, k, v, layout))
    assert torch.equal(block_sparse_attention(q, k, v, layout), reference_attention(q, k, v, layout, causal=True))


def test_input_errors():
    gen = torch.Generator().manual_seed(9)
    q, k, v = (rand(gen, 1, 2, 40, 16, dtype=torch.float16) for _ in range(3))
    layout = random_layout(gen, 1, 2, 40, 40, 16, 16, 1.0)
    with pytest.raises(TypeError, match="layout: expected a BlockLayout"):
        block_sparse_attention(q, k, v, layout.to_block_mask())
    with pytest.raises(ValueError, match="layout: expected batch 1 and 4 query heads"):
        block_sparse_attention(rand(gen, 1, 4, 40, 16, dtype=torch.float16), k, v, layout)
    with pytest.raises(ValueError, match="layout: expected seqlen_q >= 50"):
        block_sparse_attention(rand(gen, 1, 2, 50, 16, dtype=torch.float16), k, v, layout)
    with pytest.raises(TypeError, match="k, v: expected the dtype of q"):
        block_sparse_attention(q, k.float(), v, layout)
    with pytest.raises(ValueError, match="k: expected a number of kv heads"):
        block_sparse_attention(rand(gen, 1, 3, 40, 16, dtype=torch.float16), k, v,
                               random_layout(gen, 1, 3, 40, 40, 16, 16, 1.0))
    meta = BlockLayout(layout.counts.to("meta"), layout.indices.to("meta"), 16, 16, 40, 40, validate=False)
    with pytest.raises(ValueError, match="layout: expected its tensors on q's device"):
        block_sparse_attention(q, k, v, meta)


# ---------------------------------------------------------------- GPU, long sequences

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seqlen,block,density", [(1000, 64, 0.3), (8192, 128, 0.1), (16411, 64, 0.05)])
def test_gpu_long(dtype, seqlen, block, density):
    gen = torch.Generator().manual_seed(seqlen)
    q = rand(gen, 1, 8, seqlen, 128, dtype=dtype)
    k, v = (rand(gen, 1, 2, seqlen, 128, dtype=dtype) for _ in range(2))
    assert_close(q, k, v, random_layout(gen, 1, 8, seqlen, seqlen, block, block, density), floor=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 256])
def test_gpu_head_dims(head_dim):
    gen = torch.Generator().manual_seed(head_dim)
    q = rand(gen, 2, 4, 3001, head_dim, dtype=torch.bfloat16)
    k, v = (rand(gen, 2, 2, 3001, head_dim, dtype=torch.bfloat16) for _ in range(2))
    assert_close(q, k, v, random_layout(gen, 2, 4, 3001, 3001, 128, 128, 0.3), floor=1e-3)


@pytest.mark.gpu
def test_gpu_repeated_signature_takes_the_fast_launch(monkeypatch):
    """The second call with a signature launches the remembered kernel without checks or JIT: fresh
    inputs, another layout of the same geometry (its own plan and indices), HF views and lse all still
    match the reference; a q whose base is not 16-byte aligned is another signature (the JIT's own
    specialisation differs) and takes the checked path. An explicit plan rides along on the remembered launch."""
    hits = []
    real = bs_kernel.fast_forward

    def counting(*a, **kw):
        out = real(*a, **kw)
        hits.append(out is not None)
        return out

    monkeypatch.setattr(bs_kernel, "fast_forward", counting)
    gen = torch.Generator().manual_seed(17)
    s = 3000
    width = -(-s // 128)
    for trial in range(3):
        q = rand(gen, 1, 8, s, 128, dtype=torch.bfloat16)
        k, v = (rand(gen, 1, 2, s, 128, dtype=torch.bfloat16) for _ in range(2))
        drawn = random_layout(gen, 1, 8, s, s, 128, 128, 0.3)
        # the same geometry every time (indices padded to every key block): one signature
        indices = torch.nn.functional.pad(drawn.indices, (0, width - drawn.max_blocks), value=-1).contiguous()
        layout = BlockLayout(drawn.counts, indices, 128, 128, s, s)
        assert_close(q, k, v, layout, floor=1e-3)
    assert hits.count(True) >= 2, hits
    views = [rand(gen, 1, s, h, 128, dtype=torch.bfloat16).transpose(1, 2) for h in (8, 2, 2)]
    for _ in range(2):
        assert_close(*views, layout, floor=1e-3)
    p = bs.plan(*views, layout)  # a remembered launch takes an explicit plan too (then no plan kernel runs)
    hits.clear()
    for _ in range(2):
        assert_close(*views, layout, floor=1e-3, plan=p)
    assert hits == [True, True]
    hits.clear()
    shifted = rand(gen, 8 * s * 128 + 8, dtype=torch.bfloat16)[1 : 1 + 8 * s * 128].view(1, 8, s, 128)
    assert shifted.data_ptr() % 16
    assert_close(shifted, k, v, layout, floor=1e-3)
    assert hits == [False]


@pytest.mark.gpu
def test_gpu_fp32_and_varlen():
    gen = torch.Generator().manual_seed(11)
    lens = [1500, 7, 4000]
    q, k, v, cu, _ = packed_qkv(gen, lens, lens, 8, 4, 128, dtype=torch.float32)
    assert_close(q, k, v, random_layout(gen, 3, 8, 4000, 4000, 64, 64, 0.4), cu_seqlens_q=cu, cu_seqlens_k=cu)


def test_tma_descriptors_only_where_they_can_run():
    gen = torch.Generator().manual_seed(13)
    k = rand(gen, 1, 2, 100, 64, dtype=torch.float16)
    assert tma_descriptors(k, k, 64, packed=True) == (None, None)
    if not k.is_cuda:
        assert tma_descriptors(k, k, 64, packed=False) == (None, None)
    odd = rand(gen, 1, 2, 100, 72, dtype=torch.float16)  # head dim not a power of two
    assert tma_descriptors(odd, odd, 64, packed=False) == (None, None)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [bs_kernel.Config(128, 128, 8, 3, tma=True), bs_kernel.Config(128, 128, 8, 3),
                                 bs_kernel.Config(128, 64, 8, 2, tma=True, maxnreg=128)])
def test_gpu_tma_and_pointer_loads_on_hf_views(cfg, monkeypatch):
    """Both K/V load paths on strided [B, H, S, D] views of [B, S, H, D] tensors, odd lengths."""
    gen = torch.Generator().manual_seed(14)
    b, s, hq, hkv, d = 2, 2077, 8, 2, 128
    q, k, v = qkv(gen, b, hq, hkv, s, d=d, dtype=torch.bfloat16, hf=True)
    assert tma_descriptors(k, v, cfg.block_n, packed=False)[0] is not None  # TMA can take these views
    monkeypatch.setattr(bs_kernel, "default_config", lambda *a, **kw: cfg)
    assert_close(q, k, v, random_layout(gen, b, hq, s, s, 128, 128, 0.5), floor=1e-3)


@pytest.mark.gpu
def test_gpu_128k():
    gen = torch.Generator().manual_seed(12)
    s = 131072 - 77
    q = rand(gen, 1, 2, s, 128, dtype=torch.bfloat16)
    k, v = (rand(gen, 1, 1, s, 128, dtype=torch.bfloat16) for _ in range(2))
    assert_close(q, k, v, random_layout(gen, 1, 2, s, s, 128, 128, 0.1), floor=1e-3)
