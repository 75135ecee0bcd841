"""Prompt building (fast, with a character tokenizer) and the demo end to end on SmolLM2 (slow)."""
import types

import pytest
import torch

from sparse_attn.models import answer_has_key, passkey_prompt, text_ids


class CharTokenizer:
    """Just enough of a Hugging Face tokenizer: one id per character, no chat template."""

    bos_token, bos_token_id, chat_template = None, None, None

    def __call__(self, text, add_special_tokens=False):
        return types.SimpleNamespace(input_ids=[ord(c) % 256 for c in text])

    def decode(self, ids):
        return "".join(map(chr, ids))


@pytest.mark.parametrize("length, depth", [(600, 0.0), (1000, 0.5), (777, 1.0)])
def test_passkey_prompt_has_exact_length_and_the_key_at_depth(length, depth):
    tok = CharTokenizer()
    p = passkey_prompt(tok, length, depth, seed=3)
    text = tok.decode(p.input_ids[0].tolist())
    assert p.input_ids.shape == (1, length) and p.length == length
    assert len(p.key) == 5 and text.count(p.key) == 2
    at = text.index(p.key) / length
    assert abs(at - depth) < 0.25
    assert text.rstrip().endswith("The pass key is")
    assert passkey_prompt(tok, length, depth, seed=3).key == p.key  # deterministic


def test_passkey_prompt_rejects_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(CharTokenizer(), 600, 1.5, seed=0)
    with pytest.raises(ValueError, match="length: expected at least"):
        passkey_prompt(CharTokenizer(), 50, 0.5, seed=0)


def test_text_ids_and_answer_check():
    ids = text_ids(CharTokenizer(), 300, seed=1)
    assert ids.shape == (1, 300) and ids.dtype == torch.long
    assert answer_has_key(" 12 345.", "12345") and not answer_has_key("1234", "12345")


@pytest.mark.slow
def test_demo_runs_on_smollm2(capsys):
    pytest.importorskip("gguf")
    from sparse_attn.demo import main

    main(["--length", "1200", "--method", "a_shape", "--max-new-tokens", "3", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "dense" in out and "a_shape" in out and "density" in out
