"""Writing a step's keys and values into vLLM's paged cache: token t goes to slot `slot_mapping[t]` (block
slot // block_size, row slot % block_size); slot -1 (padding) writes nothing.

One Triton program per (token, kv head) on CUDA (and under the Triton interpreter): no host sync, no
shape that depends on the data, so a decode step that writes is CUDA-graph capturable. Elsewhere a torch
reference with a boolean mask (eager only).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..._triton import INTERPRETED  # noqa: F401  (importing it applies the interpreter fix)

__all__ = ["write_kv", "write_kv_reference"]


@triton.jit
def _write_kernel(K, V, KC, VC, SLOTS, s_kt, s_kh, s_kd, s_vt, s_vh, s_vd,
                  c_kb, c_kt, c_kh, c_kd, c_vb, c_vt, c_vh, c_vd,
                  BS: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    slot = tl.load(SLOTS + t).to(tl.int64)
    d = tl.arange(0, DP)
    ok = (d < D) & (slot >= 0)
    blk = tl.maximum(slot, 0) // BS
    row = tl.maximum(slot, 0) % BS
    k = tl.load(K + t * s_kt + h * s_kh + d * s_kd, mask=ok)
    v = tl.load(V + t * s_vt + h * s_vh + d * s_vd, mask=ok)
    tl.store(KC + blk * c_kb + row * c_kt + h * c_kh + d * c_kd, k, mask=ok)
    tl.store(VC + blk * c_vb + row * c_vt + h * c_vh + d * c_vd, v, mask=ok)


def write_kv_reference(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    n = min(key.shape[0], slot_mapping.shape[0])
    slots = slot_mapping[:n].long()
    live = slots >= 0
    bs = key_cache.shape[1]
    blk, row = slots[live] // bs, slots[live] % bs
    key_cache[blk, row] = key[:n][live].to(key_cache.dtype)
    value_cache[blk, row] = value[:n][live].to(value_cache.dtype)


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """key, value [T, Hkv, D] into key_cache, value_cache [num_blocks, block_size, Hkv, D] (any strides)
    at slot_mapping [>= T'] (the first min(T, len(slot_mapping)) tokens)."""
    if key.dtype != key_cache.dtype or not (key.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        write_kv_reference(key, value, key_cache, value_cache, slot_mapping)
        return
    n = min(key.shape[0], slot_mapping.shape[0])
    if n == 0:
        return
    d = key.shape[-1]
    _write_kernel[(n, key.shape[1])](
        key, value, key_cache, value_cache, slot_mapping, *key.stride(), *value.stride(),
        *key_cache.stride(), *value_cache.stride(), BS=key_cache.shape[1], D=d, DP=triton.next_power_of_2(d),
        num_warps=1)
