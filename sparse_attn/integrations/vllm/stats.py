"""Per-layer density of what the vLLM backend computed: a hook for the user and a periodic log line.

Off by default (reading densities back costs a device sync per layer). `enable_stats(log_every=N)` in the
engine's process, or SPARSE_ATTN_LOG_EVERY=N in its environment (worker processes included), turns it on;
every N steps the backend logs one line per phase through vLLM's logger ("vllm.sparse_attn"), covering the
steps since the previous line. Steps are
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
    """Per decoder layer, the density since enable_stats() / reset(): prefill, computed over causal entries
    (mean over heads, weighted by each prefill chunk's queries); decode, tokens read over tokens cached (mean
    over sequences and heads, per step). `prefill` / `decode` map a layer to [sum, weight] (decode sums stay
    on the device until read)."""

    enabled: bool = False
    log_every: int = 0
    steps: int = 0
    prefill: Dict[int, list] = field(default_factory=dict)
    decode: Dict[int, list] = field(default_factory=dict)

    def add(self, phase: str, layer: int, density, weight: float = 1.0) -> None:
        acc = self._phase(phase).setdefault(layer, [0.0, 0.0])
        acc[0] = acc[0] + density * weight
        acc[1] += weight

    def density(self, phase: str = "prefill") -> Optional[float]:
        """Mean over layers, or None before a step of that phase."""
        layers = self._phase(phase)
        if not layers:
            return None
        values = self.layers(phase)
        return sum(values.values()) / len(values)

    def layers(self, phase: str = "prefill") -> Dict[int, float]:
        return {i: float(total) / weight for i, (total, weight) in sorted(self._phase(phase).items())}

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
            self.prefill.clear()  # each line covers the steps since the previous one
            self.decode.clear()

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
