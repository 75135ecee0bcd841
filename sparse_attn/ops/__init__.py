"""Attention operators: fp32 references and the sparse kernels, one folder per kernel family."""
from .block_sparse import block_sparse_attention
from .reference import reference_attention, sdpa_layout_attention

__all__ = ["block_sparse_attention", "reference_attention", "sdpa_layout_attention"]
