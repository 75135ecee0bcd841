"""sparse_attn.patch / unpatch on tiny random-weight Hugging Face models (CPU, fp32), for every method of the
registry.

Full-budget methods must reproduce the dense model's logits within fp32 rounding (the model run in fp64 is
the reference: the tolerance rule of tests/helpers.py, the dense fp32 model being the low-precision one);
unpatch must give them back bit for bit; the sparsest budgets must change them (the sparse path really runs).
"""
import logging

import pytest
import torch
from torch import nn

import sparse_attn
from helpers import assert_close, full_budget, full_budget_head_config, prefill_patterns, smallest_budget
from sparse_attn.integrations.hf import is_patched
from sparse_attn.methods import MIXTURE, get_method, list_methods
from sparse_attn.patterns import get_pattern, list_patterns

transformers = pytest.importorskip("transformers")

SEQ = 197  # not a multiple of the 64-token blocks
VOCAB = 128
COMMON = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=1024)
PATTERNS = list_patterns()
PREFILL = prefill_patterns()  # with a prefill side
# Methods whose full budget is defined (dense and the mixture always; a pattern where it has one).
FULL = [m for m in list_methods() if m not in PATTERNS or get_pattern(m).full_budget is not None]
DECODE = [m for m in list_methods() if get_method(m).decode is not None]  # methods with a decode side


def _family(name):
    t = transformers
    return {
        "llama": (t.LlamaConfig, t.LlamaForCausalLM, {}),
        "mistral": (t.MistralConfig, t.MistralForCausalLM, {"sliding_window": None}),
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM, {}),
        "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM, {}),
        "phi3": (t.Phi3Config, t.Phi3ForCausalLM, {"pad_token_id": 0, "sliding_window": None}),
    }[name]


def tiny_model(family="llama", seed=0):
    config_cls, model_cls, extra = _family(family)
    torch.manual_seed(seed)
    return model_cls(config_cls(**COMMON, **extra)).eval()


def _ids(seq=SEQ, batch=1, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids, **kwargs):
    return model(ids, **kwargs).logits


def _profile(model, layers):
    c = model.config
    return {"format": "sparse_attn.profile/1",
            "model": {"name": "tiny", "architecture": type(model).__name__, "num_layers": c.num_hidden_layers,
                      "num_heads": c.num_attention_heads, "num_kv_heads": c.num_key_value_heads,
                      "head_dim": c.head_dim},
            "settings": {}, "layers": layers}


def _full_profile(model, seqlen=SEQ):
    """Every registered pattern at its full budget for seqlen tokens, and dense, mixed across heads and
    layers (each layer starts one entry further)."""
    c = model.config
    return _profile(model, [full_budget_head_config(c.num_attention_heads, seqlen, seqlen, shift=layer)
                            for layer in range(c.num_hidden_layers)])


def _full_budget_patch(model, method, seqlen):
    """(config, kwargs) of patch(model, method) at full budget for seqlen tokens."""
    if method == MIXTURE:
        return _full_profile(model, seqlen), {}
    return None, (full_budget(method, seqlen, seqlen) if method in PATTERNS else {})


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
@pytest.mark.parametrize("method", FULL)
def test_full_budget_gives_dense_logits(family, method):
    model, ids = tiny_model(family), _ids()
    exact = logits(tiny_model(family).double(), ids)
    dense = logits(model, ids)
    config, kwargs = _full_budget_patch(model, method, SEQ)
    sparse_attn.patch(model, method, config, min_seqlen=1, **kwargs)
    try:
        patched = logits(model, ids)
        stats = sparse_attn.get_stats(model)
    finally:
        sparse_attn.unpatch(model)
    assert_close(patched.double(), exact, dense.double(), floor=1e-5)
    assert sorted(stats.prefill) == [0, 1] and stats.fallbacks == 0
    assert stats.prefill[0].density.shape == (4,) and stats.density() == pytest.approx(1.0)
    if method in PATTERNS:  # a decode-only pattern prefills dense
        assert all(s.pattern == [method if method in PREFILL else "dense"] * 4 for s in stats.prefill.values())
    assert torch.equal(logits(model, ids), dense)


@pytest.mark.parametrize("method, kwargs",
                         [(p, smallest_budget(p, 320)) for p in PREFILL]
                         + [("vertical_slash", dict(smallest_budget("vertical_slash", 320), share_heads=2))],
                         ids=PREFILL + ["vertical_slash-share_heads"])
def test_tiny_budget_changes_logits_and_reports_density(method, kwargs):
    model, ids = tiny_model(), _ids(seq=320)
    dense = logits(model, ids)
    sparse_attn.patch(model, method, min_seqlen=1, diagnostics=True, **kwargs)
    patched = logits(model, ids)
    stats = sparse_attn.get_stats(model)
    sparse_attn.unpatch(model)
    assert (patched - dense).abs().max().item() > 1e-3
    assert stats.density() < 0.9
    assert 0 < stats.recall() < 1
    assert all(s.pattern == [method] * 4 for s in stats.prefill.values())
    assert "density" in stats.table()


def test_unpatch_restores_exactly_and_unregisters():
    from transformers import AttentionInterface

    model, ids = tiny_model("qwen2"), _ids()
    before = logits(model, ids)
    implementation = model.config._attn_implementation
    sparse_attn.patch(model, "block_sparse", min_seqlen=1, top_k=2)
    name = model.config._attn_implementation
    assert name != implementation and name in AttentionInterface._global_mapping
    sparse_attn.unpatch(model)
    assert model.config._attn_implementation == implementation
    assert name not in AttentionInterface._global_mapping and not is_patched(model)
    assert torch.equal(logits(model, ids), before)
    assert sparse_attn.unpatch(model) is model  # unpatching an unpatched model is a no-op


def test_patch_twice_replaces_settings():
    model, ids = tiny_model(), _ids(seq=256)
    dense = logits(model, ids)
    sparse_attn.patch(model, "block_sparse", min_seqlen=1, top_k=2)
    name = model.config._attn_implementation
    sparse_attn.patch(model, "a_shape", min_seqlen=1, sink=0, window=4096)
    assert model.config._attn_implementation == name
    assert torch.allclose(logits(model, ids), dense, atol=1e-5)
    assert sparse_attn.get_stats(model).prefill[0].pattern == ["a_shape"] * 4
    sparse_attn.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(logits(model, ids), dense)


def test_threshold_keeps_short_prefill_dense():
    model, ids = tiny_model(), _ids(seq=100)
    dense = logits(model, ids)
    sparse_attn.patch(model, "block_sparse", min_seqlen=101, top_k=1)
    out = logits(model, ids)
    stats = sparse_attn.get_stats(model)
    sparse_attn.unpatch(model)
    assert torch.allclose(out, dense, atol=1e-5)
    assert stats.density() == 1.0 and stats.prefill[0].pattern == ["dense"] * 4


@pytest.mark.parametrize("pattern", PATTERNS)
def test_generate_at_full_budget_matches_dense(pattern):
    """Prefill and every decode step at full budget for the final length: the dense model's tokens; decode calls
    are recorded at density 1, as dense steps where the method has a decode side (a budget that reads the
    whole cache decodes dense: sparse_attn.decode.DECODE_MIN_RATIO)."""
    model, ids = tiny_model("mistral"), _ids(seq=200)
    dense = model.generate(ids, max_new_tokens=4, do_sample=False)
    budget = full_budget(pattern, 204, 204)
    if budget is None:
        pytest.skip(f"pattern {pattern!r} has no full budget")
    sparse_attn.patch(model, pattern, min_seqlen=1, **budget)
    try:
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
        stats = sparse_attn.get_stats(model)
    finally:
        sparse_attn.unpatch(model)
    assert torch.equal(generated, dense)
    assert stats.decode[0].seqlen_q == 1 and stats.decode[0].seqlen_k == 203
    assert stats.density("decode") == 1.0
    side = get_method(pattern).decode
    if side is not None:
        assert stats.decode[0].pattern == ["dense"] * 4


@pytest.mark.parametrize("method", DECODE)
def test_decode_sides_sparsify_decode(method):
    """A method with a decode side at its pattern's sparsest budget reads fewer keys than dense at every step."""
    model, ids = tiny_model("mistral"), _ids(seq=600)
    side = get_method(method).decode
    kwargs = smallest_budget(method, 600) if method in PATTERNS else {}
    sparse_attn.patch(model, method, min_seqlen=1, **kwargs)
    try:
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
        stats = sparse_attn.get_stats(model)
    finally:
        sparse_attn.unpatch(model)
    assert generated.shape == (1, 604) and stats.decode[0].seqlen_k == 603
    assert stats.density("decode") < 1.0 and stats.decode[0].pattern == [side] * 4


@pytest.mark.parametrize("pattern", PREFILL)
def test_chunked_prefill_with_cache_stays_sparse(pattern):
    """A second multi-token call against a filled cache gets a causal mask from the model: still sparse."""
    model, ids = tiny_model(), _ids(seq=260)
    dense = logits(model, ids)
    budget = full_budget(pattern, 260, 260)
    if budget is None:
        pytest.skip(f"pattern {pattern!r} has no full budget")
    sparse_attn.patch(model, pattern, min_seqlen=1, **budget)
    try:
        with torch.no_grad():
            first = model(ids[:, :130], use_cache=True)
            second = model(ids[:, 130:], past_key_values=first.past_key_values, use_cache=True).logits
        stats = sparse_attn.get_stats(model)
    finally:
        sparse_attn.unpatch(model)
    assert stats.fallbacks == 0 and stats.prefill[0].seqlen_k == 260
    assert stats.prefill[0].pattern == [pattern] * 4
    assert torch.allclose(second, dense[:, 130:], atol=1e-5)


def _spy_masks(monkeypatch):
    """The (q_length, kv_length) of every mask transformers builds for the patched model."""
    import functools

    import transformers.masking_utils as mu

    built, real = [], mu.sdpa_mask

    @functools.wraps(real)
    def spy(*args, **kwargs):
        mask = real(*args, **kwargs)
        if mask is not None:
            built.append(tuple(mask.shape[-2:]))
        return mask

    monkeypatch.setattr(mu, "sdpa_mask", spy)
    return built


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_chunked_prefill_dense_equals_one_shot(family, monkeypatch):
    """patch(prefill_chunk=N): the forward pass runs in chunks of N against the cache, with the same logits as one
    pass (all positions, or the last one as generate keeps), the same generated tokens, no chunk x keys mask
    built, and the prefill stats merged over the chunks."""
    model, ids = tiny_model(family), _ids(seq=SEQ)
    dense = logits(model, ids)
    last = logits(model, ids, logits_to_keep=1)
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    built = _spy_masks(monkeypatch)
    calls = []
    sparse_attn.patch(model, "dense", prefill_chunk=64)
    forward = model.forward
    model.forward = lambda *a, **kw: calls.append(1) or forward(*a, **kw)  # counts the caller's calls only
    try:
        chunked = logits(model, ids)
        stats = sparse_attn.get_stats(model)
        chunked_last = logits(model, ids, logits_to_keep=1)
        chunked_generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    finally:
        model.forward = forward
        sparse_attn.unpatch(model)
    assert chunked.shape == dense.shape and chunked_last.shape == last.shape == (1, 1, VOCAB)
    assert_close(chunked.double(), logits(tiny_model(family).double(), ids), dense.double(), floor=1e-5)
    assert torch.allclose(chunked_last, last, atol=1e-5) and torch.equal(chunked_generated, generated)
    assert stats.fallbacks == 0 and stats.prefill[0].seqlen_q == SEQ and stats.prefill[0].seqlen_k == SEQ
    assert all(q == k for q, k in built), f"a chunk x keys mask was built: {built}"
    assert "forward" not in model.__dict__  # unpatch removed the chunking


@pytest.mark.parametrize("method", PREFILL)
def test_chunked_prefill_sparse_density_close_to_one_shot(method):
    """A sparse method prefilled in chunks (each estimated from its own queries) computes about the share of the
    causal entries that one pass does, on every layer, and the chunked run is really sparse."""
    model, ids = tiny_model(), _ids(seq=448)
    kwargs = smallest_budget(method, 448)
    densities = {}
    for chunk in (None, 160):
        sparse_attn.patch(model, method, min_seqlen=1, prefill_chunk=chunk, **kwargs)
        try:
            logits(model, ids)
            stats = sparse_attn.get_stats(model)
        finally:
            sparse_attn.unpatch(model)
        assert stats.fallbacks == 0 and stats.prefill[0].seqlen_q == 448
        densities[chunk] = torch.stack([s.density for s in stats.prefill.values()])
    assert densities[160].mean() < 0.9
    assert (densities[160] - densities[None]).abs().max() < 0.1, densities


def test_prefill_chunk_is_checked_and_refusals_run_in_one_pass(caplog):
    model, ids = tiny_model(), _ids(seq=200)
    with pytest.raises(ValueError, match="prefill_chunk: expected None or a positive int"):
        sparse_attn.patch(model, "dense", prefill_chunk=0)
    sparse_attn.patch(model, "dense", prefill_chunk=64)
    try:
        with caplog.at_level(logging.WARNING, logger="sparse_attn"):
            out = model(ids, labels=ids)
        stats = sparse_attn.get_stats(model)
    finally:
        sparse_attn.unpatch(model)
    assert out.loss is not None and stats.prefill[0].seqlen_q == 200  # one pass
    assert any("labels" in r.message for r in caplog.records)


def test_fallback_for_a_chunk_without_mask_is_bottom_right_causal():
    """A call handed to transformers' SDPA (here: attention with a softcap) for a chunk the mask builder gave no
    mask: the bottom-right causal band, not SDPA's top-left one."""
    from transformers import AttentionInterface

    from sparse_attn.integrations.hf import _patches
    from sparse_attn.ops.reference import reference_attention

    model = tiny_model()
    sparse_attn.patch(model, "dense")
    try:
        attention = AttentionInterface._global_mapping[_patches[model].name]
        module = model.model.layers[0].self_attn
        gen = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(1, h, s, 16, generator=gen) for h, s in ((4, 5), (2, 9), (2, 9)))
        out, _ = attention(module, q, k, v, None, scaling=0.25, softcap=None, sinks=None, position_bias=None,
                           s_aux=torch.zeros(4))
    finally:
        sparse_attn.unpatch(model)
    assert torch.allclose(out.transpose(1, 2), reference_attention(q, k, v, causal=True, scale=0.25), atol=1e-5)


def test_padding_mask_falls_back_to_dense_with_one_warning(caplog):
    model, ids = tiny_model(), _ids(seq=96, batch=2)
    mask = torch.ones(2, 96, dtype=torch.long)
    mask[1, :7] = 0
    dense = logits(model, ids, attention_mask=mask)
    sparse_attn.patch(model, "block_sparse", min_seqlen=1, top_k=1)
    with caplog.at_level(logging.WARNING, logger="sparse_attn"):
        out = logits(model, ids, attention_mask=mask)
    stats = sparse_attn.get_stats(model)
    sparse_attn.unpatch(model)
    assert torch.equal(out, dense)
    assert stats.fallbacks == 2
    assert sum("padding" in r.message for r in caplog.records) <= 1


def test_profile_found_in_patches_dir(tmp_path, monkeypatch):
    model, ids = tiny_model(), _ids()
    profile = _full_profile(model)
    profile["model"]["name"] = "org/tiny-test-model"
    profile["layers"] = [[{"pattern": "block_sparse", "top_k": 1}] * 4] * 2
    sparse_attn.save_profile(profile, tmp_path / "tiny-test-model.json")
    monkeypatch.setenv("SPARSE_ATTN_PATCHES", str(tmp_path))
    model.name_or_path = "org/tiny-test-model"
    sparse_attn.patch(model, "minference", min_seqlen=1)
    logits(model, ids)
    stats = sparse_attn.get_stats(model)
    sparse_attn.unpatch(model)
    assert stats.prefill[0].pattern == ["block_sparse"] * 4 and stats.density() < 1


def test_profile_matched_by_identity_not_path(tmp_path, monkeypatch, caplog):
    """A checkpoint loaded from a folder of another name (a GGUF file's) finds its profile by architecture, layer /
    head shape and the name stored in the checkpoint; a profile of another shape or another model is not used,
    and patch says which it uses (or that there is none)."""
    from sparse_attn.integrations.hf import _patches

    model = tiny_model()
    profile = _full_profile(model)
    profile["model"]["name"] = "org/Tiny-Test-7M-Instruct"
    profile["layers"] = [[{"pattern": "block_sparse", "top_k": 1}] * 4] * 2
    sparse_attn.save_profile(profile, tmp_path / "Tiny-Test-7M-Instruct.json")
    other_shape = dict(profile, model=dict(profile["model"], num_layers=3), layers=profile["layers"] * 2)
    other_shape["layers"] = other_shape["layers"][:3]
    sparse_attn.save_profile(other_shape, tmp_path / "a-Tiny-Test-7M-3-layers.json")
    sparse_attn.save_profile(dict(profile, model=dict(profile["model"], name="org/Other-Model-7M")),
                             tmp_path / "b-other.json")
    monkeypatch.setenv("SPARSE_ATTN_PATCHES", str(tmp_path))
    model.name_or_path = model.config._name_or_path = "/site-packages/llm_tiny"
    model.config._model_name_or_path = "Tiny Test 7M 8k Ep2"  # what a GGUF's general.name becomes
    with caplog.at_level(logging.INFO, logger="sparse_attn"):
        sparse_attn.patch(model, "minference", min_seqlen=1)
    try:
        assert _patches[model].profile.model["name"] == "org/Tiny-Test-7M-Instruct"
        assert sum("org/Tiny-Test-7M-Instruct" in r.message for r in caplog.records) == 1
        logits(model, _ids())
        assert sparse_attn.get_stats(model).prefill[0].pattern == ["block_sparse"] * 4
    finally:
        sparse_attn.unpatch(model)
    caplog.clear()
    model.config._model_name_or_path = "Unrelated 7M"
    with caplog.at_level(logging.INFO, logger="sparse_attn"):
        sparse_attn.patch(model, "minference", min_seqlen=1)
    assert _patches[model].profile is None
    assert sum("no profile" in r.message and r.levelno == logging.WARNING for r in caplog.records) == 1
    sparse_attn.unpatch(model)


@pytest.mark.slow
def test_smollm2_from_gguf_finds_its_profile(caplog):
    """SmolLM2 loaded as a new user would, with plain from_pretrained(dir, gguf_file=...), and patched with the
    mixture runs its shipped profile (not the uniform default)."""
    from transformers import AutoModelForCausalLM

    from sparse_attn.integrations.hf import _patches
    from sparse_attn.models import smollm2_gguf

    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert "SmolLM2-135M-Instruct" not in model.name_or_path
    with caplog.at_level(logging.INFO, logger="sparse_attn"):
        sparse_attn.patch(model, "minference")
    try:
        profile = _patches[model].profile
        assert profile is not None and profile.model["name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert any("SmolLM2-135M-Instruct" in r.message for r in caplog.records)
    finally:
        sparse_attn.unpatch(model)


def test_attention_hook_sees_every_layer_and_restores_the_model():
    """attention_hook (what patch and the profiler's capture install): every attention call goes to the given
    function while open; the previous implementation comes back on exit, also after an error."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from sparse_attn.integrations.hf import attention_hook, model_shape

    model, ids = tiny_model(), _ids(seq=64)
    assert model_shape(model) == {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16}
    before = logits(model, ids)
    implementation = model.config._attn_implementation
    seen = []

    def attention(module, query, key, value, attention_mask, **kwargs):
        seen.append((module.layer_idx, tuple(query.shape), tuple(key.shape)))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    with attention_hook(model, attention):
        assert model.config._attn_implementation != implementation
        hooked = logits(model, ids)
    assert sorted(layer for layer, _, _ in seen) == [0, 1]
    assert seen[0][1:] == ((1, 4, 64, 16), (1, 2, 64, 16))
    assert torch.allclose(hooked, before, atol=1e-6)
    assert model.config._attn_implementation == implementation and not is_patched(model)
    with pytest.raises(RuntimeError, match="inside"):
        with attention_hook(model, attention):
            raise RuntimeError("inside")
    assert model.config._attn_implementation == implementation
    assert torch.equal(logits(model, ids), before)


class EagerAttention(nn.Module):
    """An attention layer that does its own math instead of asking transformers' registry."""

    def __init__(self, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx


class NoInterfaceModel(transformers.PreTrainedModel):
    config_class = transformers.LlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.attn = EagerAttention(0)


def test_bad_inputs_give_clear_errors():
    model = tiny_model()
    with pytest.raises(TypeError, match="PreTrainedModel"):
        sparse_attn.patch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="ALL_ATTENTION_FUNCTIONS"):
        sparse_attn.patch(NoInterfaceModel(transformers.LlamaConfig(**COMMON)))
    with pytest.raises(ValueError, match="minference"):
        sparse_attn.patch(model, "no_such_method")
    with pytest.raises(TypeError, match="window_size.*accepted.*window"):
        sparse_attn.patch(model, "a_shape", window_size=3)
    wrong = _full_profile(model)
    wrong["model"]["num_layers"] = 3
    wrong["layers"] = wrong["layers"] + wrong["layers"][:1]
    with pytest.raises(ValueError, match="num_layers: profile has 3, model has 2"):
        sparse_attn.patch(model, "minference", wrong)
    with pytest.raises(ValueError, match="config: a head profile applies to the per-head mixture method only, "
                                         "got method='a_shape'"):
        sparse_attn.patch(model, "a_shape", _full_profile(model))
    with pytest.raises(ValueError, match=r"share_heads: expected a positive int dividing the query heads per kv "
                                         r"head \(2\), got 4"):
        sparse_attn.patch(model, "vertical_slash", share_heads=4)  # 4 query heads, 2 per kv head
    with pytest.raises(ValueError, match="not patched"):
        sparse_attn.get_stats(model)
    assert not is_patched(model) and model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------- GPU: the patched model on the Triton kernels

GPU_COMMON = dict(COMMON, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                  max_position_embeddings=4096)
GPU_SEQ = 2111  # past the default min_seqlen, not a multiple of any block size


def _gpu_model(family="llama"):
    config_cls, model_cls, extra = _family(family)
    torch.manual_seed(0)
    return model_cls(config_cls(**GPU_COMMON, **extra)).eval().cuda()


def _no_reference_fallback(monkeypatch):
    """On CUDA every sparse method must run on the kernels: any fallback to a reference (the kernel families'
    own, or the CPU path of dispatch) fails the test."""
    import sparse_attn.dispatch
    import sparse_attn.ops.block_sparse
    import sparse_attn.ops.vertical_slash

    def refuse(*args, **kwargs):
        raise AssertionError("fell back to a reference on CUDA")

    for module in (sparse_attn.ops.block_sparse, sparse_attn.ops.vertical_slash):
        monkeypatch.setattr(module, "reference_attention", refuse)
    monkeypatch.setattr(sparse_attn.dispatch, "sdpa_layout_attention", refuse)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("method", FULL)
def test_gpu_full_budget_bf16_close_to_dense(family, method, monkeypatch):
    """bf16 on CUDA: the patched model's error against the fp32 model is at most twice dense bf16's."""
    _no_reference_fallback(monkeypatch)
    ids = _ids(seq=GPU_SEQ).cuda()
    exact = logits(_gpu_model(family), ids).double()
    model = _gpu_model(family).to(torch.bfloat16)
    dense = logits(model, ids)
    config, kwargs = _full_budget_patch(model, method, GPU_SEQ)
    sparse_attn.patch(model, method, config, **kwargs)
    try:
        patched = logits(model, ids)
        stats = sparse_attn.get_stats(model)
    finally:
        sparse_attn.unpatch(model)
    assert_close(patched.double(), exact, dense.double(), floor=1e-3)
    assert stats.fallbacks == 0 and stats.density() == pytest.approx(1.0)
    assert torch.equal(logits(model, ids), dense)


@pytest.mark.gpu
@pytest.mark.parametrize("method", PREFILL)
def test_gpu_chunked_prefill_runs_on_the_kernels(method, monkeypatch):
    """bf16 on CUDA, prefill in chunks (each the last rows of a longer key sequence): the kernels run every chunk,
    the density is close to one pass's, dense chunks give one pass's logits within bf16's error."""
    _no_reference_fallback(monkeypatch)
    model, ids = _gpu_model().to(torch.bfloat16), _ids(seq=3611).cuda()  # chunks of 1500, 1500, 611
    exact = logits(_gpu_model(), ids).double()
    densities = {}
    for chunk in (None, 1500):
        sparse_attn.patch(model, method, prefill_chunk=chunk, min_seqlen=512, **smallest_budget(method, 3611))
        try:
            out = logits(model, ids)
            densities[chunk] = sparse_attn.get_stats(model).density()
        finally:
            sparse_attn.unpatch(model)
        assert torch.isfinite(out).all()
    assert densities[1500] < 0.9 and abs(densities[1500] - densities[None]) < 0.1
    dense = logits(model, ids)
    sparse_attn.patch(model, "dense", prefill_chunk=1500)
    try:
        chunked = logits(model, ids)
    finally:
        sparse_attn.unpatch(model)
    assert_close(chunked.double(), exact, dense.double(), floor=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("method", PREFILL)
def test_gpu_tiny_budget_runs_sparse_and_generates(method, monkeypatch):
    _no_reference_fallback(monkeypatch)
    model, ids = _gpu_model().to(torch.bfloat16), _ids(seq=GPU_SEQ).cuda()
    dense = logits(model, ids)
    sparse_attn.patch(model, method, **smallest_budget(method, GPU_SEQ))
    try:
        patched = logits(model, ids)
        density = sparse_attn.get_stats(model).density()
        generated = model.generate(ids, max_new_tokens=3, do_sample=False)
        decode_density = sparse_attn.get_stats(model).density("decode")
    finally:
        sparse_attn.unpatch(model)
    assert torch.isfinite(patched).all() and (patched.float() - dense.float()).abs().max().item() > 1e-2
    assert density < 0.9  # random weights scatter the diagonals: vertical-slash ranges cover much
    assert generated.shape == (1, GPU_SEQ + 3)
    assert decode_density < 1.0 if get_method(method).decode else decode_density == 1.0
