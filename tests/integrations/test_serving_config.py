"""The `sparse_attention_config` block (config.json / $SPARSE_ATTN_CONFIG) and what a tensor-parallel rank of a
served model runs (no vLLM needed)."""
import json

import pytest
import torch

import sparse_attn
from sparse_attn.integrations.config import ENV_VAR, SparseAttentionConfig, read_config
from sparse_attn.integrations.vllm.settings import layer_index, not_supported_reasons, resolve_settings
from sparse_attn.patterns import DENSE, get_pattern


def _profile(num_layers=2, num_heads=8, num_kv_heads=4, head_dim=64):
    """Every head of every layer a distinct A-shape window, so a slice shows which heads it took."""
    layers = [[{"pattern": "a_shape", "sink": 16, "window": 64 * (1 + layer * num_heads + h)}
               for h in range(num_heads)] for layer in range(num_layers)]
    model = {"name": "toy", "architecture": "LlamaForCausalLM", "num_layers": num_layers, "num_heads": num_heads,
             "num_kv_heads": num_kv_heads, "head_dim": head_dim}
    return {"format": "sparse_attn.profile/1", "model": model, "settings": {}, "layers": layers}


def test_block_from_config_json_and_env_override(tmp_path):
    block = {"method": "a_shape", "kwargs": {"sink": 32, "window": 256, "min_seqlen": 128}}
    cfg = read_config({"sparse_attention_config": block}, environ={})
    assert (cfg.method, cfg.kwargs, cfg.source) == ("a_shape", block["kwargs"], "config.json")
    assert read_config({"hidden_size": 8}, environ={}) is None
    env = {ENV_VAR: json.dumps({"method": "quest", "kwargs": {"budget": 512}})}
    cfg = read_config({"sparse_attention_config": block}, environ=env)
    assert (cfg.method, cfg.kwargs) == ("quest", {"budget": 512})
    # a file: the block itself, or a whole config.json; a relative profile path resolves beside the file
    (tmp_path / "p.json").write_text(json.dumps(_profile()))
    (tmp_path / "cfg.json").write_text(json.dumps({"sparse_attention_config": {"profile": "p.json"}}))
    cfg = read_config(None, environ={ENV_VAR: str(tmp_path / "cfg.json")})
    assert cfg.method == "minference" and cfg.profile == str(tmp_path / "p.json")
    cfg = read_config({"sparse_attention_config": {"profile": "p.json"}}, model_dir=tmp_path, environ={})
    assert cfg.profile == str(tmp_path / "p.json")


@pytest.mark.parametrize("block, error, words", [
    ({"methd": "a_shape"}, ValueError, "unknown key(s) ['methd']"),
    ({"method": "nope"}, ValueError, "unknown method 'nope'"),
    ({"method": 3}, TypeError, "'method' must be a method name"),
    ({"method": "a_shape", "kwargs": {"budget": 4}}, TypeError, "unexpected keyword argument(s) ['budget']"),
    ({"method": "a_shape", "kwargs": {"window": 0}}, ValueError, "'window' must be an int"),
    ({"method": "a_shape", "profile": "x.json"}, ValueError, "mixture method 'minference' only"),
    ({"kwargs": [1]}, TypeError, "'kwargs' must be an object"),
    ([1, 2], TypeError, "expected a JSON object"),
])
def test_bad_blocks_name_the_problem(block, error, words):
    with pytest.raises(error) as e:
        read_config({"sparse_attention_config": block}, environ={})
    assert words in str(e.value) and "sparse_attention_config (config.json)" in str(e.value)


def test_bad_env_values():
    with pytest.raises(ValueError, match=ENV_VAR):
        read_config(None, environ={ENV_VAR: "{not json"})
    with pytest.raises(ValueError, match="path of a JSON file"):
        read_config(None, environ={ENV_VAR: "/no/such/file.json"})


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_profile_sliced_to_each_rank(tp_size):
    """Rank r of tp holds query heads [r * Hq / tp, (r + 1) * Hq / tp): its head configs are those of the
    profile, in order; every rank together covers the model's heads once."""
    prof = _profile()
    cfg = SparseAttentionConfig(profile=prof)
    seen = []
    for rank in range(tp_size):
        s = resolve_settings(cfg, num_heads=8 // tp_size, num_kv_heads=4 // tp_size, head_size=64, tp_rank=rank,
                             tp_size=tp_size, num_layers=2)
        for layer in range(2):
            heads = s.head_config(layer)
            assert len(heads) == 8 // tp_size
            assert [h["window"] for h in heads] == [h["window"] for h in prof["layers"][layer]][
                rank * 8 // tp_size:(rank + 1) * 8 // tp_size]
            seen += [(layer, h["window"]) for h in heads]
    assert sorted(seen) == sorted((layer, h["window"]) for layer in range(2) for h in prof["layers"][layer])


def test_settings_check_the_model():
    with pytest.raises(ValueError, match="does not match the model"):  # profile for 8 heads, model has 16
        resolve_settings(SparseAttentionConfig(profile=_profile()), num_heads=8, num_kv_heads=4, head_size=64,
                         tp_rank=0, tp_size=2, num_layers=2)
    with pytest.raises(ValueError, match="tp_rank"):
        resolve_settings(None, num_heads=8, num_kv_heads=4, head_size=64, tp_rank=2, tp_size=2)
    s = resolve_settings(SparseAttentionConfig("quest", {"budget": 256, "min_seqlen": 100}), num_heads=4,
                         num_kv_heads=2, head_size=64)
    assert s.decode == "quest" and s.decode_budgets["budget"] == 256 and s.min_seqlen == 100
    assert s.decode_pattern is get_pattern("quest") and s.head_config(0) is None
    s = resolve_settings(SparseAttentionConfig("dense"), num_heads=4, num_kv_heads=2, head_size=64)
    assert s.decode is None and s.method == DENSE


def test_unsupported_reasons_name_the_field():
    assert not_supported_reasons(head_size=128, block_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto") == []
    reasons = not_supported_reasons(head_size=96, block_size=24, dtype=torch.float64, kv_cache_dtype="fp8")
    assert [r.split()[0] for r in reasons] == ["head_size", "block_size", "dtype", "kv_cache_dtype"]
    assert layer_index("model.layers.12.self_attn.attn") == 12 and layer_index("layers.0.attn") == 0
    with pytest.raises(ValueError, match="layer_name"):
        layer_index("attn")


def test_hf_patch_reads_the_block(monkeypatch):
    """sparse_attn.patch(model) without a method takes the model config's block; $SPARSE_ATTN_CONFIG wins."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg.sparse_attention_config = {"method": "a_shape",
                                   "kwargs": {"sink": 16, "window": 32, "block_size": 16, "min_seqlen": 8}}
    model = transformers.LlamaForCausalLM(cfg).eval()
    monkeypatch.delenv(ENV_VAR, raising=False)
    try:
        sparse_attn.patch(model)
        ids = torch.randint(0, 64, (1, 128))
        with torch.no_grad():
            model(ids)
        stats = sparse_attn.get_stats(model)
        assert stats.prefill[0].pattern == ["a_shape"] * 4 and stats.density() < 1
        monkeypatch.setenv(ENV_VAR, json.dumps({"method": "dense"}))
        sparse_attn.patch(model)
        with torch.no_grad():
            model(ids)
        assert sparse_attn.get_stats(model).prefill[0].pattern == [DENSE] * 4
    finally:
        sparse_attn.unpatch(model)


def test_stats_hook_and_log_line():
    import logging

    from sparse_attn.integrations.vllm import disable_stats, enable_stats, get_stats
    from sparse_attn.integrations.vllm.stats import logger

    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # vLLM's logging config stops "vllm.*" records from reaching the root
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    stats = enable_stats(log_every=2)
    try:
        assert get_stats() is stats and stats.density() is None
        stats.add("prefill", 0, 0.5, 100)
        stats.add("prefill", 0, 1.0, 300)  # weighted by queries: (50 + 300) / 400
        stats.add("prefill", 1, 0.25, 10)
        stats.add("decode", 0, torch.tensor(0.2))
        assert stats.layers("prefill") == {0: 0.875, 1: 0.25} and stats.density("decode") == pytest.approx(0.2)
        stats.step()
        assert not records
        stats.step()
        lines = [r.getMessage() for r in records]
        assert lines[0].startswith("sparse_attn step 2: prefill density 0.562 (per layer 0:0.875 1:0.250)")
        assert "decode density 0.200" in lines[1] and not stats.prefill  # the next line covers the next steps
        with pytest.raises(ValueError, match="log_every"):
            enable_stats(log_every=-1)
    finally:
        disable_stats()
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_mixture_finds_the_model_profile_by_name(tmp_path, monkeypatch):
    prof = _profile()
    prof["model"]["name"] = "org/Toy-1B"
    (tmp_path / "Toy-1B.json").write_text(json.dumps(prof))
    monkeypatch.setenv("SPARSE_ATTN_PATCHES", str(tmp_path))
    s = resolve_settings(None, num_heads=4, num_kv_heads=2, head_size=64, tp_rank=1, tp_size=2, num_layers=2,
                         model_name="/models/Toy-1B")
    assert [h["window"] for h in s.head_config(1)] == [h["window"] for h in prof["layers"][1][4:]]
    assert resolve_settings(SparseAttentionConfig("a_shape"), num_heads=8, num_kv_heads=4, head_size=64,
                            model_name="/models/Toy-1B").profile is None
