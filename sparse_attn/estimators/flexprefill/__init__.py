"""FlexPrefill pattern: per sequence and head, query-aware key blocks or vertical-slash columns and
diagonals, whichever the last queries say fits, each the fewest that reach a cumulative attention mass
gamma. The rules and the choice of layout are in select.py; the fused pooled scoring in probs_triton.py;
the last queries' column and diagonal masses come from the vertical-slash scorer."""
from __future__ import annotations

from typing import Any, Dict, List

from ...layouts import VerticalSlashLayout
from ...patterns import Param, Pattern, register_pattern
from .select import (BLOCK_SIZES, DEFAULT_MIN_BUDGET, FlexChoice, check_budgets, flexprefill_choice,
                     flexprefill_layout, select_query_aware, select_vertical_slash, take_until)

__all__ = ["flexprefill_choice", "flexprefill_layout", "FlexChoice", "take_until", "select_query_aware",
           "select_vertical_slash", "check_budgets", "BLOCK_SIZES", "PATTERN"]


def _estimate(q, k, budgets, *, causal: bool, scale, block_size: int, min_budget=None) -> FlexChoice:
    return flexprefill_choice(q, k, budgets["gamma"], budgets["tau"], block_size=block_size, min_budget=min_budget,
                              scale=scale)


def _build(choice: FlexChoice, q, k, budgets, *, causal: bool, block_size: int,
           min_budget=None) -> VerticalSlashLayout:
    # On the CPU the torch index builder ("auto" would pick the Triton interpreter under TRITON_INTERPRET=1).
    return flexprefill_layout(choice, q.shape[2], k.shape[2], block_size=block_size,
                              backend="auto" if q.is_cuda else "torch")


_GAMMAS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def _candidates(seqlen: int, block_size: int) -> List[Dict[str, Any]]:
    """gamma 0.8 .. 0.98 with tau 0 (always vertical-slash), 0.1 (the rule decides) and 1 (always
    query-aware)."""
    return [{"gamma": g, "tau": t} for g in (0.8, 0.9, 0.95, 0.98) for t in (0.0, 0.1, 1.0)]


def _sweep(seqlen: int, block_size: int) -> List[Dict[str, Any]]:
    """gamma over _GAMMAS; the key floor follows the length below 32K keys (the default, 1024, covers most
    of a short row), so that every entry is sparse at any length."""
    return [{"gamma": g, "tau": 0.1, "min_budget": min(DEFAULT_MIN_BUDGET, seqlen // 32)} for g in _GAMMAS]


PATTERN = register_pattern(Pattern(
    name="flexprefill",
    summary="FlexPrefill: per head query-aware blocks or vertical-slash, the fewest reaching a mass gamma",
    layout=VerticalSlashLayout,
    budgets=(Param("gamma", float, 0.9, 1e-9, 1.0, doc="cumulative attention mass each selection reaches"),
             Param("tau", float, 0.1, 0.0, 1.0,
                   doc="Jensen-Shannon threshold: below it the head is query-aware, else vertical-slash")),
    options=(Param("min_budget", int, None, 0, optional=True,
                   doc="keys per row kept at least: ceil(min_budget / block_size) key blocks (query-aware "
                       "heads), or the min_budget best columns and the min_budget nearest diagonals, a local window "
                       "(vertical-slash heads); None: 1024, as FlexPrefill's published runs use at every length"),),
    estimate=_estimate,
    build=_build,
    full_budget=lambda seqlen_q, seqlen_k, block_size: {"gamma": 1.0, "tau": 0.1},
    candidates=_candidates,
    sweep=_sweep,
    # The last block_size queries against every key, and pooled blocks against each other.
    estimator_cost=lambda seqlen, *, block_size, **options: min(block_size, seqlen) / seqlen + 0.5 / block_size ** 2,
    speed_tflops=393.0,  # the vertical-slash kernel's measured rate
    check_model=lambda options, num_heads, num_kv_heads: None,
    color="tab:red",
))
