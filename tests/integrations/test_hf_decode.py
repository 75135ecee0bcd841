"""Sparse decode in a patched Hugging Face model: generate's decode steps go through the paged kernels with
the method's decode side (its page summaries kept per layer between steps), full budgets reproduce dense
decoding, tiny ones really run sparse, and the decode density is reported per layer and head."""
import pytest
import torch

import sparse_attn
from helpers import assert_close

transformers = pytest.importorskip("transformers")

VOCAB = 128


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=VOCAB,
                                      max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(config).eval()


def _ids(n=300, seed=1):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _decode_logits(model, ids, steps=6):
    """Logits of `steps` teacher-forced decode steps after prefilling ids[:, :-steps] (one token a step)."""
    cache = transformers.DynamicCache()
    prompt = ids[:, :-steps]
    model(prompt, past_key_values=cache, use_cache=True)
    out = []
    for i in range(steps):
        tok = ids[:, ids.shape[1] - steps + i:][:, :1]
        out.append(model(tok, past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(out, 1)


def _patched(model, ids, method, kwargs, prompt_len=None):
    """(teacher-forced decode logits, get_stats, greedy tokens after ids[:, :prompt_len] or None) of the
    model patched with method(min_seqlen=0, **kwargs), unpatched again after."""
    sparse_attn.patch(model, method, min_seqlen=0, **kwargs)
    try:
        got = _decode_logits(model, ids)
        stats = sparse_attn.get_stats(model)
        generated = None if prompt_len is None else model.generate(ids[:, :prompt_len], max_new_tokens=4,
                                                                   do_sample=False, pad_token_id=0)
    finally:
        sparse_attn.unpatch(model)
    return got, stats, generated


@pytest.mark.parametrize("method,kwargs", [("quest", {"budget": 2048, "sink": 0, "window": 0}),
                                           ("a_shape", {"sink": 0, "window": 2048}),
                                           ("minference", {"decode": "quest", "decode_config": {"budget": 2048}})])
def test_full_budget_decode_equals_dense(method, kwargs):
    model = tiny_llama()
    ids = _ids()
    dense = _decode_logits(model, ids)
    got, stats, _ = _patched(model, ids, method, kwargs)
    assert_close(got, dense, floor=1e-4)
    assert len(stats.decode) == 2 and all(s.seqlen_q == 1 for s in stats.decode.values())
    assert stats.density("decode") == pytest.approx(1.0)


@pytest.mark.parametrize("method,kwargs", [("quest", {"budget": 64, "sink": 32, "window": 32}),
                                           ("a_shape", {"sink": 64, "window": 64})])
def test_tiny_budget_decode_runs_sparse_and_reports_density(method, kwargs):
    model = tiny_llama()
    ids = _ids(500)  # a cache of at least twice what a step reads decodes sparse
    dense = _decode_logits(model, ids)
    got, stats, generated = _patched(model, ids, method, kwargs, prompt_len=100)
    assert (got - dense).abs().max() > 1e-3  # the sparse path really ran
    decode = stats.decode[1]
    assert decode.pattern == [method] * 4 and decode.density.shape == (4,)
    assert 0 < stats.density("decode") < 0.6
    assert generated.shape == (1, 104)


def test_decode_below_the_threshold_stays_dense():
    model = tiny_llama()
    ids = _ids(120)
    dense = _decode_logits(model, ids)
    sparse_attn.patch(model, "quest", budget=32, min_seqlen=4096)
    try:
        got = _decode_logits(model, ids)
    finally:
        sparse_attn.unpatch(model)
    assert torch.equal(got, dense) or (got - dense).abs().max() < 1e-5


def test_decode_kwargs_are_checked_when_patching():
    model = tiny_llama()
    with pytest.raises(ValueError, match="decode"):
        sparse_attn.patch(model, "vertical_slash", decode="vertical_slash")
    with pytest.raises(ValueError, match="budget"):
        sparse_attn.patch(model, "minference", decode="quest", decode_config={"budget": 1})
    with pytest.raises(TypeError, match="decode_config"):
        sparse_attn.patch(model, "minference", decode="quest", decode_config={"gamma": 1})
    assert not sparse_attn.integrations.hf.is_patched(model)


@pytest.mark.parametrize("budget,pattern", [(160, "dense"), (128, "quest")])
def test_a_budget_reading_half_the_cache_or_more_decodes_dense(budget, pattern):
    """The decode side runs where it reads less than half the cache (294 cached tokens here, 32-token pages:
    a 160-token budget reads more than half, a 128-token one less); otherwise the step is dense."""
    model = tiny_llama()
    _, stats, _ = _patched(model, _ids(), "quest", {"budget": budget, "sink": 32, "window": 32})
    assert all(s.pattern == [pattern] * 4 for s in stats.decode.values())


# Tensor methods that wait for the device (a copy to the host or a value read back). On the CPU they cost
# nothing, so the test catches the call itself.
_SYNCS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "equal"}


class _SyncSpy(torch.overrides.TorchFunctionMode):
    """Records every call of a _SYNCS function made from the package's own code."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _SYNCS or (name == "to" and "cpu" in map(str, list(args[1:]) + list((kwargs or {}).values()))):
            import traceback

            ours = [f for f in traceback.extract_stack()[:-1] if "/sparse_attn/" in f.filename.replace("\\", "/")]
            if ours:
                self.calls.append(f"{name} at {ours[-1].filename}:{ours[-1].lineno}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", [p.name for p in sparse_attn.patterns.patterns() if p.decode] + ["dense"])
def test_a_decode_step_never_waits_for_the_device(method):
    """A patched model's decode step (each decode side at its default budgets, and dense; stats on) calls
    nothing that syncs the host with the device, so the step's launches can run ahead of the GPU. The cache
    is long enough for the sparse side to run (twice what it reads)."""
    from sparse_attn.decode import sparse_decode_from

    model = tiny_llama()
    cached = 256
    if method != "dense":
        p = sparse_attn.patterns.get_pattern(method)
        cached = sparse_decode_from(method, p.defaults(), 0) + 64
    cache = transformers.DynamicCache()
    ids = _ids(cached + 2)
    with torch.no_grad():
        model(ids[:, :-2], past_key_values=cache, use_cache=True)  # prefilled unpatched (dense, quick)
    sparse_attn.patch(model, method, min_seqlen=0)  # every pattern is also a method of its name
    try:
        with torch.no_grad():
            model(ids[:, -2:-1], past_key_values=cache, use_cache=True)  # the first step builds the summaries
            with _SyncSpy() as spy:
                model(ids[:, -1:], past_key_values=cache, use_cache=True)
        assert all(s.pattern == [method] * 4 for s in sparse_attn.get_stats(model).decode.values())
        assert spy.calls == [], spy.calls
    finally:
        sparse_attn.unpatch(model)
