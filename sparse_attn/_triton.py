"""Triton helpers shared by several kernel families: the interpreter fix, LOG2E, a sorted-row binary
search, the running max / sum of a row softmax, Hopper TMA descriptors and the remembered-launch cache.
Private: kernels import from here, never from another family's kernel module."""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "LOG2E", "count_below", "online_max_sum", "softmax_terms", "tma_descriptors",
           "tensor_descriptor", "LaunchCache", "launch_template"]

# The interpreter is chosen when @triton.jit runs, so whether CPU tensors can run is fixed at import.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

LOG2E = 1.4426950408889634


def _interpreter_index_fix() -> None:
    """The Triton 3.6 interpreter turns a tensor loop bound into an int with int(array of shape (1,)),
    which numpy >= 2.4 refuses; give its tensors an __index__ that takes the single element instead."""
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_sparse_attn_fix", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._sparse_attn_fix = True
    interpreter._patch_lang_tensor = patched


if INTERPRETED:
    _interpreter_index_fix()


@triton.jit
def count_below(row, s_j, count, thr, live, STEPS: tl.constexpr):
    """Per lane: how many of the first `count` (sorted) entries of its row are < thr."""
    lo = tl.zeros_like(count)
    hi = count
    for _ in tl.static_range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        val = tl.load(row + mid.to(tl.int64) * s_j, mask=active & live, other=0)
        right = active & (val < thr)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (val >= thr), mid, hi)
    return lo


@triton.jit
def online_max_sum(m_i, l_i, s):
    """One step of a running row max and row sum of exp2 over base-2 logits s [rows, cols] (-inf where
    masked): (max, sum) after s, with a row that has seen nothing kept at (-inf, 0)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, l_i * tl.exp2(m_i - safe) + tl.sum(tl.exp2(s - safe[:, None]), 1)


@triton.jit
def softmax_terms(m_i, l_i):
    """(shift, scale) of the finished rows: p = exp2(s - shift) * scale; an empty row gets (0, 0)."""
    safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    return safe, tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)


@triton.jit
def order_key(x):
    """int32 keys of float32 x whose signed order is x's order (negative floats: larger magnitude, smaller key):
    what the radix selections histogram, a byte at a time from the top."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def radix_pick(hist, k_rem, hi, FIRST: tl.constexpr):
    """One radix-select step. hist [256]: how many of the keys matching the bytes chosen so far (`hi`, as an
    arithmetic right shift of a matching key gives them) have each value of the next byte (the top byte offset
    by 128 on the first step); k_rem: how many of those keys are still to be taken. Returns (hi with the
    chosen byte appended, the keys still to take among those matching it: the rest are above it)."""
    bins = tl.arange(0, 256)
    at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # matching keys with this byte or a higher one
    chosen = tl.sum((at_least >= k_rem).to(tl.int32), 0) - 1
    k_rem -= tl.sum(tl.where(bins > chosen, hist, 0), 0)
    if FIRST:
        hi = chosen - 128
    else:
        hi = (hi << 8) | chosen
    return hi, k_rem


def tma_descriptors(k, v, block_n: int, packed: bool):
    """TMA descriptors of [B, Hkv, S, D] k and v (block [1, 1, block_n, D]), or (None, None) where TMA
    cannot take them: packed inputs, the interpreter, GPUs before Hopper (no TMA unit), a head dim that
    is not a power of two, strides or bases that are not 16-byte aligned."""
    d = k.shape[-1]
    if packed or INTERPRETED or not k.is_cuda or d != triton.next_power_of_2(d) or d < 16:
        return None, None
    if torch.cuda.get_device_capability(k.device)[0] < 9:
        return None, None
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return None, None
    for t in (k, v):
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((st * es) % 16 for st in t.stride()[:-1]):
            return None, None
    return tensor_descriptor(k, block_n), tensor_descriptor(v, block_n)


def tensor_descriptor(t, block_n: int):
    """The TMA descriptor a kernel reads K or V tiles through: [B, Hkv, S, D], block [1, 1, block_n, D]."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, t.shape[-1]])


def launch_template(jit_fn, positional, constexprs: dict, n_per_call: int) -> list:
    """jit_fn's arguments in signature order (constexprs included, as the JIT passes them to the
    launcher), with the first n_per_call (the per-call tensors) blanked, so none is kept alive."""
    named = dict(zip(jit_fn.arg_names, positional))
    named.update(constexprs)
    template = [named[n] for n in jit_fn.arg_names]
    template[:n_per_call] = [None] * n_per_call
    return template


class LaunchCache:
    """Compiled launches remembered by an input signature, the oldest dropped past `size` entries: a
    repeated call with the same signature skips the input checks and the JIT's argument specialisation
    and launches the compiled kernel directly."""

    def __init__(self, size: int = 64):
        self.size = size
        self._entries: "OrderedDict[tuple, tuple]" = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._entries)

    def get(self, key) -> Optional[tuple]:
        return self._entries.get(key)

    def put(self, key, entry: tuple) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
