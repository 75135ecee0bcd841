"""The `sparse_attention_config` block of a model's config.json: which method serves the model, read the same
way by the Hugging Face adapter (`sparse_attn.patch(model)` without a method) and the vLLM backend.

    "sparse_attention_config": {
        "method": "minference",                 # a registry name (sparse_attn.list_methods())
        "kwargs": {"min_seqlen": 4096},         # that method's kwargs (get_method(name).help())
        "profile": "sparse_profile.json"        # optional, the mixture method only: a head profile (a path,
    }                                           #   relative to the model's directory, or the profile itself)

The environment variable SPARSE_ATTN_CONFIG overrides the block: a JSON object of the same form, or the path
of a JSON file holding one. Every key is optional (method defaults to "minference"); an unknown key, method or
kwarg is a ValueError / TypeError naming it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from ..methods import MIXTURE, check_method_kwargs, get_method

__all__ = ["SparseAttentionConfig", "read_config", "CONFIG_KEY", "ENV_VAR"]

CONFIG_KEY = "sparse_attention_config"
ENV_VAR = "SPARSE_ATTN_CONFIG"
_KEYS = ("method", "kwargs", "profile")


@dataclass(frozen=True)
class SparseAttentionConfig:
    """A checked configuration block. kwargs are the method's (unmerged: defaults stay the method's);
    profile: a path (resolved against the model's directory) or a profile dict, mixture method only."""

    method: str = MIXTURE
    kwargs: Dict[str, Any] = field(default_factory=dict)
    profile: Union[None, str, Dict[str, Any]] = None
    source: str = "defaults"

    @classmethod
    def from_block(cls, block: Any, *, source: str, base_dir: Union[None, str, os.PathLike] = None
                   ) -> "SparseAttentionConfig":
        where = f"{CONFIG_KEY} ({source})"
        if not isinstance(block, Mapping):
            raise TypeError(f"{where}: expected a JSON object with keys {list(_KEYS)}, got {type(block).__name__}")
        unknown = sorted(set(block) - set(_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {list(_KEYS)}")
        method = block.get("method", MIXTURE)
        if not isinstance(method, str):
            raise TypeError(f"{where}: 'method' must be a method name (str), got {type(method).__name__}")
        try:
            get_method(method)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        kwargs = block.get("kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"{where}: 'kwargs' must be an object of the method's kwargs, got {type(kwargs).__name__}")
        try:
            check_method_kwargs(method, dict(kwargs))
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from None
        profile = block.get("profile")
        if profile is not None:
            if not get_method(method).mixture:
                raise ValueError(f"{where}: a 'profile' applies to the per-head mixture method {MIXTURE!r} only, "
                                 f"got method {method!r}")
            if isinstance(profile, (str, os.PathLike)):
                path = Path(profile).expanduser()
                if not path.is_absolute() and base_dir is not None:
                    path = Path(base_dir) / path
                profile = str(path)
            elif not isinstance(profile, Mapping):
                raise TypeError(f"{where}: 'profile' must be a path or a profile object, got {type(profile).__name__}")
            else:
                profile = dict(profile)
        return cls(method, dict(kwargs), profile, source)


def _model_block(model_config: Any) -> Optional[Any]:
    if model_config is None:
        return None
    if isinstance(model_config, Mapping):
        return model_config.get(CONFIG_KEY)
    return getattr(model_config, CONFIG_KEY, None)


def _env_block(value: str) -> tuple:
    text = value.strip()
    if text.startswith("{"):
        try:
            return json.loads(text), f"${ENV_VAR}", None
        except json.JSONDecodeError as e:
            raise ValueError(f"${ENV_VAR}: not valid JSON ({e})") from None
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError(f"${ENV_VAR}: expected a JSON object or the path of a JSON file, got {value!r}")
    with open(path) as f:
        block = json.load(f)
    if isinstance(block, Mapping) and CONFIG_KEY in block:  # a whole config.json
        block = block[CONFIG_KEY]
    return block, f"${ENV_VAR}={path}", path.parent


def read_config(model_config: Any = None, *, model_dir: Union[None, str, os.PathLike] = None,
                environ: Optional[Mapping[str, str]] = None) -> Optional[SparseAttentionConfig]:
    """The checked configuration: $SPARSE_ATTN_CONFIG if set, else the model config's block (a transformers
    config object or a config.json dict), else None. model_dir resolves a relative profile path."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_VAR):
        block, source, base = _env_block(environ[ENV_VAR])
        return SparseAttentionConfig.from_block(block, source=source, base_dir=base or model_dir)
    block = _model_block(model_config)
    if block is None:
        return None
    return SparseAttentionConfig.from_block(block, source="config.json", base_dir=model_dir)


def patch_arguments(model, method: Optional[str], config: Any, method_kwargs: Dict[str, Any]):
    """(method, profile, kwargs) for `sparse_attn.patch`: what the caller passed, and where the method is
    None the model's block ($SPARSE_ATTN_CONFIG, then config.json; the caller's kwargs and profile win over
    the block's), else the default mixture method."""
    if method is not None:
        return method, config, method_kwargs
    model_config = getattr(model, "config", None)
    base = getattr(model_config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    block = read_config(model_config, model_dir=base if base and Path(str(base)).is_dir() else None)
    if block is None:
        return MIXTURE, config, method_kwargs
    return block.method, config if config is not None else block.profile, {**block.kwargs, **method_kwargs}
