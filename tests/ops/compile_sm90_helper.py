"""Compile every Triton kernel of the package for Hopper (sm_90) on a machine without a GPU.

Run by tests/test_compile_sm90.py in a subprocess (the test session itself runs kernels through the
Triton interpreter, which never compiles them). The Triton interpreter does not type-check: a variable
given different types in two branches of a runtime `if`, a layout the Hopper backend rejects, or a
pipeliner assertion pass on the CPU and fail only on the GPU. Here each kernel goes through its real
Python entry point on CPU tensors, so the JIT sees the same argument specialisations it sees on a GPU, and
is compiled for sm_90 down to a cubin (Triton ships ptxas). Nothing is launched: a stand-in driver
reports an sm_90 device and the compiled kernels' launch does nothing, and `torch.empty` gives zeros so
sizes read back from "device" buffers stay small.

Prints one JSON line per compiled kernel: name, warps, stages, shared memory bytes, maxnreg. Exit code 3
means this Triton's internals differ from the ones this stand-in was written against (3.6): the caller skips.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

try:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import compiler as triton_compiler
    from triton.runtime.driver import driver
except Exception as e:  # noqa: BLE001
    print(f"setup: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(3)


class _Sm90Driver:
    """Just enough of a Triton driver for the JIT to compile for sm_90."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


compiled = []


def _install() -> None:
    def no_handles(self):
        if not getattr(self, "_sm90_recorded", False):
            self._sm90_recorded = True
            compiled.append(self)

    if not hasattr(triton_compiler.CompiledKernel, "_init_handles"):
        raise AttributeError("CompiledKernel._init_handles")
    triton_compiler.CompiledKernel._init_handles = no_handles
    triton_compiler.CompiledKernel.run = property(lambda self: (self._init_handles(), lambda *a, **k: None)[1])
    driver.set_active(_Sm90Driver())
    # With a JIT hook set, Triton serialises every compile's constants as JSON before calling it; vLLM sets
    # one, so a kernel whose constexprs do not serialise (a layout object) fails to compile under vLLM alone.
    triton.knobs.runtime.jit_cache_hook = lambda *args, **kwargs: False
    torch.empty = lambda *a, **k: torch.zeros(*a, **k)  # sizes read back from kernel outputs stay 0


def _cpu_tma_descriptors(k, v, block_n, packed):
    """The kernels' tma_descriptors for CPU tensors (the real one refuses them)."""
    from sparse_attn._triton import tensor_descriptor

    return tensor_descriptor(k, block_n), tensor_descriptor(v, block_n)


def _run_all() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the shared helpers
    from helpers import random_layout

    import sparse_attn.ops.vertical_slash as vs_public
    from sparse_attn.estimators.vertical_slash import build_vertical_slash_index, vertical_slash_scores
    from sparse_attn.estimators.vertical_slash import index as vs_index
    from sparse_attn.estimators.vertical_slash.topk_triton import topk_ids_sorted
    from sparse_attn.layouts import BlockLayout
    from sparse_attn.ops.block_sparse import kernel as bs_kernel
    from sparse_attn.ops.vertical_slash import kernel as vs_kernel

    gen = torch.Generator().manual_seed(0)
    s, h, hkv = 1000, 4, 2

    def qkv(d, dtype, packed=False):
        shape_q, shape_kv = ((s, h, d), (s, hkv, d)) if packed else ((1, h, s, d), (1, hkv, s, d))
        return (torch.randn(shape_q, generator=gen).to(dtype),
                torch.randn(shape_kv, generator=gen).to(dtype), torch.randn(shape_kv, generator=gen).to(dtype))

    # block-sparse: the default configs (two programs per SM, 128x128), TMA and pointer loads, fp32, packed
    layout = random_layout(BlockLayout, gen, 1, h, s, s, 128, causal=False, diagonal=False, device="cpu")
    cu = torch.tensor([0, 400, s], dtype=torch.int32)
    layout2 = random_layout(BlockLayout, gen, 2, h, s, s, 128, causal=False, diagonal=False, device="cpu")

    # kernels import tma_descriptors into their own namespace: that is the name to replace
    real_descriptors = bs_kernel.tma_descriptors
    runs = [(128, torch.bfloat16, None, True), (128, torch.bfloat16, None, False),
            (128, torch.bfloat16, bs_kernel.Config(128, 128, 8, 3, tma=True), True),
            (64, torch.float16, None, True), (128, torch.float32, None, False)]
    for d, dtype, cfg, tma in runs:
        q, k, v = qkv(d, dtype)
        bs_kernel.tma_descriptors = _cpu_tma_descriptors if tma else real_descriptors
        bs_kernel.forward(q, k, v, layout, causal=True, scale=0.1, packed=False, batch=1,
                          max_seqlen_q=s, return_lse=True, config=cfg)
    bs_kernel.tma_descriptors = real_descriptors
    _check_fast_launch(bs_kernel, layout, qkv)
    q, k, v = qkv(128, torch.bfloat16, packed=True)
    bs_kernel.forward(q, k, v, layout2, causal=True, scale=0.1, packed=True, batch=2, max_seqlen_q=600,
                      cu_seqlens_q=cu, cu_seqlens_k=cu)

    # vertical-slash: estimator (Triton scores, fused top-k), index builder (Triton), attention (bf16, fp32, packed)
    q, k, v = qkv(128, torch.bfloat16)
    v_scores, s_scores = vertical_slash_scores(q, k, last_q=64, scale=0.1, causal=True, backend="triton")
    for budgets in ((30, 20), (torch.tensor([30, 5, 30, 9]), torch.tensor([20, 20, 3, 20]))):  # uniform, per head
        topk_ids_sorted((v_scores, s_scores), [torch.as_tensor(x).expand(h) for x in budgets], (8, 8), 64.0)
    vertical = torch.randint(0, s, (1, h, 30), generator=gen)
    slash = torch.randint(0, s, (1, h, 20), generator=gen)
    build_vertical_slash_index(vertical, slash, s, s, 64, backend="triton")
    vs_index._prepare_triton(vertical, slash, s, s, 64)  # CPU tensors: the builder itself takes torch's
    vs_layout = build_vertical_slash_index(vertical, slash, s, s, 64, backend="torch")
    vs_public.not_supported_reasons = lambda *a, **kw: []
    # one and two heads per program (two: a shared index), K/V through TMA (16-bit) and through pointers
    pairs = build_vertical_slash_index(vertical[:, ::2], slash[:, ::2], s, s, 64, backend="torch").repeat_heads(2)
    real_vs_descriptors = vs_kernel.tma_descriptors
    for dtype, lay, tma in ((torch.bfloat16, vs_layout, True), (torch.float32, vs_layout, False),
                            (torch.bfloat16, pairs, True), (torch.bfloat16, pairs, False)):
        q, k, v = qkv(128, dtype)
        vs_kernel.tma_descriptors = _cpu_tma_descriptors if tma else real_vs_descriptors
        vs_public.vertical_slash_attention(q, k, v, lay, return_lse=lay is vs_layout)
    vs_kernel.tma_descriptors = real_vs_descriptors
    vs_kernel._group_order(vs_layout, 2)  # the shared-first range order of long inputs (h / hkv = 2 here)
    q, k, v = qkv(128, torch.bfloat16, packed=True)
    vs2 = build_vertical_slash_index(vertical.expand(2, h, 30), slash.expand(2, h, 20), s, s, 64, backend="torch")
    vs_public.vertical_slash_attention(q, k, v, vs2, cu_seqlens_q=cu, cu_seqlens_k=cu)

    # flexprefill's Triton path end to end (pooling, decision, fused query-aware selection, vertical-slash
    # selection and write), bf16 on tensor cores and fp32 exact
    from sparse_attn.estimators.flexprefill import flexprefill_choice
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = qkv(128, dtype)
        flexprefill_choice(q, k, 0.9, 0.1, block_size=64, backend="triton")

    # xattention's fused antidiagonal scoring (bf16, strides 8 and 16)
    from sparse_attn.estimators.xattention import antidiagonal_block_scores
    q, k, v = qkv(128, torch.bfloat16)
    for stride in (8, 16):
        antidiagonal_block_scores(q, k, block_size=64, stride=stride, backend="triton")

    # the hierarchical search: prefill (key block summaries, the grouped search; bf16 key summaries as on
    # the GPU, top_k 32 and per-head 16 / 64), decode (64-token pages, top_k 62)
    from sparse_attn.estimators import hierarchical as hier
    from sparse_attn.kvcache import PagedKVCache, PageSummaries
    real_summaries = hier.key_summaries
    hier.key_summaries = lambda x, bs, dtype: real_summaries(x, bs, x.dtype)  # k's dtype, as on the GPU
    try:
        q = torch.randn(1, h, 4096, 128, generator=gen).to(torch.bfloat16)
        k = torch.randn(1, hkv, 4096, 128, generator=gen).to(torch.bfloat16)
        for top_k in (32, [16, 64, 16, 64]):
            hier.hierarchical_layout(q, k, top_k, block_size=64, use_triton=True)
        # no GQA: one head a program, 16-element key chunks at top_k 64 and 128 (the last level's re-sort once
        # broke Triton's layout pass at a shape of this kind)
        q1 = torch.randn(1, hkv, 4096, 128, generator=gen).to(torch.bfloat16)
        for top_k in (64, 128):
            hier.hierarchical_layout(q1, k, top_k, block_size=64, use_triton=True)
    finally:
        hier.key_summaries = real_summaries
    pages = torch.randn(40, 64, hkv, 128, generator=gen).to(torch.bfloat16)
    cache = PagedKVCache(pages, pages, torch.arange(40, dtype=torch.int32).view(2, 20),
                         torch.tensor([1270, 900], dtype=torch.int32), 64)
    hier.hierarchical_pages(torch.randn(2, h, 128, generator=gen).to(torch.bfloat16), cache,
                            PageSummaries.build(cache), top_k=62, use_triton=True)

    # paged decode: split-K attention and its combine (fp16, D=128, a selection), the page summaries, the
    # decode-density count (the module takes CPU tensors only under the interpreter: bypassed here)
    from sparse_attn.layouts import PageSelection
    from sparse_attn.ops import paged_decode as pd
    real_interpreted = pd._interpreted
    pd._interpreted = lambda: True
    try:
        summaries = PageSummaries.build(cache)
        selection = PageSelection(torch.arange(8, dtype=torch.int32).view(1, 1, 8).expand(2, hkv, 8).contiguous(),
                                  torch.full((2, hkv), 8, dtype=torch.int32), 64)
        # fp16: the module refuses bf16 off the GPU (the interpreter's bf16 dot)
        cache16 = PagedKVCache(pages.half(), pages.half(), cache.page_table, cache.seqlens, 64)
        pd.paged_decode_attention(torch.randn(2, h, 128, generator=gen).half(), cache16, selection)
        summaries.update(cache, torch.tensor([3, 5], dtype=torch.int32), 1)
        pd.head_density(selection, cache.seqlens, h)
    finally:
        pd._interpreted = real_interpreted

    # the experimental Gluon Hopper kernels (SPARSE_ATTN_VS_BACKEND=gluon): warp-specialised with a TMA loader
    # (bf16 D=128 with lse, fp16 D=64, bf16 packed) and every tile through cp.async (bf16 D=128);
    # hopper.supported refuses CPU tensors, so it is bypassed here
    from sparse_attn.ops.vertical_slash import hopper
    if hopper.AVAILABLE:
        real_supported = hopper.supported
        hopper.supported = lambda *a, **kw: True
        os.environ["SPARSE_ATTN_VS_BACKEND"] = "gluon"
        try:
            for d, dtype in ((128, torch.bfloat16), (64, torch.float16)):
                q, k, v = qkv(d, dtype)
                vs_public.vertical_slash_attention(q, k, v, vs_layout, return_lse=d == 128)
            q, k, v = qkv(128, torch.bfloat16, packed=True)
            vs_public.vertical_slash_attention(q, k, v, vs2, cu_seqlens_q=cu, cu_seqlens_k=cu)
            real_forward = hopper.forward
            hopper.forward = lambda *a, **kw: real_forward(*a, loads="cp.async", **kw)
            try:
                q, k, v = qkv(128, torch.bfloat16)
                vs_public.vertical_slash_attention(q, k, v, vs_layout)
            finally:
                hopper.forward = real_forward
        finally:
            hopper.supported = real_supported
            del os.environ["SPARSE_ATTN_VS_BACKEND"]


def _same(a, b) -> bool:
    """One launch argument of the JIT path (a) and of the fast path (b) agree."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.shape == b.shape and a.stride() == b.stride()
                and a.dtype == b.dtype and a.data_ptr() % 16 == b.data_ptr() % 16)
    if hasattr(a, "block_shape"):  # a TMA descriptor
        return (a.base is b.base and list(a.shape) == list(b.shape) and list(a.strides) == list(b.strides)
                and list(a.block_shape) == list(b.block_shape) and a.padding == b.padding)
    return type(a) is type(b) and a == b


def _check_fast_launch(bs_kernel, layout, qkv) -> None:
    """Public calls with one signature: the first through the JIT, the others through bs_kernel.fast_forward
    (three, each with a new layout of the same geometry: the remembered plan kernel runs too; then a plan made
    once and two calls with it: the remembered attention launch alone); record what reaches the launcher and
    compare argument by argument."""
    import sparse_attn.ops.block_sparse as bs_public

    launches = []
    real_run = triton_compiler.CompiledKernel.run
    real_reasons, real_descriptors = bs_public.not_supported_reasons, bs_kernel.tma_descriptors
    real_fast = bs_kernel.fast_forward
    hits = []

    def fast(*a, **kw):
        out = real_fast(*a, **kw)
        hits.append(out is not None)
        return out

    def recorder(self):
        self._init_handles()
        return lambda *a, **kw: launches.append((self.name, a))

    triton_compiler.CompiledKernel.run = property(recorder)
    bs_public.not_supported_reasons = lambda *a, **kw: []
    bs_kernel.tma_descriptors = _cpu_tma_descriptors
    bs_kernel.fast_forward = fast
    try:
        q, k, v = qkv(128, torch.bfloat16)
        for _ in range(3):  # a new layout of the same geometry each time: the plan kernel runs too
            fresh = type(layout)(layout.counts.clone(), layout.indices.clone(), layout.block_size_q,
                                 layout.block_size_k, layout.seqlen_q, layout.seqlen_k)
            bs_public.block_sparse_attention(q, k, v, fresh, causal=True)
        plan = bs_public.plan(q, k, v, fresh, causal=True)  # the plan kernel through the JIT
        for _ in range(2):
            bs_public.block_sparse_attention(q, k, v, fresh, causal=True, plan=plan)
    finally:
        triton_compiler.CompiledKernel.run = real_run
        bs_public.not_supported_reasons, bs_kernel.tma_descriptors = real_reasons, real_descriptors
        bs_kernel.fast_forward = real_fast
    mismatches, compared = [], 0
    names = [name for name, _ in launches]
    if names != ["_plan_kernel", "_attn_kernel"] * 3 + ["_plan_kernel", "_attn_kernel", "_attn_kernel"]:
        mismatches.append(f"launches {names}")
    for kernel in ("_plan_kernel", "_attn_kernel"):
        jit, *rest = [args for name, args in launches if name == kernel]
        for args in rest:
            if len(args) != len(jit):
                mismatches.append(f"{kernel}: {len(args)} arguments, the JIT passed {len(jit)}")
                continue
            for i, (a, b) in enumerate(zip(jit, args)):
                if i in (4, 5, 6):  # function handle, packed metadata, launch metadata: the kernel's own
                    continue
                compared += 1
                if not _same(a, b):
                    mismatches.append(f"{kernel} argument {i}: {type(a).__name__} vs {type(b).__name__}")
    print(json.dumps({"fast_path": {"jit_launches": hits.count(False), "fast_launches": hits.count(True),
                                    "compared": compared, "mismatches": mismatches}}))


def _constexprs(ck) -> dict:
    """The kernel's int, bool and str compile-time arguments by name (head dim, tile sizes, flags)."""
    src = getattr(ck, "src", None)
    out = {}
    if src is None or not hasattr(src, "constants"):
        return out
    names = src.fn.arg_names
    for key, val in src.constants.items():
        idx = key[0] if isinstance(key, tuple) else key
        if isinstance(idx, int) and isinstance(val, (bool, int, str)):
            out[names[idx]] = val
    return out


def _chunk_lengths() -> list:
    """The prefill kernels a serving engine runs on chunks of every length (minference's vertical-slash
    estimate, index and attention; the block-sparse plan and attention), called at several (queries, keys)
    lengths of one size class, bottom-right causal: the kernels compiled by each call after the first."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from helpers import random_layout

    import sparse_attn.ops.vertical_slash as vs_public
    from sparse_attn.estimators.vertical_slash import build_vertical_slash_index, vertical_slash_scores
    from sparse_attn.estimators.vertical_slash.topk_triton import topk_ids_sorted
    from sparse_attn.layouts import BlockLayout
    from sparse_attn.ops.block_sparse import kernel as bs_kernel
    from sparse_attn.ops.vertical_slash import kernel as vs_kernel

    bs_kernel.tma_descriptors = vs_kernel.tma_descriptors = _cpu_tma_descriptors
    vs_public.not_supported_reasons = lambda *a, **kw: []
    gen = torch.Generator().manual_seed(1)
    h, hkv, rows = 4, 2, []
    compiled.clear()
    for sq, sk in ((1024, 1024), (1022, 1022), (1000, 1024), (1017, 1023), (520, 1001)):
        q = torch.randn(1, h, sq, 64, generator=gen).to(torch.bfloat16)  # D=64 bf16: not compiled before
        k, v = (torch.randn(1, hkv, sk, 64, generator=gen).to(torch.bfloat16) for _ in range(2))
        scores = vertical_slash_scores(q, k, last_q=64, scale=0.1, causal=True, backend="triton")
        topk_ids_sorted(scores, [torch.full((h,), 30), torch.full((h,), 20)], (8, 8), 64.0)
        vertical = torch.randint(0, sk, (1, h, 30), generator=gen)
        slash = torch.randint(0, sk, (1, h, 20), generator=gen)
        build_vertical_slash_index(vertical, slash, sq, sk, 64, backend="triton")
        vs_public.vertical_slash_attention(q, k, v, build_vertical_slash_index(vertical, slash, sq, sk, 64,
                                                                              backend="torch"))
        layout = random_layout(BlockLayout, gen, 1, h, sq, sk, 128, causal=False, diagonal=False, device="cpu")
        bs_kernel.forward(q, k, v, layout, causal=True, scale=0.1, packed=False, batch=1, max_seqlen_q=sq)
        rows.append({"sq": sq, "sk": sk, "compiled": sorted(ck.name for ck in compiled)})
        compiled.clear()
    return rows


def main() -> int:
    try:
        _install()
    except Exception as e:  # noqa: BLE001
        print(f"setup: {type(e).__name__}: {e}", file=sys.stderr)
        return 3
    _run_all()
    for ck in compiled:
        md = ck.metadata
        print(json.dumps({"name": ck.name, "num_warps": md.num_warps, "num_stages": md.num_stages,
                          "shared": md.shared, "maxnreg": getattr(md, "maxnreg", None),
                          "constexprs": _constexprs(ck)}))
    print(json.dumps({"chunk_compiles": _chunk_lengths()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
