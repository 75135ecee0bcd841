"""The built-in patterns, one module (or folder) each: its online estimator, its index builder and its
registry entry (sparse_attn.patterns). Importing this package registers them."""
from . import (a_shape, block_sparse, flexprefill, hierarchical, page_mean, quest, vertical_slash,  # noqa: F401
               xattention)  # (each registers its pattern)
from .a_shape import a_shape_layout
from .block_sparse import block_topk_layout, estimate_block_topk, pool_blocks
from .quest import quest_select
from .vertical_slash import (FORCED_COLUMNS, FORCED_SLASHES, VerticalSlashChoice, build_vertical_slash_index,
                             diagonal_sums, estimate_vertical_slash)

__all__ = [
    "a_shape_layout",
    "quest_select",
    "estimate_block_topk",
    "block_topk_layout",
    "pool_blocks",
    "estimate_vertical_slash",
    "build_vertical_slash_index",
    "VerticalSlashChoice",
    "diagonal_sums",
    "FORCED_COLUMNS",
    "FORCED_SLASHES",
]
