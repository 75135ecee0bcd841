"""Per-layer density of what the vLLM backend computed: a hook for the user and a periodic log line.

Off by default (reading densities back costs a device sync per layer). `enable_stats(log_every=N)` in the
engine's process, or SPARSE_ATTN_LOG_EVERY=N in its environment (worker processes included), turns it on;
every N steps the backend logs one line per phase through vLLM's logger ("vllm.sparse_attn"). Steps are
counted in Python, so decode steps replayed from a full CUDA graph are not seen (prefill, mixed batches and
eager decode are).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

__all__ = ["ServingStats", "enable_stats", "disable_stats", "get_stats", "LOG_ENV"]

LOG_ENV = "SPARSE_ATTN_LOG_EVERY"
logger = logging.getLogger("vllm.sparse_attn")


@dataclass
class ServingStats:
    """Per decoder layer, the density (computed / causal entries, or pages read / pages held) of its latest
    prefill (mean over the step's prefill sequences and heads) and decode (mean over sequences and heads)."""

    enabled: bool = False
    log_every: int = 0
    steps: int = 0
    prefill: Dict[int, float] = field(default_factory=dict)
    decode: Dict[int, torch.Tensor] = field(default_factory=dict)  # kept on the device until read

    def density(self, phase: str = "prefill") -> Optional[float]:
        """Mean over layers, or None before a step of that phase."""
        layers = self._phase(phase)
        if not layers:
            return None
        return sum(float(v) for v in layers.values()) / len(layers)

    def layers(self, phase: str = "prefill") -> Dict[int, float]:
        return {i: float(v) for i, v in sorted(self._phase(phase).items())}

    def _phase(self, phase: str):
        if phase not in ("prefill", "decode"):
            raise ValueError(f"phase: expected 'prefill' or 'decode', got {phase!r}")
        return self.prefill if phase == "prefill" else self.decode

    def line(self, phase: str) -> str:
        per = " ".join(f"{i}:{d:.3f}" for i, d in self.layers(phase).items())
        return f"sparse_attn step {self.steps}: {phase} density {self.density(phase):.3f} (per layer {per})"

    def step(self) -> None:
        """Called once per forward pass (by the first layer)."""
        self.steps += 1
        if self.log_every and self.steps % self.log_every == 0:
            for phase in ("prefill", "decode"):
                if self._phase(phase):
                    logger.info(self.line(phase))

    def reset(self) -> None:
        self.steps = 0
        self.prefill.clear()
        self.decode.clear()


_STATS = ServingStats()
if os.environ.get(LOG_ENV, "").strip():
    _STATS.enabled, _STATS.log_every = True, max(0, int(os.environ[LOG_ENV]))


def enable_stats(log_every: int = 0) -> ServingStats:
    """Record per-layer densities in this process (and log them every `log_every` steps; 0: never)."""
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 0:
        raise ValueError(f"log_every: expected an int >= 0, got {log_every!r}")
    _STATS.enabled, _STATS.log_every = True, log_every
    _STATS.reset()
    return _STATS


def disable_stats() -> None:
    _STATS.enabled = False


def get_stats() -> ServingStats:
    return _STATS
