"""Attention operators: fp32 references and the sparse kernels, one folder per kernel family."""
from .reference import reference_attention

__all__ = ["reference_attention"]
