"""Vertical-slash sparse attention (MInference 1.0): the index builder (Triton, CUDA, PyTorch) and the
Triton kernel over contiguous key ranges plus gathered key columns."""
from .index import build_vertical_slash_index
from .kernel import not_supported_reasons, vertical_slash_attention

__all__ = ["build_vertical_slash_index", "vertical_slash_attention", "not_supported_reasons"]
