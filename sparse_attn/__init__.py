"""sparse_attn: sparse attention for long-context LLM inference."""
from .layouts import BlockLayout, VerticalSlashLayout
from .ops import reference_attention

__version__ = "0.1.0"

__all__ = ["BlockLayout", "VerticalSlashLayout", "reference_attention", "__version__"]
