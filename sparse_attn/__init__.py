"""sparse_attn: sparse attention for long-context LLM inference."""
from .layouts import BlockLayout, Layout, VerticalSlashLayout
from .patterns import Param, Pattern, get_pattern, list_patterns, register_pattern, unregister_pattern
from . import estimators  # noqa: F401  (registers the built-in patterns)
from .ops import reference_attention
from .methods import get_method, list_methods, sparse_attention
from .profiles import find_profile, load_profile, save_profile
from .recall import attention_recall
from .integrations.hf import get_stats, patch, unpatch

__version__ = "0.1.0"

__all__ = ["Layout", "BlockLayout", "VerticalSlashLayout", "reference_attention", "__version__"]
__all__ += ["Pattern", "Param", "register_pattern", "unregister_pattern", "get_pattern", "list_patterns"]
__all__ += ["sparse_attention", "get_method", "list_methods", "load_profile", "save_profile", "find_profile"]
__all__ += ["attention_recall"]
__all__ += ["patch", "unpatch", "get_stats"]
