"""Input validation shared by every public entry point.

Errors name the argument and say what was expected, so a caller never has to read a kernel
to learn why a call was refused.
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence

import torch

logger = logging.getLogger("sparse_attn")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32,)

_warned: set = set()


def warn_once(key: str, message: str) -> None:
    """Log a warning the first time `key` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[Sequence[int] | int] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    device: Optional[torch.device] = None,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            raise ValueError(
                f"{name}: expected a tensor with {' or '.join(map(str, allowed))} dimensions, "
                f"got shape {tuple(t.shape)}"
            )
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")


def check_positive_int(name: str, value, *, multiple_of: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if multiple_of is not None and value % multiple_of:
        raise ValueError(f"{name}: expected a multiple of {multiple_of}, got {value}")
    return value


def check_cu_seqlens(name: str, cu: torch.Tensor, batch: int, total: int, device) -> None:
    """cu_seqlens: int32 [batch + 1], starts at 0, non-decreasing, ends at `total`."""
    check_tensor(name, cu, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if cu.numel() != batch + 1:
        raise ValueError(f"{name}: expected {batch + 1} entries (batch + 1), got {cu.numel()}")
    c = cu.cpu()
    if c[0].item() != 0:
        raise ValueError(f"{name}: expected the first entry to be 0, got {c[0].item()}")
    if (c[1:] < c[:-1]).any():
        raise ValueError(f"{name}: expected non-decreasing offsets, got {c.tolist()}")
    if c[-1].item() != total:
        raise ValueError(
            f"{name}: expected the last entry to equal the number of packed tokens ({total}), "
            f"got {c[-1].item()}"
        )
