"""Adapters that plug sparse attention into serving stacks (Hugging Face transformers here)."""
from .hf import AttentionStats, LayerStats, get_stats, is_patched, patch, unpatch

__all__ = ["patch", "unpatch", "get_stats", "is_patched", "AttentionStats", "LayerStats"]
