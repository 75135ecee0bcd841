"""The vLLM backend through vLLM's own objects (vllm==0.26.0 installed with --no-deps is enough): the plugin
entry point, the KV-cache shape and strides, the configuration checks, and the builder + forward through
vLLM's real `Attention` layer on mixed batches (fresh prefills, chunked extends, a prefix-cache hit, decodes)
over shuffled pages, against fp32 references.

Skips without vLLM, unless SPARSE_ATTN_REQUIRE_VLLM=1 (`make test` sets it: CI must run these)."""
import json
import os

import pytest
import torch

if os.environ.get("SPARSE_ATTN_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install --no-deps vllm==0.26.0)")

from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.forward_context import set_forward_context  # noqa: E402
from vllm.model_executor.layers.attention import Attention  # noqa: E402
from vllm.platforms.interface import DeviceCapability  # noqa: E402
from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402
from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402

from helpers import assert_close  # noqa: E402
from sparse_attn import sparse_attention  # noqa: E402
from sparse_attn.integrations.config import ENV_VAR  # noqa: E402
from sparse_attn.integrations.vllm import BACKEND_PATH, enable_stats, disable_stats, register  # noqa: E402
from sparse_attn.integrations.vllm.backend import (SparseAttentionBackend, SparseAttentionImpl,  # noqa: E402
                                                   SparseAttentionMetadataBuilder, dense_below)
from sparse_attn.kvcache import PagedKVCache, PageSummaries  # noqa: E402
from sparse_attn.ops.paged_decode import reference_decode  # noqa: E402
from sparse_attn.patterns import get_pattern  # noqa: E402

B = SparseAttentionBackend


def test_entry_point_registers_the_backend():
    """vLLM's own plugin loader finds sparse_attn's `vllm.general_plugins` entry point; calling it makes
    CUSTOM resolve to the backend."""
    from vllm.plugins import load_plugins_by_group

    plugins = load_plugins_by_group("vllm.general_plugins")
    assert "sparse_attn" in plugins, "the entry point is missing: is sparse_attn installed (pip install -e .)?"
    try:
        plugins["sparse_attn"]()
        assert AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH
        assert AttentionBackendEnum.CUSTOM.get_class() is B
    finally:
        AttentionBackendEnum.CUSTOM.clear_override()


def test_register_over_a_builtin(monkeypatch):
    monkeypatch.setenv("SPARSE_ATTN_VLLM_BACKEND", "CPU_ATTN")
    try:
        register()
        assert AttentionBackendEnum.CPU_ATTN.get_class() is B
    finally:
        AttentionBackendEnum.CPU_ATTN.clear_override()
    with pytest.raises(ValueError, match="AttentionBackendEnum name"):
        register("NO_SUCH_BACKEND")


def allocate_cache(num_blocks, block_size, hkv, d, dtype=torch.float32, gen=None):
    """The KV cache as vLLM's model runner allocates it: physical order from get_kv_cache_stride_order,
    handed to the backend permuted back to the logical shape."""
    shape = B.get_kv_cache_shape(num_blocks, block_size, hkv, d)
    order = B.get_kv_cache_stride_order()
    phys = torch.randn([shape[i] for i in order], generator=gen).to(dtype)  # garbage in unwritten slots
    return phys.permute(*[order.index(i) for i in range(len(order))])


def test_kv_cache_shape_and_stride_order():
    nb, bs, hkv, d = 9, 16, 2, 64
    assert B.get_kv_cache_shape(nb, bs, hkv, d) == (nb, hkv, bs, 2 * d)
    assert B.get_kv_cache_stride_order() == (0, 2, 1, 3)
    assert B.get_kv_cache_stride_order(include_num_layers_dimension=True) == (1, 0, 3, 2, 4)
    assert B.get_kv_cache_block_dim(bs, hkv, d) == 0 and B.indexes_kv_by_block_stride()
    assert B.get_supported_kernel_block_sizes() == [64, 32, 16] and B.get_preferred_block_size(16) == 64
    kv = allocate_cache(nb, bs, hkv, d)
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        impl = SparseAttentionImpl(4, d, d ** -0.5, hkv)
    k_cache, v_cache = impl.split_cache(kv)
    # blocks outermost, then tokens, then heads; K and V interleaved per (token, head): read in place
    assert k_cache.shape == (nb, bs, hkv, d) and k_cache.stride() == (bs * hkv * 2 * d, hkv * 2 * d, 2 * d, 1)
    assert v_cache.data_ptr() == k_cache.data_ptr() + d * k_cache.element_size()
    # tokens written at shuffled slots come back through a PagedKVCache view of the same memory
    gen = torch.Generator().manual_seed(0)
    n = 40
    table = (torch.randperm(nb - 1, generator=gen)[:3] + 1).to(torch.int32).view(1, 3)
    slots = torch.tensor([int(table[0, t // bs]) * bs + t % bs for t in range(n)] + [-1, -1])
    key = torch.randn(n + 2, hkv, d, generator=gen)
    value = torch.randn(n + 2, hkv, d, generator=gen)
    before = kv.clone()
    impl.do_kv_cache_update(None, key, value, kv, slots)
    cache = PagedKVCache(k_cache, v_cache, table, torch.tensor([n], dtype=torch.int32), bs)
    k, v = cache.gather(0)
    assert torch.equal(k, key[:n].transpose(0, 1)) and torch.equal(v, value[:n].transpose(0, 1))
    untouched = torch.ones(nb, dtype=torch.bool)
    untouched[table[0].long()] = False
    assert torch.equal(kv[untouched], before[untouched])  # slot -1 wrote nothing
    with pytest.raises(ValueError, match="block_size 24"):
        B.get_kv_cache_shape(nb, 24, hkv, d)


def _validate(head_size=64, dtype=torch.float16, kv_cache_dtype="auto", block_size=64, **kw):
    args = dict(use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
                use_per_head_quant_scales=False, device_capability=DeviceCapability(9, 0), attn_type="decoder")
    args.update(kw)
    return B.validate_configuration(head_size, dtype, kv_cache_dtype, block_size, **args)


def test_configuration_reasons():
    assert _validate() == [] and _validate(head_size=128, dtype=torch.bfloat16, block_size=16) == []
    assert _validate(block_size=128) == []  # vLLM splits 128-token blocks into 64-token kernel blocks
    assert _validate(head_size=96) == ["head_size 96: sparse_attn's kernels take [64, 128]"]
    assert _validate(block_size=24)[0].startswith("block_size 24: the paged kernels read pages of [16, 32, 64]")
    assert _validate(dtype=torch.float64)[0].startswith("dtype torch.float64")
    assert _validate(kv_cache_dtype="fp8")[0].startswith("kv_cache_dtype 'fp8': quantized caches")
    assert "attention sinks not supported" in _validate(has_sink=True)
    assert any("attention type" in r for r in _validate(attn_type="encoder_only"))
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        with pytest.raises(NotImplementedError, match="sliding_window, logits_soft_cap not supported"):
            SparseAttentionImpl(4, 64, 0.125, 2, sliding_window=128, logits_soft_cap=30.0)
        with pytest.raises(ValueError, match="head_size 80"):
            SparseAttentionImpl(4, 80, 0.125, 2)


# ------------------------------------------------------------------------------------- mixed batches


class Engine:
    """A minimal stand-in for vLLM's scheduler around one real `Attention` layer: requests with shuffled
    block tables (a prefix hit shares another request's blocks), steps of (request, new tokens) in vLLM's
    order (decodes first), CommonAttentionMetadata built as the model runner builds it, random q / k / v per
    step; keeps every request's full K / V for the references."""

    def __init__(self, hq=4, hkv=2, d=64, block_size=16, num_blocks=48, layer=0, seed=0):
        self.hq, self.hkv, self.d, self.bs = hq, hkv, d, block_size
        self.gen = torch.Generator().manual_seed(seed)
        self.cfg = VllmConfig(device_config=DeviceConfig(device="cpu"))
        self.name = f"model.layers.{layer}.self_attn.attn"
        with set_current_vllm_config(self.cfg):
            self.layer = Attention(hq, d, d ** -0.5, hkv, prefix=self.name, attn_backend=B)
            spec = FullAttentionSpec(block_size=block_size, num_kv_heads=hkv, head_size=d, dtype=torch.float32)
            self.builder = SparseAttentionMetadataBuilder(spec, [self.name], self.cfg, torch.device("cpu"))
        self.layer.kv_cache = allocate_cache(num_blocks, block_size, hkv, d, gen=self.gen)
        self.free = (torch.randperm(num_blocks - 1, generator=self.gen) + 1).tolist()  # block 0: vLLM's null block
        self.tables, self.k, self.v = {}, {}, {}

    def add(self, req, blocks, prefix_of=None, shared_blocks=0):
        """A request of up to `blocks` blocks; prefix_of: share that request's first shared_blocks blocks
        (a prefix-cache hit: those tokens are already computed)."""
        table = self.tables[prefix_of][:shared_blocks] if prefix_of else []
        table = table + [self.free.pop() for _ in range(blocks - len(table))]
        self.tables[req] = table
        n = shared_blocks * self.bs
        self.k[req] = self.k[prefix_of][:, :n] if prefix_of else torch.empty(self.hkv, 0, self.d)
        self.v[req] = self.v[prefix_of][:, :n] if prefix_of else torch.empty(self.hkv, 0, self.d)

    def step(self, work, via_layer=True):
        """work: [(request, new tokens)]; returns {request: (q [Hq, n, D], out [Hq, n, D])}."""
        starts, seq_lens, slots, qs, ks, vs = [0], [], [], [], [], []
        for req, n in work:
            done = self.k[req].shape[1]
            table = self.tables[req]
            slots += [table[p // self.bs] * self.bs + p % self.bs for p in range(done, done + n)]
            starts.append(starts[-1] + n)
            seq_lens.append(done + n)
            q = torch.randn(n, self.hq, self.d, generator=self.gen)
            k = torch.randn(n, self.hkv, self.d, generator=self.gen)
            v = torch.randn(n, self.hkv, self.d, generator=self.gen)
            self.k[req] = torch.cat([self.k[req], k.transpose(0, 1)], 1)
            self.v[req] = torch.cat([self.v[req], v.transpose(0, 1)], 1)
            qs.append(q), ks.append(k), vs.append(v)
        width = max(len(self.tables[r]) for r, _ in work)
        table = torch.zeros(len(work), width, dtype=torch.int32)
        for i, (req, _) in enumerate(work):
            table[i, : len(self.tables[req])] = torch.tensor(self.tables[req], dtype=torch.int32)
        qsl = torch.tensor(starts, dtype=torch.int32)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        pad = 3  # padded tokens past num_actual_tokens, slot -1, as under CUDA graphs
        slot_mapping = torch.tensor(slots + [-1] * pad, dtype=torch.int64)
        cm = CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=lens, num_reqs=len(work),
            num_actual_tokens=starts[-1], max_query_len=max(n for _, n in work), max_seq_len=max(seq_lens),
            block_table_tensor=table, slot_mapping=slot_mapping, seq_lens_cpu_upper_bound=lens)
        md = self.builder.build(0, cm)
        q = torch.cat(qs + [torch.randn(pad, self.hq, self.d, generator=self.gen)])
        k = torch.cat(ks + [torch.randn(pad, self.hkv, self.d, generator=self.gen)])
        v = torch.cat(vs + [torch.randn(pad, self.hkv, self.d, generator=self.gen)])
        if via_layer:
            with set_forward_context({self.name: md}, self.cfg, slot_mapping={self.name: slot_mapping}):
                out = self.layer(q.flatten(1), k.flatten(1), v.flatten(1)).view(-1, self.hq, self.d)
        else:  # the impl called directly on a poisoned output: every real row must be written
            impl = self.layer.impl
            impl.do_kv_cache_update(self.layer, k, v, self.layer.kv_cache, slot_mapping)
            out = torch.full_like(q, float("nan"))
            impl.forward(self.layer, q, k, v, self.layer.kv_cache, md, out)
        return {req: (q[a:b].transpose(0, 1), out[a:b].transpose(0, 1))
                for (req, _), a, b in zip(work, starts[:-1], starts[1:])}, md

    def paged_view(self, reqs):
        k_cache, v_cache = self.layer.impl.split_cache(self.layer.kv_cache)
        width = max(len(self.tables[r]) for r in reqs)
        table = torch.zeros(len(reqs), width, dtype=torch.int32)
        for i, r in enumerate(reqs):
            table[i, : len(self.tables[r])] = torch.tensor(self.tables[r], dtype=torch.int32)
        lens = torch.tensor([self.k[r].shape[1] for r in reqs], dtype=torch.int32)
        return PagedKVCache(k_cache, v_cache, table, lens, self.bs)


def _dense_reference(q, k, v):
    """Attention of q [Hq, n, D] over k, v [Hkv, L, D] in float64, bottom-right causal."""
    group = q.shape[0] // k.shape[0]
    k, v = k.double().repeat_interleave(group, 0), v.double().repeat_interleave(group, 0)
    s = q.double() @ k.transpose(1, 2) * q.shape[-1] ** -0.5
    n, length = q.shape[1], k.shape[1]
    mask = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]
    return (torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v).float()


# Steps in vLLM's order (decodes, then extends and prefills): chunked prefill of A, a prefix-cache hit D
# sharing A's first two blocks, decodes crossing page boundaries.
STEPS = [
    [("A", 48), ("B", 40)],
    [("B", 1), ("A", 42), ("C", 30), ("D", 38)],
    [("A", 1), ("B", 1), ("C", 1), ("D", 1)],
    [("A", 1), ("B", 1), ("C", 1), ("D", 1)],
    [("C", 1), ("D", 1), ("B", 60)],
]


def _engine(block_size, **kw):
    e = Engine(block_size=block_size, **kw)
    e.add("A", -(-120 // block_size)), e.add("B", -(-120 // block_size)), e.add("C", -(-120 // block_size))
    return e


def _steps(e, **kw):
    """Runs STEPS; D arrives after A's first chunk, hitting A's first 32 tokens in the prefix cache."""
    for i, work in enumerate(STEPS):
        if i == 1:
            e.add("D", -(-120 // e.bs), prefix_of="A", shared_blocks=32 // e.bs)
        yield work, *e.step(work, **kw)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("via_layer", [True, False])
def test_dense_method_matches_fp32_reference(block_size, via_layer, monkeypatch):
    monkeypatch.setenv(ENV_VAR, json.dumps({"method": "dense"}))
    e = _engine(block_size)
    for work, outs, md in _steps(e, via_layer=via_layer):
        assert md.num_decodes == sum(1 for _, n in work if n == 1)
        for req, (q, out) in outs.items():
            assert not out.isnan().any()
            assert_close(out, _dense_reference(q, e.k[req], e.v[req]))


@pytest.mark.parametrize("method, kwargs", [
    ("a_shape", {"sink": 16, "window": 32, "block_size": 16, "min_seqlen": 48}),
    ("quest", {"budget": 32, "sink": 0, "window": 16, "min_seqlen": 48}),
    ("page_mean", {"budget": 32, "sink": 0, "window": 16, "min_seqlen": 48}),
])
def test_sparse_methods_match_their_references(method, kwargs, monkeypatch):
    """Prefill chunks: sparse_attention on the sequence's contiguous K / V (what the backend gathers from the
    pages), sparse for every chunk of a sequence of min_seqlen tokens or more. Decodes: the fp32 paged reference over the pages the decode pattern selects from summaries
    rebuilt from scratch (the backend's are refreshed incrementally), every page below min_seqlen.
    The stats hook reports densities below 1."""
    monkeypatch.setenv(ENV_VAR, json.dumps({"method": method, "kwargs": kwargs}))
    e = _engine(16, layer=0)
    stats = enable_stats()
    pattern = get_pattern(method)
    budgets = {k: v for k, v in kwargs.items() if k in pattern.budget_names}
    try:
        for work, outs, md in _steps(e):
            decodes = [r for r, n in work if n == 1]
            if decodes:
                cache = e.paged_view(decodes)
                q = torch.stack([outs[r][0][:, 0] for r in decodes])
                summaries = PageSummaries.build(cache) if pattern.summaries else None
                sel = dense_below(pattern.select(q, cache, summaries, scale=e.d ** -0.5, **budgets), cache,
                                  kwargs["min_seqlen"])
                ref = reference_decode(q, cache, sel, scale=e.d ** -0.5)
                for i, r in enumerate(decodes):
                    assert_close(outs[r][1][:, 0], ref[i])
            for req, n in work:
                if n > 1:
                    q, out = outs[req]
                    # the backend's rule: every chunk of a sequence of min_seqlen tokens or more is sparse
                    kw = {**kwargs, "min_seqlen": 0} if e.k[req].shape[1] >= kwargs["min_seqlen"] else kwargs
                    ref = sparse_attention(q[None], e.k[req][None], e.v[req][None], method, **kw)[0]
                    assert_close(out, ref)
        assert stats.decode and stats.density("decode") < 1
        if pattern.prefill:
            assert stats.prefill and stats.density("prefill") < 1
        assert stats.steps == len(STEPS) and "decode density" in stats.line("decode")
    finally:
        disable_stats()


def test_dense_below_reads_every_page_of_short_sequences():
    gen = torch.Generator().manual_seed(3)
    lens = torch.tensor([20, 70, 200, 0], dtype=torch.int32)
    k = torch.randn(16, 16, 2, 64, generator=gen)
    table = torch.randperm(16, generator=gen)[:16].to(torch.int32).view(4, 4).repeat(1, 4)[:, :13]
    cache = PagedKVCache(k, k, table, lens, 16, validate=False)
    sel = get_pattern("a_shape").select(None, cache, None, sink=16, window=16)
    merged = dense_below(sel, cache, 100)
    assert merged.counts[:, 0].tolist() == [2, 5, int(sel.counts[2, 0]), 0]
    assert merged.pages[1, 0, :5].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(merged.pages[2, :, : sel.width], sel.pages[2])


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["dense", "quest"])
def test_gpu_decode_step_replays_from_a_cuda_graph(method, monkeypatch):
    """A decode-only step (KV write, summaries, selection, paged kernel) captured once in a CUDA graph, replayed
    on later steps with vLLM's persistent buffers updated in place, equals the eager step (bf16)."""
    monkeypatch.setenv(ENV_VAR, json.dumps({"method": method, "kwargs": {"budget": 256, "min_seqlen": 512}}
                                           if method == "quest" else {"method": method}))
    dev, dt, hq, hkv, d, bs, nb, batch = "cuda", torch.bfloat16, 8, 2, 128, 64, 256, 4
    gen = torch.Generator().manual_seed(0)
    cfg = VllmConfig(device_config=DeviceConfig(device="cuda"))
    with set_current_vllm_config(cfg):
        impl = SparseAttentionImpl(hq, d, d ** -0.5, hkv)
    kv = allocate_cache(nb, bs, hkv, d, gen=gen).to(dev, dt)
    table = (torch.randperm(nb - 1, generator=gen)[: batch * 24] + 1).view(batch, 24).to(dev, torch.int32)
    lens = torch.tensor([300, 700, 1200, 1500], dtype=torch.int32, device=dev)
    k_cache, v_cache = impl.split_cache(kv)
    for b in range(batch):  # fill the prompts' cache and their summaries (an eager prefill would)
        n = int(lens[b])
        slots = table[b, torch.arange(n, device=dev) // bs].long() * bs + torch.arange(n, device=dev) % bs
        impl.do_kv_cache_update(None, torch.randn(n, hkv, d, generator=gen).to(dev, dt),
                                torch.randn(n, hkv, d, generator=gen).to(dev, dt), kv, slots)
    # persistent buffers, as vLLM's model runner keeps them
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    seq_lens = lens.clone()
    slot_mapping = torch.zeros(batch, dtype=torch.int64, device=dev)
    q, k, v = (torch.zeros(batch, h, d, device=dev, dtype=dt) for h in (hq, hkv, hkv))
    out = torch.zeros(batch, hq, d, device=dev, dtype=dt)

    def metadata():
        cm = CommonAttentionMetadata(
            query_start_loc=qsl, query_start_loc_cpu=qsl.cpu(), seq_lens=seq_lens, num_reqs=batch,
            num_actual_tokens=batch, max_query_len=1, max_seq_len=int(seq_lens.max()), block_table_tensor=table,
            slot_mapping=slot_mapping)
        spec = FullAttentionSpec(block_size=bs, num_kv_heads=hkv, head_size=d, dtype=dt)
        with set_current_vllm_config(cfg):
            return SparseAttentionMetadataBuilder(spec, ["model.layers.0.attn"], cfg, torch.device(dev)).build(0, cm)

    layer = type("Layer", (), {"layer_name": "model.layers.0.attn"})()

    def step():
        impl.do_kv_cache_update(layer, k, v, kv, slot_mapping)
        impl.forward(layer, q, k, v, kv, md, out)

    def advance():
        seq_lens.add_(1)
        pos = seq_lens.long() - 1
        slot_mapping.copy_(table.gather(1, (pos // bs).view(-1, 1)).view(-1).long() * bs + pos % bs)
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, generator=gen).to(dev, dt))

    if method == "quest":  # the summaries of the prefilled pages
        summaries = impl._page_summaries(k_cache, table)
        summaries.rebuild(PagedKVCache(k_cache, v_cache, table, lens, bs, validate=False))
    advance()
    md = metadata()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        step()  # warm-up (Triton compiles, summaries allocated)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        advance()
        kv_before = kv.clone()
        graph.replay()
        replayed, kv_after = out.clone(), kv.clone()
        kv.copy_(kv_before)
        md = metadata()
        step()  # eager, same inputs
        torch.testing.assert_close(replayed, out, rtol=0, atol=0)
        torch.testing.assert_close(kv_after, kv, rtol=0, atol=0)
