"""Offline per-head pattern profiler: which sparse pattern, at which budget, each head of a model needs.

    profile, scores = profile_model(model, input_ids, target=0.95)   # or budget=0.3 (mean cost)
    save_profile(profile, "patches/SmolLM2-135M-Instruct.json")

One forward pass over calibration text. A capturing attention function (registered through transformers'
AttentionInterface, as sparse_attn.patch does) receives every layer's queries and keys after RoPE, runs
dense SDPA so the forward goes on, and scores that layer's candidates at once; only one layer's q/k is
alive at a time. Per layer:
1. block mass: for every (query head, 64-row query block, key) the softmax mass of the block's rows,
   computed in row chunks (never seq x seq). Our layouts keep the same keys for every row of a query
   block, so any candidate's recall (sparse_attn.recall's definition) is a sum over this [H, nq, Sk]
   tensor, which each layout computes its own cheapest way (Layout.kept: whole key blocks, or prefix-sum
   differences over ranges plus single columns). It equals attention_recall exactly (tests check it) at a
   fraction of the cost.
2. candidates (default_candidates): every registered pattern's grid at the profiling length
   (Pattern.candidates), and dense. Each is planned exactly as the runtime plans it (same estimators,
   options and block size), so the recall is that of the method as run.
3. cost per candidate and head (candidate_cost): computed entries (density) weighted by the kernels'
   measured speed (Pattern.speed_tflops, or plain FLOPs with cost="flops"), plus the estimator's own
   FLOPs (Pattern.estimator_cost).
Selection: per head the cheapest candidate whose recall meets `target` (dense always does), or, with
`budget`, a greedy over all heads that spends a mean cost on the best recall gain per unit cost, from
each head's cheapest candidate or, with `floor`, only among the candidates that meet the floor and the
tail target (so every head keeps at least what the threshold rule would give it).
Recall is required twice: over all rows, and over the last query block alone (tail_recall). The mean
over 8K rows hides retrieval heads: on plain text they look local, and an A-shape head keeps 0.97 of
their mass, yet on a pass-key prompt the question's rows must reach the key thousands of tokens back.
The CLI therefore calibrates on a pass-key prompt (pydoc text, a key at half depth, a question at the
end): the last block's rows are the question, and a head that reads the key fails the tail there.
The tail target defaults to 0.98: with 0.95 (mean density 0.27 on SmolLM2 at 8K) the pass key was lost
on one of two 4K prompts that dense answers; with 0.98 (density 0.33) on neither. The budget greedy
alone (density 0.355) kept next-token agreement higher but lost the key of the demo's 4K prompt: a few
retrieval heads fell below the tail target where the greedy found recall cheaper elsewhere. A floor
(0.95, tail 0.98) and the budget on top kept both.

Budgets are stored as each pattern defines them (absolute token or key-block counts for the built-in
ones, the MInference convention) and applied unchanged at any length: a local window, the
sink tokens and the offsets of strong diagonals are properties of the head, not of the prompt length,
so a profile taken at 8K gives a density that falls like 1/length at 128K, which is the point of
sparsity. The price: heads whose mass spreads as the context grows lose recall at lengths far above
the profiled one; settings.seqlen records the profiled length, and each head records the recall and
density measured there.
"""
from __future__ import annotations

import contextlib
import heapq
import math
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

from .dispatch import plan_pattern
from .layouts import KeySums
from .patterns import DENSE, DENSE_TFLOPS, all_options, get_pattern, mixture_default, patterns
from .profiles import Profile

__all__ = [
    "speed_tflops",
    "default_candidates",
    "candidate_cost",
    "block_mass",
    "mass_recall",
    "score_candidates",
    "head_config_scores",
    "select_heads",
    "select_budget",
    "select_layer_target",
    "sample_query_blocks",
    "capture_qk",
    "LayerScores",
    "profile_model",
    "compare_uniform",
    "plot_profile",
    "peak_rss_mib",
]

COSTS = ("time", "flops")
# Candidate layouts of one pattern built at a time by score_candidates.
_LAYOUT_BATCH = 4
# Query blocks a profile scores recall on by default (sample_query_blocks): every block up to 16K tokens.
SAMPLED_QUERY_BLOCKS = 256
# Element budget of one chunk of scores in block_mass (float32 heads x rows x keys): 2**25 is 128 MiB.
_CHUNK_ELEMENTS = 1 << 25


def _powers(low: int, high: int) -> List[int]:
    return [low << i for i in range(64) if low << i <= high]


def speed_tflops() -> Dict[str, float]:
    """Effective TFLOP/s of computed entries per pattern (and dense): cost="time" weighs each computed
    entry by 1 / speed, in units of dense time."""
    return {DENSE: DENSE_TFLOPS, **{p.name: p.speed_tflops for p in patterns()}}


def default_candidates(seqlen: int, block_size: int = 64) -> List[Dict[str, Any]]:
    """The candidate grid for a profiling length (head dicts): every registered prefill pattern's own grid
    (Pattern.candidates), then dense."""
    out = [{"pattern": p.name, **c} for p in patterns() if p.prefill for c in p.candidates(seqlen, block_size)]
    return out + [{"pattern": DENSE}]


def candidate_cost(pattern: str, density, seqlen: int, /, *, cost: str = "time", block_size: int = 64, **options):
    """Cost of a candidate in units of dense attention (dense = 1): its computed entries (density), times
    dense's speed / the pattern's (Pattern.speed_tflops) with cost="time", plus its estimator's FLOPs
    relative to dense causal attention's (Pattern.estimator_cost, given the pattern's options)."""
    if cost not in COSTS:
        raise ValueError(f"cost: expected one of {COSTS}, got {cost!r}")
    if pattern == DENSE:
        return density * 1.0
    p = get_pattern(pattern)
    weight = DENSE_TFLOPS / p.speed_tflops if cost == "time" else 1.0
    return density * weight + p.estimator_cost(seqlen, block_size=block_size, **p.run_options(options))


def sample_query_blocks(seqlen: int, block_size: int = 64, count: Optional[int] = None) -> Optional[torch.Tensor]:
    """The query blocks a profile scores recall on: None (every block) where there are at most `count`
    (default SAMPLED_QUERY_BLOCKS), else `count` blocks spread evenly over the prompt, the first and the
    last among them (int64, ascending). Scoring every block at 128K would hold [heads, 2048, 128K] floats
    several times over; the sample's recall is that of its rows, its density stays exact (the layout's)."""
    count = SAMPLED_QUERY_BLOCKS if count is None else count
    if not isinstance(count, int) or isinstance(count, bool) or count < 2:
        raise ValueError(f"query_blocks: expected an int >= 2 (query blocks to score), got {count!r}")
    nq = -(-seqlen // block_size)
    if nq <= count:
        return None
    return torch.linspace(0, nq - 1, count, dtype=torch.float64).round().long().unique()


def block_mass(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 64, scale: Optional[float] = None,
               chunk_elements: int = _CHUNK_ELEMENTS, query_blocks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float32 [Hq, ceil(S / block_size), S]: per query head, query block and key, the causal softmax mass
    that the block's rows put on the key (self-attention, batch 1, q [1, Hq, S, D], k [1, Hkv, S, D]).
    query_blocks (ascending block ids): only those blocks' rows, [Hq, len(query_blocks), S]."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != 1 or k.shape[0] != 1 or q.shape[2] != k.shape[2]:
        raise ValueError(f"q, k: expected [1, Hq, S, D] and [1, Hkv, S, D] (batch 1, self-attention), "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    _, hq, s, d = q.shape
    hkv = k.shape[1]
    scale = d ** -0.5 if scale is None else float(scale)
    nq = -(-s // block_size)
    if query_blocks is None:
        ids = list(range(nq))
    else:
        ids = torch.as_tensor(query_blocks, dtype=torch.int64).flatten().tolist()
        if any(b < 0 or b >= nq for b in ids) or any(b1 <= b0 for b0, b1 in zip(ids, ids[1:])):
            raise ValueError(f"query_blocks: expected ascending block ids in [0, {nq}), got {ids}")
    mass = torch.zeros(hq, len(ids), s, dtype=torch.float32, device=q.device)
    per_chunk = max(1, chunk_elements // (hq * s * block_size))  # whole query blocks per chunk
    kb = k[0].float().unsqueeze(1)  # [Hkv, 1, S, D]
    for c0 in range(0, len(ids), per_chunk):
        blocks = ids[c0 : c0 + per_chunk]
        rows = torch.cat([torch.arange(b * block_size, min(s, (b + 1) * block_size)) for b in blocks]).to(q.device)
        keys = int(rows[-1]) + 1  # causal: later keys carry no mass for these rows
        qc = q[0, :, rows].float().unflatten(0, (hkv, hq // hkv))
        scores = torch.matmul(qc, kb[:, :, :keys].transpose(-1, -2)).flatten(0, 1) * scale
        above = torch.arange(keys, device=q.device)[None, :] > rows[:, None]
        p = torch.softmax(scores.masked_fill_(above, float("-inf")), dim=-1)
        del scores
        # Each row's mass to its block's slot among this chunk's blocks.
        slot = torch.searchsorted(torch.tensor(blocks, device=q.device), torch.div(rows, block_size,
                                                                                    rounding_mode="floor"))
        mass[:, c0 : c0 + len(blocks), :keys].index_add_(1, slot, p)
    return mass


def _causal_counts(num_heads: int, seqlen: int, block_size: int) -> torch.Tensor:
    """float32 [H, nq, S] (an expanded view): how many rows of each query block see each key causally."""
    q0 = torch.arange(0, seqlen, block_size)[:, None]
    q1 = (q0 + block_size).clamp(max=seqlen)
    key = torch.arange(seqlen)[None, :]
    return (q1 - torch.maximum(key, q0)).clamp(min=0).float().expand(num_heads, -1, -1)


class _Meter:
    """Recall (from block_mass) and density (from causal counts) of any batch-1 layout, exactly as
    attention_recall and layout.head_density define them, from sums prepared once per layer. With
    query_blocks (the blocks block_mass scored, the last among them) recall is that of those blocks' rows
    and density the layout's own (every row)."""

    def __init__(self, mass: torch.Tensor, block_size: int, query_blocks: Optional[torch.Tensor] = None):
        h, nq, s = mass.shape
        self.sampled = query_blocks is not None
        self.mass = KeySums.of(mass, block_size, query_blocks)
        last_rows = s - (-(-s // block_size) - 1) * block_size
        if self.sampled:
            blocks = self.mass.query_blocks
            if int(blocks[-1]) != -(-s // block_size) - 1:
                raise ValueError("query_blocks: expected the last query block among them (the tail recall's rows)")
            self.rows = block_size * (len(blocks) - 1) + last_rows
        else:
            self.rows = s
            self.counts = KeySums.of(_causal_counts(h, s, block_size), block_size)
            self.total = s * (s + 1) / 2
        self.last_rows = last_rows

    def recall(self, layout) -> torch.Tensor:
        return layout.kept(self.mass).sum(-1) / self.rows

    def tail_recall(self, layout) -> torch.Tensor:
        """Recall of the last query block alone: the rows the vertical-slash estimator reads and where a
        prompt's question is, so where a retrieval head must see far back."""
        return layout.kept(self.mass)[:, -1] / self.last_rows

    def density(self, layout) -> torch.Tensor:
        if self.sampled:
            return layout.head_density(causal=True)[0]
        return layout.kept(self.counts).sum(-1) / self.total


def mass_recall(layout, mass: torch.Tensor, block_size: int = 64,
                query_blocks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float64 [H]: attention recall of a batch-1 layout (query blocks of block_size rows) from block_mass
    (of the query blocks listed, when given)."""
    return _Meter(mass, block_size, query_blocks).recall(layout)


@dataclass
class LayerScores:
    """One layer's candidates scored per query head, float64 [n_candidates, H]: recall (all rows),
    tail_recall (the last query block) and density."""

    candidates: List[Dict[str, Any]]
    recall: torch.Tensor
    density: torch.Tensor
    tail_recall: Optional[torch.Tensor] = None


def score_candidates(q, k, candidates: Sequence[Dict[str, Any]], *, block_size: int = 64,
                     scale: Optional[float] = None, mass: Optional[torch.Tensor] = None,
                     query_blocks: Optional[torch.Tensor] = None, **options) -> LayerScores:
    """Recall and density of every candidate on every query head of one layer (batch 1, self-attention).
    options: the patterns' per-call options (defaults where absent), as the runtime would use them.
    query_blocks: score recall on these query blocks' rows only (sample_query_blocks; mass, when given,
    must be theirs)."""
    if mass is None:
        mass = block_mass(q, k, block_size=block_size, scale=scale, query_blocks=query_blocks)
    meter = _Meter(mass, block_size, query_blocks)
    h = q.shape[1]
    recall = torch.ones(len(candidates), h, dtype=torch.float64)
    density = torch.ones(len(candidates), h, dtype=torch.float64)
    tail = torch.ones(len(candidates), h, dtype=torch.float64)
    by_pattern: Dict[str, List[int]] = {}
    for i, cfg in enumerate(candidates):
        if cfg["pattern"] != DENSE:
            by_pattern.setdefault(cfg["pattern"], []).append(i)
    for name, ids in by_pattern.items():
        p = get_pattern(name)
        for c0 in range(0, len(ids), _LAYOUT_BATCH):  # a batch of layouts alive at a time (long prompts)
            batch = ids[c0 : c0 + _LAYOUT_BATCH]
            layouts = p.make_layouts(q, k, [candidates[i] for i in batch], causal=True, scale=scale,
                                     block_size=block_size, **p.run_options(options))
            for i, layout in zip(batch, layouts):
                recall[i] = meter.recall(layout)
                density[i] = meter.density(layout)
                tail[i] = meter.tail_recall(layout)
            del layouts
    return LayerScores(list(candidates), recall, density, tail)


def head_config_scores(q, k, head_config: Sequence[Dict[str, Any]], *, block_size: int = 64,
                       scale: Optional[float] = None, mass: Optional[torch.Tensor] = None,
                       query_blocks: Optional[torch.Tensor] = None, **options):
    """(recall, density), float64 [H] each, of one layer's per-head config as the runtime plans it
    (dispatch.plan_pattern, one plan per pattern over all heads with per-head budgets); dense heads 1.
    query_blocks: as score_candidates."""
    if mass is None:
        mass = block_mass(q, k, block_size=block_size, scale=scale, query_blocks=query_blocks)
    meter = _Meter(mass, block_size, query_blocks)
    h = q.shape[1]
    recall = torch.ones(h, dtype=torch.float64)
    density = torch.ones(h, dtype=torch.float64)
    for pattern in sorted({c["pattern"] for c in head_config} - {DENSE}):
        heads = [i for i, c in enumerate(head_config) if c["pattern"] == pattern]
        # Heads of other patterns borrow a config of this one; their rows of the layout are not read.
        configs = [c if c["pattern"] == pattern else head_config[heads[0]] for c in head_config]
        layout = plan_pattern(pattern, q, k, configs, causal=True, scale=scale, block_size=block_size, **options)
        recall[heads] = meter.recall(layout)[heads]
        density[heads] = meter.density(layout)[heads]
    return recall, density


def _worst(scores: LayerScores) -> torch.Tensor:
    """The lower of recall and tail_recall (recall alone when the tail was not scored)."""
    return scores.recall if scores.tail_recall is None else torch.minimum(scores.recall, scores.tail_recall)


def select_heads(scores: LayerScores, target: float, cost: torch.Tensor,
                 tail_target: Optional[float] = None) -> List[int]:
    """Per head the index of the cheapest candidate whose recall reaches target and whose tail_recall
    (when scored) reaches tail_target (default: target), the earlier one on a tie; a head that no
    candidate brings there gets the candidate with the highest of the lower of the two recalls."""
    mask = floor_mask(scores, target, tail_target)
    return torch.where(mask, cost, torch.full_like(cost, math.inf)).argmin(0).tolist()


def floor_mask(scores: LayerScores, floor: float, tail_target: Optional[float] = None) -> torch.Tensor:
    """bool [candidates, heads]: the candidates whose recall reaches floor and whose tail_recall (when
    scored) reaches tail_target (default: floor); a head that none reaches keeps only the candidate with
    the highest of the lower of its two recalls (as select_heads falls back)."""
    ok = scores.recall >= floor
    if scores.tail_recall is not None:
        ok &= scores.tail_recall >= (floor if tail_target is None else tail_target)
    best = torch.zeros_like(ok)
    best[_worst(scores).argmax(0), torch.arange(ok.shape[1])] = True
    return torch.where(ok.any(0, keepdim=True), ok, best)


def _hull(costs: Sequence[float], recalls: Sequence[float]) -> List[int]:
    """Indices on the upper-left convex hull of (cost, recall), by increasing cost: the only upgrades a
    greedy spending a cost budget on recall should consider."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -recalls[i]))
    hull: List[int] = []
    for i in order:
        if hull and recalls[i] <= recalls[hull[-1]]:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or below the segment a -> i: drop it.
            if (recalls[b] - recalls[a]) * (costs[i] - costs[a]) <= (recalls[i] - recalls[a]) * (costs[b] - costs[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def select_layer_target(scores: LayerScores, cost: torch.Tensor, target: float,
                        allowed: Optional[torch.Tensor] = None) -> List[int]:
    """Per head the candidate index, so that the layer's mean recall (per head the lower of recall and
    tail_recall) reaches `target` at little cost: every head starts at its cheapest (allowed) candidate,
    then the step along one head's cost-recall hull that buys the most recall per unit cost is taken, again
    and again, until the mean reaches target (or no head has a better candidate). Heads that are cheap to
    keep whole pay for heads whose mass is spread (a near-uniform head costs its recall in density)."""
    worst = _worst(scores)
    num_heads = worst.shape[1]
    c_all, r_all = cost.tolist(), worst.tolist()  # [candidate][head]
    options = [list(range(len(c_all))) if allowed is None else allowed[:, h].nonzero().flatten().tolist()
               for h in range(num_heads)]
    hulls = []
    for h, ids in enumerate(options):
        if not ids:
            raise ValueError(f"allowed: head {h} has no allowed candidate")
        c, r = [c_all[i][h] for i in ids], [r_all[i][h] for i in ids]
        hulls.append([(ids[i], c[i], r[i]) for i in _hull(c, r)])
    pos = [0] * num_heads
    have = sum(hull[0][2] for hull in hulls)
    heap: List = []

    def push(h):
        if pos[h] + 1 < len(hulls[h]):
            (_, c0, r0), (_, c1, r1) = hulls[h][pos[h]], hulls[h][pos[h] + 1]
            heapq.heappush(heap, (-(r1 - r0) / max(c1 - c0, 1e-12), h))

    for h in range(num_heads):
        push(h)
    need = target * num_heads - 1e-12
    while heap and have < need:
        _, h = heapq.heappop(heap)
        have += hulls[h][pos[h] + 1][2] - hulls[h][pos[h]][2]
        pos[h] += 1
        push(h)
    pick = [hulls[h][pos[h]][0] for h in range(num_heads)]
    if have < need:
        return pick
    # A hull's step may overshoot (a near-uniform head's hull runs straight to dense): then changes to
    # cheaper candidates that keep the target are made, the largest saving first, while there are any.
    total = sum(r_all[pick[h]][h] for h in range(num_heads))
    while True:
        best = None
        for h in range(num_heads):
            c0, r0 = c_all[pick[h]][h], r_all[pick[h]][h]
            for i in options[h]:
                saving, loss = c0 - c_all[i][h], r0 - r_all[i][h]
                if saving > 1e-15 and total - loss >= need and (best is None or saving > best[0]):
                    best = (saving, loss, h, i)
        if best is None:
            return pick
        total -= best[1]
        pick[best[2]] = best[3]


def select_budget(layers: Sequence[LayerScores], costs: Sequence[torch.Tensor], budget: float,
                  allowed: Optional[Sequence[torch.Tensor]] = None) -> List[List[int]]:
    """Per layer, per head the candidate index, spending at most `budget` (mean cost over all heads) where
    it buys the most recall (the lower of recall and tail_recall) per unit cost. Every head starts at its
    cheapest candidate; with `allowed` (per layer a bool [candidates, heads]) only the allowed ones are
    considered, e.g. those that meet a recall floor (floor_mask)."""
    heads = [(li, h) for li, s in enumerate(layers) for h in range(s.recall.shape[1])]
    hulls, pos, spent, heap = [], [], 0.0, []
    for n, (li, h) in enumerate(heads):
        c, r = costs[li][:, h].tolist(), _worst(layers[li])[:, h].tolist()
        ids = list(range(len(c))) if allowed is None else allowed[li][:, h].nonzero().flatten().tolist()
        if not ids:
            raise ValueError(f"allowed: layer {li} head {h} has no allowed candidate")
        hull = [ids[i] for i in _hull([c[i] for i in ids], [r[i] for i in ids])]
        hulls.append([(i, c[i], r[i]) for i in hull])
        pos.append(0)
        spent += c[hull[0]]
    if spent > budget * len(heads) + 1e-9:
        what = "the cheapest allowed" if allowed is not None else "the cheapest"
        raise ValueError(f"budget: expected at least {what} mean cost {spent / len(heads):.4f}, got {budget}")

    def push(n):
        if pos[n] + 1 < len(hulls[n]):
            (_, c0, r0), (_, c1, r1) = hulls[n][pos[n]], hulls[n][pos[n] + 1]
            heapq.heappush(heap, (-(r1 - r0) / max(c1 - c0, 1e-12), n))

    for n in range(len(heads)):
        push(n)
    while heap:
        _, n = heapq.heappop(heap)
        step = hulls[n][pos[n] + 1][1] - hulls[n][pos[n]][1]
        if spent + step > budget * len(heads) + 1e-9:
            continue  # this head's next step does not fit; cheaper steps of others may
        spent += step
        pos[n] += 1
        push(n)
    out: List[List[int]] = [[0] * s.recall.shape[1] for s in layers]
    for n, (li, h) in enumerate(heads):
        out[li][h] = hulls[n][pos[n]][0]
    return out


@contextlib.contextmanager
def capture_qk(model, callback: Callable[[int, torch.Tensor, torch.Tensor, Optional[float]], None]) -> Iterator:
    """While open, every attention call of `model` runs transformers' SDPA and first hands
    (layer_idx, query [B, Hq, S, D], key [B, Hkv, S, D] after RoPE, scaling) to callback."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from .integrations.hf import attention_hook

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        callback(module.layer_idx, query, key, scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)

    with attention_hook(model, attention):
        yield model


def _progress(total: int, enabled: bool, desc: str):
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is in the hf/bench extras; without it, no bar
            pass
        else:
            return tqdm(total=total, desc=desc, unit="layer")
    return contextlib.nullcontext(None)


def model_info(model, name: Optional[str] = None) -> Dict[str, Any]:
    """The profile's model identity: name (model_name unless given), architecture, layer/head counts."""
    from .integrations.hf import model_name, model_shape

    config = model.config
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    name = name or model_name(model) or arch
    return {"name": name, "architecture": arch, **model_shape(model)}


def run_layers(model, input_ids: torch.Tensor, per_layer: Callable, *, progress: bool = True,
               desc: str = "profiling") -> Dict[int, Any]:
    """One forward pass over input_ids [1, S]; per_layer(layer, q, k, scale) runs on each layer's q/k as
    they come (nothing is kept but its result). Returns {layer: result}."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids: expected [1, seqlen], got {tuple(input_ids.shape)}")
    results: Dict[int, Any] = {}
    num_layers = model_info(model)["num_layers"]
    with _progress(num_layers, progress, desc) as bar:
        def callback(layer, q, k, scale):
            results[layer] = per_layer(layer, q.detach(), k.detach(), scale)
            if bar is not None:
                bar.update(1)

        with capture_qk(model, callback), torch.no_grad():
            # logits_to_keep=1: the vocabulary projection of every position would cost 8K x 49K floats.
            model(input_ids.to(model.device), use_cache=False, logits_to_keep=1)
    missing = sorted(set(range(num_layers)) - set(results))
    if missing:
        raise RuntimeError(f"model: layers {missing} never called the attention interface; cannot profile them")
    return results


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def profile_model(model, input_ids: torch.Tensor, *, candidates: Optional[Sequence[Dict[str, Any]]] = None,
                  target: float = 0.95, tail_target: Optional[float] = 0.98, budget: Optional[float] = None,
                  layer_target: Optional[float] = None, floor: Optional[float] = None, cost: str = "time",
                  block_size: int = 64, query_blocks: Optional[int] = None, name: Optional[str] = None,
                  progress: bool = True, settings: Optional[Dict[str, Any]] = None, **options):
    """Profile every head of `model` on input_ids [1, S]. Returns (Profile, [LayerScores per layer]).

    target: per head, the cheapest candidate whose recall reaches it, and whose recall on the last query
    block reaches tail_target (None: target); or budget: a mean cost (dense = 1, see candidate_cost)
    spent greedily over all heads, over every candidate or, with floor, over those with recall >= floor
    and tail recall >= tail_target; or layer_target: per layer a mean recall (select_layer_target; per
    head the lower of recall and tail recall), over every candidate or, with floor, over those meeting it.
    cost: "time" (speed-weighted) or "flops". query_blocks: how many query blocks recall is scored on
    (sample_query_blocks; default SAMPLED_QUERY_BLOCKS, every block of shorter prompts).
    block_size and options (the patterns' per-call options, e.g. how many queries an estimator reads): must
    be those the runtime uses (the mixture method's defaults where not given)."""
    if budget is not None and layer_target is not None:
        raise ValueError("budget, layer_target: pass one of them (a mean cost, or a mean recall per layer)")
    if floor is not None and budget is None and layer_target is None:
        raise ValueError("floor: only with budget or layer_target (it limits the candidates their greedy may pick)")
    for key, value in (("target", target), ("tail_target", tail_target), ("floor", floor),
                       ("layer_target", layer_target)):
        if value is not None and not 0.0 < float(value) <= 1.0:
            raise ValueError(f"{key}: expected a recall in (0, 1], got {value!r}")
    if budget is not None and not 0.0 < float(budget) <= 2.0:
        raise ValueError(f"budget: expected a mean cost in (0, 2] (dense = 1), got {budget!r}")
    if cost not in COSTS:
        raise ValueError(f"cost: expected one of {COSTS}, got {cost!r}")
    seqlen = input_ids.shape[-1]
    sampled = sample_query_blocks(seqlen, block_size, query_blocks)
    options = _options(options)
    candidates = list(candidates) if candidates is not None else default_candidates(seqlen, block_size)
    start = time.perf_counter()
    results = run_layers(model, input_ids, lambda layer, q, k, scale: score_candidates(
        q, k, candidates, block_size=block_size, scale=scale, query_blocks=sampled, **options), progress=progress)
    layers = [results[i] for i in range(len(results))]
    costs = [candidate_cost_table(candidates, s.density, seqlen, cost, block_size, **options) for s in layers]
    allowed = None if floor is None else [floor_mask(s, floor, tail_target) for s in layers]
    if layer_target is not None:
        picks = [select_layer_target(s, c, layer_target, a)
                 for s, c, a in zip(layers, costs, allowed or [None] * len(layers))]
    elif budget is None:
        picks = [select_heads(s, target, c, tail_target) for s, c in zip(layers, costs)]
    else:
        picks = select_budget(layers, costs, budget, allowed)
    heads = [[_head_entry(s, i, h) for h, i in enumerate(p)] for s, p in zip(layers, picks)]
    recall = torch.tensor([[h["recall"] for h in layer] for layer in heads])
    density = torch.tensor([[h["density"] for h in layer] for layer in heads])
    per_head = budget is None and layer_target is None
    info = {"seqlen": seqlen, "recall_target": target if per_head else None,
            "tail_recall_target": (tail_target or target) if per_head else
                                  ((tail_target or floor) if floor is not None else None),
            "budget": budget, "layer_recall_target": layer_target, "floor": floor,
            "query_blocks_scored": -(-seqlen // block_size) if sampled is None else len(sampled),
            "cost": cost, "block_size": block_size, **options, "candidates": len(candidates),
            "speed_tflops": speed_tflops() if cost == "time" else None,
            "mean_recall": round(recall.mean().item(), 4), "mean_density": round(density.mean().item(), 4),
            "elapsed_s": round(time.perf_counter() - start, 1), "peak_rss_mib": round(peak_rss_mib())}
    info.update(settings or {})
    return Profile(model=model_info(model, name), layers=heads, settings=info), layers


def _options(options: Dict[str, Any]) -> Dict[str, Any]:
    """Every pattern's per-call options: those given, defaults for the rest (recorded in the profile)."""
    out = {name: param.default for name, param in all_options().items()}
    unknown = sorted(set(options) - set(out))
    if unknown:
        raise TypeError(f"options: unknown {unknown}; the patterns take {sorted(out)}")
    return {**out, **options}


def candidate_cost_table(candidates, density: torch.Tensor, seqlen: int, cost: str, block_size: int, /,
                         **options) -> torch.Tensor:
    """float64 [n_candidates, H]: candidate_cost of every candidate on every head."""
    return torch.stack([candidate_cost(c["pattern"], density[i], seqlen, cost=cost, block_size=block_size,
                                       **options) for i, c in enumerate(candidates)])


def _head_entry(scores: LayerScores, index: int, head: int) -> Dict[str, Any]:
    entry = dict(scores.candidates[index])
    entry["recall"] = round(scores.recall[index, head].item(), 4)
    entry["density"] = round(scores.density[index, head].item(), 4)
    if scores.tail_recall is not None:
        entry["tail_recall"] = round(scores.tail_recall[index, head].item(), 4)
    return entry


def compare_uniform(model, input_ids: torch.Tensor, profile: Profile, *, uniform: Optional[Sequence[Dict[str, Any]]] = None,
                    block_size: int = 64, progress: bool = True, **options) -> Dict[str, Any]:
    """Mean recall and density over all heads of the profile and of uniform configs (head dicts given to
    every head; default: the sweep of the pattern the mixture method uses without a profile) on input_ids,
    all planned as the runtime plans them; plus the uniform recall interpolated at the profile's mean
    density."""
    seqlen = input_ids.shape[-1]
    if uniform is None:
        name = mixture_default(seqlen)["pattern"]
        p = get_pattern(name)
        uniform = [{"pattern": name, **b} for b in (p.sweep or p.candidates)(seqlen, block_size)]
    uniform = list(uniform)

    sampled = sample_query_blocks(seqlen, block_size)

    def per_layer(layer, q, k, scale):
        mass = block_mass(q, k, block_size=block_size, scale=scale, query_blocks=sampled)
        prof = head_config_scores(q, k, profile.layer(layer), block_size=block_size, scale=scale, mass=mass,
                                  query_blocks=sampled, **options)
        uni = score_candidates(q, k, uniform, block_size=block_size, scale=scale, mass=mass,
                               query_blocks=sampled, **options)
        return prof, uni

    results = run_layers(model, input_ids, per_layer, progress=progress, desc="comparing")
    layers = [results[i] for i in range(len(results))]
    p_recall = torch.stack([p[0] for p, _ in layers]).mean().item()
    p_density = torch.stack([p[1] for p, _ in layers]).mean().item()
    u_recall = torch.stack([u.recall for _, u in layers]).mean((0, 2)).tolist()
    u_density = torch.stack([u.density for _, u in layers]).mean((0, 2)).tolist()
    return {"seqlen": seqlen, "profile": {"recall": p_recall, "density": p_density},
            "uniform": [{**cfg, "recall": r, "density": d} for cfg, r, d in zip(uniform, u_recall, u_density)],
            "uniform_recall_at_profile_density": _interpolate(u_density, u_recall, p_density)}


def _interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> Optional[float]:
    """y at x on the piecewise-linear curve through (xs, ys) sorted by x; None outside its range."""
    pts = sorted(zip(xs, ys))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def _colors() -> Dict[str, str]:
    return {**{p.name: p.color for p in patterns()}, DENSE: "tab:red"}


def plot_profile(profile: Profile, path, scores: Optional[Sequence[LayerScores]] = None, *, cost: str = "time"):
    """PNG: the chosen pattern per (layer, head), cells labelled with their density; and recall vs cost of
    every head's choice (coloured by pattern), over every candidate tried when `scores` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    colors = _colors()
    names = list(colors)
    grid = [[names.index(h["pattern"]) if h["pattern"] in colors else len(names) for h in layer]
            for layer in profile.layers]
    seqlen = int(profile.settings.get("seqlen", 8192))
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, max(5, 0.22 * profile.num_layers + 1.5)))
    ax0.imshow(grid, cmap=ListedColormap(list(colors.values()) + ["white"]), vmin=0, vmax=len(names),
               aspect="auto")
    for li, layer in enumerate(profile.layers):
        for h, head in enumerate(layer):
            if "density" in head:
                ax0.text(h, li, f"{head['density']:.2f}", ha="center", va="center", fontsize=6)
    ax0.set(xlabel="query head", ylabel="layer", title="chosen pattern (cell: density)")
    if scores is not None:
        for s in scores:
            c = candidate_cost_table(s.candidates, s.density, seqlen, cost, int(profile.settings.get("block_size", 64)))
            ax1.scatter(c.flatten(), s.recall.flatten(), s=3, color="0.8", zorder=1)
    for pattern, color in colors.items():
        heads = [h for layer in profile.layers for h in layer if h["pattern"] == pattern and "recall" in h]
        if heads:
            x = [candidate_cost(pattern, h.get("density", 1.0), seqlen, cost=cost) for h in heads]
            ax1.scatter(x, [h["recall"] for h in heads], s=14, color=color, label=f"{pattern} ({len(heads)})",
                        zorder=2)
    target = profile.settings.get("recall_target")
    if target:
        ax1.axhline(target, color="k", lw=0.6, ls="--")
    ax1.set(xlabel=f"cost ({cost}, dense = 1)", ylabel="attention recall",
            title="per head: choice (colour) among candidates (grey)")
    ax1.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{profile.model['name']} at {seqlen} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
