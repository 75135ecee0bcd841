"""Online estimators: turn (q, k) into a sparse index, cheaply, a few heads and rows at a time."""
from .a_shape import a_shape_layout
from .block_topk import block_topk_layout, estimate_block_topk, pool_blocks
from .vertical_slash import (FORCED_COLUMNS, FORCED_SLASHES, VerticalSlashChoice, diagonal_sums,
                             estimate_vertical_slash)

__all__ = [
    "a_shape_layout",
    "estimate_block_topk",
    "block_topk_layout",
    "pool_blocks",
    "estimate_vertical_slash",
    "VerticalSlashChoice",
    "diagonal_sums",
    "FORCED_COLUMNS",
    "FORCED_SLASHES",
]
