"""Profiles: round trip, validation errors that name layer/head/key, model checks, lookup, MInference import."""
import json

import pytest

from sparse_attn.profiles import (
    FORMAT,
    Profile,
    find_profile,
    from_minference_config,
    load_profile,
    profile_filename,
    save_profile,
)

MODEL = {"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "architecture": "LlamaForCausalLM", "num_layers": 2,
         "num_heads": 3, "num_kv_heads": 1, "head_dim": 64}
LAYERS = [
    [{"pattern": "vertical_slash", "vertical_size": 100, "slash_size": 200, "recall": 0.97},
     {"pattern": "a_shape", "sink": 64, "window": 256}, {"pattern": "dense"}],
    [{"pattern": "block_sparse", "top_k": 8}, {"pattern": "dense"}, {"pattern": "a_shape", "sink": 0, "window": 64}],
]


def _profile_dict():
    return {"format": FORMAT, "model": dict(MODEL), "settings": {"seqlen": 8192, "recall_target": 0.95},
            "layers": json.loads(json.dumps(LAYERS))}


def test_round_trip(tmp_path):
    p = load_profile(_profile_dict())
    path = save_profile(p, tmp_path / "x.json")
    again = load_profile(path)
    assert again.to_dict() == p.to_dict()
    assert again.layer(0)[0]["recall"] == 0.97  # extra keys survive
    assert again.pattern_counts() == {"vertical_slash": 1, "a_shape": 2, "dense": 2, "block_sparse": 1}
    assert load_profile(again) is again


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["layers"].pop(), "expected 2 layers"),
    (lambda d: d["layers"][1].pop(), "layer 1: expected 3 head dicts"),
    (lambda d: d["layers"][1][2].pop("window"), "layer 1, head 2: .*'window'"),
    (lambda d: d["layers"][0][0].update(pattern="stripes"), "layer 0, head 0: 'pattern' must be one of"),
    (lambda d: d["layers"][0][0].update(slash_size="many"), "layer 0, head 0: 'slash_size' must be an int"),
    (lambda d: d["model"].pop("head_dim"), r"model: missing keys \['head_dim'\]"),
    (lambda d: d.update(format="other/1"), "format"),
    (lambda d: d.update(extra=1), "unknown top-level keys"),
])
def test_validation_errors_name_the_place(edit, match):
    d = _profile_dict()
    edit(d)
    with pytest.raises((ValueError, TypeError), match=match):
        load_profile(d)


def test_missing_file_and_model_mismatch(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file"):
        load_profile(tmp_path / "missing.json")
    p = load_profile(_profile_dict())
    p.check_model(2, 3, 1, 64)
    wrong = "num_layers: profile has 2, model has 30.*num_heads: profile has 3, model has 9"
    with pytest.raises(ValueError, match=wrong):
        p.check_model(30, 9)
    with pytest.raises(IndexError, match="layer"):
        p.layer(2)


def test_find_profile(tmp_path):
    assert profile_filename("HuggingFaceTB/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct.json"
    save_profile(_profile_dict(), tmp_path / "SmolLM2-135M-Instruct.json")
    assert find_profile("HuggingFaceTB/SmolLM2-135M-Instruct", dirs=[tmp_path]).name == "SmolLM2-135M-Instruct.json"
    assert find_profile("smollm2-135m-instruct", dirs=[tmp_path]) is not None
    other = _profile_dict()
    other["model"]["name"] = "some/other-model"
    save_profile(other, tmp_path / "renamed.json")
    assert find_profile("other-model", dirs=[tmp_path]).name == "renamed.json"
    assert find_profile("unknown-model", dirs=[tmp_path]) is None
    assert find_profile("unknown-model", dirs=[tmp_path / "nowhere"]) is None


def test_from_minference_config(tmp_path):
    theirs = [
        {"0": ["vertical_and_slash", 1000, 6096, 0.98], "1": ["stream_llm", 100, 800, 0.9],
         "2": ["block_sparse", 0, 0, 0.5]},
        {"2": ["vertical_and_slash", 30, 800, 1.0], "0": ["vertical_and_slash", 3500, 100, 0.7],
         "1": ["vertical_and_slash", 500, 700, 0.9]},
    ]
    path = tmp_path / "theirs.json"
    path.write_text(json.dumps(theirs))
    info = {k: v for k, v in MODEL.items() if k not in ("num_layers", "num_heads")}
    p = from_minference_config(path, info)
    assert isinstance(p, Profile) and p.num_layers == 2 and p.num_heads == 3
    assert p.layer(0)[0] == {"pattern": "vertical_slash", "vertical_size": 1000, "slash_size": 6096,
                             "minference_score": 0.98}
    assert p.layer(0)[1]["pattern"] == "a_shape" and (p.layer(0)[1]["sink"], p.layer(0)[1]["window"]) == (100, 800)
    assert p.layer(0)[2]["pattern"] == "block_sparse" and p.layer(0)[2]["top_k"] == 100
    assert p.layer(1)[0]["vertical_size"] == 3500  # heads ordered by their number, not by the file
    with pytest.raises(ValueError, match="layer 0, head 1: unknown MInference pattern"):
        from_minference_config([{"0": ["vertical_and_slash", 1, 1, 1], "1": ["stripes", 1, 1, 1]}], MODEL)
    with pytest.raises(ValueError, match="expected 4 head dicts"):
        from_minference_config(theirs, dict(MODEL, num_heads=4))
