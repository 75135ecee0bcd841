"""What one rank of a served model runs: the method of the `sparse_attention_config` block resolved against
the rank's heads (no vLLM import here, so it is testable on its own).

Tensor parallelism gives rank r of tp the query heads [r * Hq / tp, (r + 1) * Hq / tp) and the matching kv heads;
a per-head profile (the mixture method) is written for all Hq heads of the model and is sliced to the rank's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ...kvcache import PAGE_SIZES
from ...methods import check_method_kwargs, check_model, decode_side, get_method
from ...patterns import get_pattern
from ...profiles import Profile, find_profile, load_profile
from ..config import SparseAttentionConfig

__all__ = ["RankSettings", "resolve_settings", "layer_index", "HEAD_SIZES", "not_supported_reasons"]

# Head sizes every kernel family of the package takes (prefill and paged decode).
HEAD_SIZES = (64, 128)


def not_supported_reasons(*, head_size: int, block_size: Optional[int] = None, dtype=None,
                          kv_cache_dtype: Optional[str] = None) -> List[str]:
    """Why the backend cannot serve this configuration (empty: it can)."""
    import torch

    reasons = []
    if head_size not in HEAD_SIZES:
        reasons.append(f"head_size {head_size}: sparse_attn's kernels take {list(HEAD_SIZES)}")
    if block_size is not None and not any(block_size % p == 0 for p in PAGE_SIZES):
        reasons.append(f"block_size {block_size}: the paged kernels read pages of {list(PAGE_SIZES)} tokens "
                       "(a cache block size must be a multiple of one)")
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {dtype}: expected float16, bfloat16 or float32")
    if kv_cache_dtype is not None and kv_cache_dtype not in ("auto", "float16", "bfloat16"):
        reasons.append(f"kv_cache_dtype {kv_cache_dtype!r}: quantized caches are not supported (auto, float16, "
                       "bfloat16)")
    return reasons


def layer_index(layer_name: str) -> int:
    """The decoder layer a vLLM layer name belongs to ("model.layers.12.self_attn.attn" -> 12)."""
    found = re.findall(r"\.(\d+)(?=\.|$)", "." + layer_name)
    if not found:
        raise ValueError(f"layer_name: expected a decoder layer number in {layer_name!r}")
    return int(found[0])


@dataclass
class RankSettings:
    """The method one rank runs. kwargs: the method's merged kwargs for prefill calls (decode keys removed);
    decode: the decode pattern (None: dense paged decode) and its budgets; profile: the model's profile
    (all heads), sliced per layer by head_config(); min_seqlen: the method's dense threshold."""

    method: str
    kwargs: Dict[str, Any]
    decode: Optional[str]
    decode_budgets: Dict[str, Any]
    min_seqlen: int
    num_heads: int
    num_kv_heads: int
    tp_rank: int = 0
    tp_size: int = 1
    profile: Optional[Profile] = None
    _layers: Dict[int, Optional[List[Dict[str, Any]]]] = field(default_factory=dict, repr=False)

    def head_config(self, layer: int) -> Optional[List[Dict[str, Any]]]:
        """This rank's head dicts of decoder layer `layer` (None without a profile)."""
        if self.profile is None:
            return None
        if layer not in self._layers:
            heads = self.profile.layer(layer)
            first = self.tp_rank * self.num_heads
            self._layers[layer] = heads[first:first + self.num_heads]
        return self._layers[layer]

    @property
    def decode_pattern(self):
        return get_pattern(self.decode) if self.decode is not None else None


def resolve_settings(config: Optional[SparseAttentionConfig], *, num_heads: int, num_kv_heads: int,
                     head_size: int, tp_rank: int = 0, tp_size: int = 1, num_layers: Optional[int] = None,
                     model_name: Optional[str] = None) -> RankSettings:
    """The rank's settings for a model whose rank holds num_heads query and num_kv_heads kv heads (already
    divided by tp). A profile is checked against the whole model (num_heads * tp query heads). The mixture
    method without a profile in the block takes patches/<model_name>.json where one exists (as patch() does)."""
    config = config or SparseAttentionConfig()
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank: expected 0 <= tp_rank < tp_size, got rank {tp_rank} of {tp_size}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads: {num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    method = get_method(config.method)
    merged = check_method_kwargs(config.method, dict(config.kwargs))
    check_model(config.method, merged, num_heads, num_kv_heads)
    decode, budgets = decode_side(config.method, merged) if method.name != "dense" else (None, {})
    kwargs = {k: v for k, v in config.kwargs.items() if k not in ("decode", "decode_config")}
    profile, source = None, config.profile
    if source is None and method.mixture and model_name:
        source = find_profile(model_name)
    if source is not None:
        profile = load_profile(source)
        total_kv = num_kv_heads * tp_size if num_kv_heads * tp_size <= profile.model["num_kv_heads"] else None
        profile.check_model(num_layers if num_layers is not None else profile.num_layers, num_heads * tp_size,
                            total_kv, head_size)
    return RankSettings(config.method, kwargs, decode, budgets, int(merged.get("min_seqlen", 0)), num_heads,
                        num_kv_heads, tp_rank, tp_size, profile)
