"""Sparse-index types: the one contract between estimators and kernels.

Every layout describes, per (batch, query head, query block), which keys a query block attends to.
Coordinates follow the bottom-right causal convention of FlashAttention: with `seqlen_q` queries and
`seqlen_k` keys, query row i may see key j when j <= i + (seqlen_k - seqlen_q).

- BlockLayout: a count and the sorted key-block ids (padded with -1), int32.
- VerticalSlashLayout: contiguous key ranges (from diagonals) plus single key columns (verticals)
  that lie outside those ranges, int32.

Every layout derives from `Layout`, the interface the reference, the recall and the profiler use:
geometry, `mask_rows` (a band of rows as a boolean mask), `head_density`, the attention mass it keeps
(`row_mass` for a chunk of softmax rows, `kept` for per-block sums prepared once as `KeySums`) and
`to(device)`. Layouts are immutable contracts: nothing is ever written onto one after it is built.
They validate themselves and report density without building a seq x seq tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._checks import INDEX_DTYPES, check_positive_int, check_tensor

__all__ = ["Layout", "BlockLayout", "VerticalSlashLayout", "KeySums", "PageSelection", "causal_tile_entries"]


def _tri(n: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_{x <= n} clamp(x, 0, w) for integer tensors n, w >= 0 (int64)."""
    n = n.clamp(min=0)
    inside = torch.minimum(n, w)
    return inside * (inside + 1) // 2 + (n - inside) * w


def causal_tile_entries(q0, q1, k0, k1, offset: int | torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Number of (row, key) pairs in rows [q0, q1) x keys [k0, k1) that the causal mask admits.

    Row i admits key j when j <= i + offset. All arguments broadcast; returns int64.
    """
    q0, q1, k0, k1 = (torch.as_tensor(x, dtype=torch.int64) for x in (q0, q1, k0, k1))
    q1, k1 = torch.maximum(q1, q0), torch.maximum(k1, k0)
    if not causal:
        return (q1 - q0) * (k1 - k0)
    width = k1 - k0
    # For row i the count is clamp(i + offset + 1 - k0, 0, width): sum it over i in [q0, q1).
    c = torch.as_tensor(offset, dtype=torch.int64) + 1 - k0
    return _tri(q1 - 1 + c, width) - _tri(q0 - 1 + c, width)


# Elements of the int64 temporaries of one step of VerticalSlashLayout's entry count (query blocks are
# counted a few at a time: at 128K, 8K columns a block would otherwise need 4 GiB per temporary).
_ENTRY_COUNT_ELEMENTS = 1 << 24


def _check_seqlens(name: str, seqlens: Optional[Sequence[int]], batch: int, upper: int) -> list:
    if seqlens is None:
        return [upper] * batch
    seqlens = [int(s) for s in (seqlens.tolist() if torch.is_tensor(seqlens) else seqlens)]
    if len(seqlens) != batch or any(s < 0 or s > upper for s in seqlens):
        raise ValueError(f"{name}: expected {batch} lengths in [0, {upper}], got {seqlens}")
    return seqlens


@dataclass
class KeySums:
    """Per (head, query block, key) values, summed the three ways layouts read them: as they are (single
    keys), as prefix sums over keys (ranges) and per key block (block layouts). Prepared once for many
    layouts of the same geometry (the profiler's candidates); see Layout.kept."""

    values: torch.Tensor  # [H, nq, S]
    prefix: torch.Tensor  # float64 [H, nq, S + 1]
    blocks: torch.Tensor  # float64 [H, nq, ceil(S / block_size)]
    block_size: int
    # The query blocks the nq rows are (int64, ascending); None: every query block of the layout, in order.
    query_blocks: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, values: torch.Tensor, block_size: int, query_blocks: Optional[torch.Tensor] = None) -> "KeySums":
        s = values.shape[-1]
        if query_blocks is not None:
            query_blocks = torch.as_tensor(query_blocks, dtype=torch.int64).flatten().cpu()
            if query_blocks.numel() != values.shape[1] or bool((query_blocks.diff() <= 0).any()) or (
                    query_blocks.numel() and int(query_blocks[0]) < 0):
                raise ValueError(f"query_blocks: expected {values.shape[1]} ascending non-negative block ids, "
                                 f"got {query_blocks.tolist()}")
        prefix = F.pad(values.double().cumsum(-1), (1, 0))
        ends = prefix[..., block_size::block_size]
        if s % block_size:
            ends = torch.cat([ends, prefix[..., -1:]], dim=-1)
        blocks = torch.diff(ends, dim=-1, prepend=prefix[..., :1])
        return cls(values, prefix, blocks, block_size, query_blocks)

    def rows_of(self, num_query_blocks: int) -> torch.Tensor:
        """int64: the layout's query blocks these sums' rows are."""
        return torch.arange(num_query_blocks) if self.query_blocks is None else self.query_blocks


class Layout:
    """The sparse-index contract: per (batch, query head, query block of `block_size_q` rows), the keys the
    block attends to (before the causal mask). Subclasses store that set their own way and provide
    `_counts` (an int tensor [batch, heads, num_query_blocks]), `_block_rows_mask`, `_computed_entries`
    and `to`; they may override `row_mass` and `kept` with cheaper forms than the mask. `kernels` names the
    module of the kernel family that runs the layout (see sparse_attn.ops)."""

    kernels: str = ""

    block_size_q: int
    seqlen_q: int
    seqlen_k: int

    @property
    def batch(self) -> int:
        return self._counts().shape[0]

    @property
    def num_heads(self) -> int:
        return self._counts().shape[1]

    @property
    def num_query_blocks(self) -> int:
        return math.ceil(self.seqlen_q / self.block_size_q)

    @property
    def device(self) -> torch.device:
        return self._counts().device

    def _check_geometry(self) -> None:
        check_positive_int("block_size_q", self.block_size_q)
        check_positive_int("seqlen_q", self.seqlen_q)
        check_positive_int("seqlen_k", self.seqlen_k)
        counts = self._counts()
        if counts.dim() != 3 or counts.shape[2] != self.num_query_blocks:
            raise ValueError(
                f"{type(self).__name__}: expected counts of shape [batch, heads, "
                f"ceil(seqlen_q / block_size_q) = {self.num_query_blocks}], got {tuple(counts.shape)}"
            )

    def mask_rows(self, batch: int, row_start: int, row_end: int, seqlen_k: Optional[int] = None) -> torch.Tensor:
        """Boolean mask [heads, row_end - row_start, seqlen_k] for query rows [row_start, row_end)."""
        seqlen_k = self.seqlen_k if seqlen_k is None else seqlen_k
        bq = self.block_size_q
        qb0, qb1 = row_start // bq, (row_end - 1) // bq + 1
        per_block = self._block_rows_mask(batch, qb0, qb1, seqlen_k)  # [H, qb1 - qb0, seqlen_k]
        rows = per_block.repeat_interleave(bq, dim=1)
        return rows[:, row_start - qb0 * bq : row_end - qb0 * bq]

    def to_dense(self, seqlen_q: Optional[int] = None, seqlen_k: Optional[int] = None) -> torch.Tensor:
        """Boolean mask [batch, heads, seqlen_q, seqlen_k] (no causal mask applied). Small inputs only."""
        sq = self.seqlen_q if seqlen_q is None else seqlen_q
        sk = self.seqlen_k if seqlen_k is None else seqlen_k
        return torch.stack([self.mask_rows(b, 0, sq, sk) for b in range(self.batch)])

    def head_density(
        self,
        causal: bool = True,
        seqlens_q: Optional[Sequence[int]] = None,
        seqlens_k: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """Per (batch, head): computed entries / entries a dense (causal) attention computes. float64 [B, H]."""
        sq = _check_seqlens("seqlens_q", seqlens_q, self.batch, self.seqlen_q)
        sk = _check_seqlens("seqlens_k", seqlens_k, self.batch, self.seqlen_k)
        out = torch.zeros(self.batch, self.num_heads, dtype=torch.float64)
        for b in range(self.batch):
            offset = sk[b] - sq[b]
            total = causal_tile_entries(0, sq[b], 0, sk[b], offset, causal).item()
            if total == 0:
                continue
            out[b] = self._computed_entries(b, sq[b], sk[b], offset, causal).double().cpu() / total
        return out

    def density(self, causal: bool = True, seqlens_q=None, seqlens_k=None) -> float:
        """Fraction of the dense (causal) attention entries this layout computes, over all heads."""
        sq = _check_seqlens("seqlens_q", seqlens_q, self.batch, self.seqlen_q)
        sk = _check_seqlens("seqlens_k", seqlens_k, self.batch, self.seqlen_k)
        weights = torch.tensor(
            [causal_tile_entries(0, q, 0, k, k - q, causal).item() for q, k in zip(sq, sk)], dtype=torch.float64
        )
        if weights.sum() == 0:
            return 0.0
        per_head = self.head_density(causal, sq, sk)
        return float((per_head.mean(1) * weights).sum() / weights.sum())

    def row_mass(self, p: torch.Tensor, batch: int, row_start: int) -> torch.Tensor:
        """Per (head, row) the part of p [heads, rows, keys] (rows from row_start, keys from 0) that the
        layout keeps, for sequence `batch`."""
        heads, rows, keys = p.shape
        return (p * self.mask_rows(batch, row_start, row_start + rows, keys).to(p.device)).sum(-1)

    def kept(self, sums: KeySums, batch: int = 0) -> torch.Tensor:
        """float64 [heads, rows of sums]: the sum of sums.values over the keys each query block keeps (every
        query block, or those sums.query_blocks names)."""
        rows = self._check_sums(sums)
        keys = sums.values.shape[-1]
        if sums.query_blocks is None:
            mask = self._block_rows_mask(batch, 0, self.num_query_blocks, keys).to(sums.values.device)
            return (sums.values.double() * mask).sum(-1)
        out = torch.empty(sums.values.shape[:2], dtype=torch.float64, device=sums.values.device)
        for i, qb in enumerate(rows.tolist()):
            mask = self._block_rows_mask(batch, qb, qb + 1, keys).to(sums.values.device)
            out[:, i] = (sums.values[:, i : i + 1].double() * mask).sum(-1)[:, 0]
        return out

    def _check_sums(self, sums: KeySums) -> torch.Tensor:
        """The query blocks of sums' rows (int64, CPU), checked against this layout's geometry."""
        h, nq, s = sums.values.shape
        full = sums.query_blocks is None
        rows = sums.rows_of(nq)
        fits = (self.num_query_blocks == nq) if full else (nq == 0 or int(rows[-1]) < self.num_query_blocks)
        if not fits or self.block_size_q != sums.block_size or self.seqlen_k < s or self.num_heads != h:
            raise ValueError(f"layout: expected {h} heads, {nq if full else 'at least'} query blocks of "
                             f"{sums.block_size} rows and {s} keys, got {self.num_heads} heads, "
                             f"{self.num_query_blocks} query blocks of {self.block_size_q} and {self.seqlen_k} keys")
        return rows

    def to(self, device) -> "Layout":
        raise NotImplementedError

    def _query_block_bounds(self, seqlen_q: int, device) -> tuple:
        q0 = torch.arange(self.num_query_blocks, device=device, dtype=torch.int64) * self.block_size_q
        q1 = (q0 + self.block_size_q).clamp(max=seqlen_q)
        return q0.clamp(max=seqlen_q), q1


@dataclass(eq=False)
class BlockLayout(Layout):
    """Per (batch, query head, query block): `counts` key blocks, listed sorted in `indices`.

    counts:  int32 [batch, heads, num_query_blocks]
    indices: int32 [batch, heads, num_query_blocks, max_blocks]; entries past `counts` are padding.
    """

    kernels = "sparse_attn.ops.block_sparse"

    counts: torch.Tensor
    indices: torch.Tensor
    block_size_q: int
    block_size_k: int
    seqlen_q: int
    seqlen_k: int
    validate: bool = True

    def __post_init__(self):
        check_tensor("counts", self.counts, ndim=3, dtypes=INDEX_DTYPES)
        check_tensor("indices", self.indices, ndim=4, dtypes=INDEX_DTYPES, device=self.counts.device)
        check_positive_int("block_size_k", self.block_size_k)
        self._check_geometry()
        if tuple(self.indices.shape[:3]) != tuple(self.counts.shape):
            raise ValueError(
                f"indices: expected leading shape {tuple(self.counts.shape)} (that of counts), "
                f"got {tuple(self.indices.shape)}"
            )
        if self.validate:
            self.check_values()

    def _counts(self) -> torch.Tensor:
        return self.counts

    @property
    def num_key_blocks(self) -> int:
        return math.ceil(self.seqlen_k / self.block_size_k)

    @property
    def max_blocks(self) -> int:
        return self.indices.shape[3]

    def check_values(self) -> None:
        """Counts within [0, max_blocks]; listed ids strictly increasing and within [0, num_key_blocks)."""
        c, idx = self.counts, self.indices
        if (c < 0).any() or (c > self.max_blocks).any():
            raise ValueError(f"counts: expected values in [0, {self.max_blocks}] (indices.shape[-1])")
        live = torch.arange(self.max_blocks, device=idx.device) < c.unsqueeze(-1)
        if ((idx < 0) & live).any() or ((idx >= self.num_key_blocks) & live).any():
            raise ValueError(
                f"indices: expected key-block ids in [0, {self.num_key_blocks}) "
                f"(ceil(seqlen_k / block_size_k)) for the first `counts` entries"
            )
        if self.max_blocks > 1 and ((idx[..., 1:] <= idx[..., :-1]) & live[..., 1:]).any():
            raise ValueError("indices: expected strictly increasing key-block ids within each query block")

    @classmethod
    def from_block_mask(
        cls, block_mask: torch.Tensor, block_size_q: int, block_size_k: int, seqlen_q: int, seqlen_k: int
    ) -> "BlockLayout":
        """Build from a boolean [batch, heads, num_query_blocks, num_key_blocks] block mask."""
        check_tensor("block_mask", block_mask, ndim=4, dtypes=(torch.bool,))
        nk = block_mask.shape[-1]
        if nk != math.ceil(seqlen_k / block_size_k):
            raise ValueError(
                f"block_mask: expected last dim ceil(seqlen_k / block_size_k) = "
                f"{math.ceil(seqlen_k / block_size_k)}, got {nk}"
            )
        counts = block_mask.sum(-1, dtype=torch.int32)
        max_blocks = max(int(counts.max().item()) if counts.numel() else 0, 1)
        ids = torch.arange(nk, device=block_mask.device, dtype=torch.int32)
        keyed = torch.where(block_mask, ids, torch.full_like(ids, nk))
        indices = keyed.sort(dim=-1).values[..., :max_blocks]
        indices = torch.where(indices == nk, torch.full_like(indices, -1), indices)
        return cls(counts, indices.contiguous(), block_size_q, block_size_k, seqlen_q, seqlen_k, validate=False)

    def to_block_mask(self) -> torch.Tensor:
        """Boolean [batch, heads, num_query_blocks, num_key_blocks]."""
        live = torch.arange(self.max_blocks, device=self.device) < self.counts.unsqueeze(-1)
        mask = torch.zeros(*self.counts.shape, self.num_key_blocks + 1, dtype=torch.bool, device=self.device)
        target = torch.where(live, self.indices.long(), torch.full_like(self.indices.long(), self.num_key_blocks))
        mask.scatter_(-1, target, True)
        return mask[..., : self.num_key_blocks]

    def _block_rows_mask(self, batch: int, qb0: int, qb1: int, seqlen_k: int) -> torch.Tensor:
        keys = self._key_block_mask(batch, qb0, qb1).repeat_interleave(self.block_size_k, dim=-1)
        return keys[..., :seqlen_k]

    def _computed_entries(self, batch: int, seqlen_q: int, seqlen_k: int, offset: int, causal: bool) -> torch.Tensor:
        q0, q1 = self._query_block_bounds(seqlen_q, self.device)
        idx = self.indices[batch].long()
        live = torch.arange(self.max_blocks, device=idx.device) < self.counts[batch].unsqueeze(-1)
        k0 = (idx * self.block_size_k).clamp(max=seqlen_k)
        k1 = (k0 + self.block_size_k).clamp(max=seqlen_k)
        n = causal_tile_entries(q0[None, :, None], q1[None, :, None], k0, k1, offset, causal)
        return (n * live).sum((1, 2))

    def row_mass(self, p: torch.Tensor, batch: int, row_start: int) -> torch.Tensor:
        # Sum p over each key block, then keep whole blocks: no token-level mask is built.
        heads, rows, keys = p.shape
        bk, nkb = self.block_size_k, -(-keys // self.block_size_k)
        per_block = F.pad(p, (0, nkb * bk - keys)).view(heads, rows, nkb, bk).sum(-1)
        qb0 = row_start // self.block_size_q
        qb1 = (row_start + rows - 1) // self.block_size_q + 1
        blocks = self._key_block_mask(batch, qb0, qb1)[..., :nkb].to(p.device)  # [H, qb1 - qb0, nkb]
        row_blocks = torch.arange(row_start, row_start + rows, device=p.device) // self.block_size_q - qb0
        return (per_block * blocks[:, row_blocks]).sum(-1)

    def kept(self, sums: KeySums, batch: int = 0) -> torch.Tensor:
        rows = self._check_sums(sums)
        if self.block_size_k != sums.block_size:
            raise ValueError(f"layout: expected key blocks of {sums.block_size}, got {self.block_size_k}")
        nkb = sums.blocks.shape[-1]
        rows = None if sums.query_blocks is None else rows.to(self.counts.device)
        mask = self._key_block_mask(batch, 0, self.num_query_blocks, rows)[..., :nkb].to(sums.blocks.device)
        return (sums.blocks * mask).sum(-1)

    def _key_block_mask(self, batch: int, qb0: int, qb1: int, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """bool [heads, qb1 - qb0, num_key_blocks]: the listed key blocks of query blocks [qb0, qb1) (or of
        the query blocks `rows` lists)."""
        pick = slice(qb0, qb1) if rows is None else rows
        c = self.counts[batch][:, pick]
        idx = self.indices[batch][:, pick].long()
        live = torch.arange(self.max_blocks, device=idx.device) < c.unsqueeze(-1)
        blocks = torch.zeros(*c.shape, self.num_key_blocks + 1, dtype=torch.bool, device=idx.device)
        blocks.scatter_(-1, torch.where(live, idx, torch.full_like(idx, self.num_key_blocks)), True)
        return blocks[..., : self.num_key_blocks]

    def to(self, device) -> "BlockLayout":
        return BlockLayout(
            self.counts.to(device), self.indices.to(device), self.block_size_q, self.block_size_k,
            self.seqlen_q, self.seqlen_k, validate=False,
        )


@dataclass(eq=False)
class VerticalSlashLayout(Layout):
    """Per (batch, query head, query block): key ranges [start, end) plus single key columns.

    range_counts:   int32 [batch, heads, num_query_blocks]
    range_starts:   int32 [batch, heads, num_query_blocks, max_ranges]  sorted, non-overlapping
    range_ends:     int32 [batch, heads, num_query_blocks, max_ranges]  exclusive
    column_counts:  int32 [batch, heads, num_query_blocks]
    column_indices: int32 [batch, heads, num_query_blocks, max_columns] strictly increasing,
                    never inside one of the same query block's ranges (nothing is counted twice).
    shared_heads:   n >= 1: heads come in runs of n (0..n-1, n..2n-1, ...) with identical entries, as
                    `repeat_heads(n)` makes them; with an even n and an even GQA group the kernel serves
                    two query heads from one stream of key/value tiles. 1: no promise.
    """

    kernels = "sparse_attn.ops.vertical_slash"

    range_counts: torch.Tensor
    range_starts: torch.Tensor
    range_ends: torch.Tensor
    column_counts: torch.Tensor
    column_indices: torch.Tensor
    block_size_q: int
    seqlen_q: int
    seqlen_k: int
    validate: bool = True
    shared_heads: int = 1

    def __post_init__(self):
        dev = self.range_counts.device
        check_positive_int("shared_heads", self.shared_heads)
        check_tensor("range_counts", self.range_counts, ndim=3, dtypes=INDEX_DTYPES)
        check_tensor("range_starts", self.range_starts, ndim=4, dtypes=INDEX_DTYPES, device=dev)
        check_tensor("range_ends", self.range_ends, ndim=4, dtypes=INDEX_DTYPES, device=dev)
        check_tensor("column_counts", self.column_counts, ndim=3, dtypes=INDEX_DTYPES, device=dev)
        check_tensor("column_indices", self.column_indices, ndim=4, dtypes=INDEX_DTYPES, device=dev)
        self._check_geometry()
        lead = tuple(self.range_counts.shape)
        for name in ("range_starts", "range_ends", "column_indices"):
            t = getattr(self, name)
            if tuple(t.shape[:3]) != lead:
                raise ValueError(f"{name}: expected leading shape {lead} (that of range_counts), got {tuple(t.shape)}")
        if self.range_starts.shape != self.range_ends.shape:
            raise ValueError(
                f"range_ends: expected the shape of range_starts {tuple(self.range_starts.shape)}, "
                f"got {tuple(self.range_ends.shape)}"
            )
        if tuple(self.column_counts.shape) != lead:
            raise ValueError(f"column_counts: expected shape {lead}, got {tuple(self.column_counts.shape)}")
        if lead[1] % self.shared_heads:
            raise ValueError(f"shared_heads: expected a divisor of the number of heads ({lead[1]}), "
                             f"got {self.shared_heads}")
        if self.validate:
            self.check_values()

    def _parts(self):
        return (self.range_counts, self.range_starts, self.range_ends, self.column_counts, self.column_indices)

    def repeat_heads(self, n: int) -> "VerticalSlashLayout":
        """Each head's index used by n consecutive heads (a layout with n x the heads, shared_heads x n):
        one estimate per run of query heads of a GQA group, see estimate_vertical_slash(share_heads=)."""
        check_positive_int("n", n)
        parts = [t.repeat_interleave(n, dim=1) for t in self._parts()]
        return VerticalSlashLayout(*parts, self.block_size_q, self.seqlen_q, self.seqlen_k, validate=False,
                                   shared_heads=self.shared_heads * n)

    def _counts(self) -> torch.Tensor:
        return self.range_counts

    @property
    def max_ranges(self) -> int:
        return self.range_starts.shape[3]

    @property
    def max_columns(self) -> int:
        return self.column_indices.shape[3]

    def _live(self, counts: torch.Tensor, width: int) -> torch.Tensor:
        return torch.arange(width, device=counts.device) < counts.unsqueeze(-1)

    def check_values(self) -> None:
        sk = self.seqlen_k
        rc, cc = self.range_counts, self.column_counts
        n = self.shared_heads
        if n > 1:
            b, h = rc.shape[:2]
            live_r, live_c = self._live(rc, self.max_ranges), self._live(cc, self.max_columns)
            for name, t, live in (("range_counts", rc, None), ("column_counts", cc, None),
                                  ("range_starts", self.range_starts, live_r), ("range_ends", self.range_ends, live_r),
                                  ("column_indices", self.column_indices, live_c)):
                t = t if live is None else torch.where(live, t, -1)  # entries past the counts are free
                runs = t.reshape(b, h // n, n, *t.shape[2:])
                if not torch.equal(runs, runs[:, :, :1].expand_as(runs)):
                    raise ValueError(f"{name}: shared_heads={n} promises identical entries within each run of "
                                     f"{n} heads, but they differ")
        if (rc < 0).any() or (rc > self.max_ranges).any():
            raise ValueError(f"range_counts: expected values in [0, {self.max_ranges}] (range_starts.shape[-1])")
        if (cc < 0).any() or (cc > self.max_columns).any():
            raise ValueError(f"column_counts: expected values in [0, {self.max_columns}] (column_indices.shape[-1])")
        rl = self._live(rc, self.max_ranges)
        s, e = self.range_starts, self.range_ends
        if (((s < 0) | (e > sk) | (s >= e)) & rl).any():
            raise ValueError(f"range_starts/range_ends: expected 0 <= start < end <= seqlen_k ({sk})")
        if self.max_ranges > 1 and ((s[..., 1:] < e[..., :-1]) & rl[..., 1:]).any():
            raise ValueError("range_starts: expected sorted, non-overlapping ranges within each query block")
        cl = self._live(cc, self.max_columns)
        col = self.column_indices
        if (((col < 0) | (col >= sk)) & cl).any():
            raise ValueError(f"column_indices: expected key ids in [0, {sk}) (seqlen_k)")
        if self.max_columns > 1 and ((col[..., 1:] <= col[..., :-1]) & cl[..., 1:]).any():
            raise ValueError("column_indices: expected strictly increasing key ids within each query block")
        if self.max_ranges and self.max_columns:
            inside = (col.unsqueeze(-1) >= s.unsqueeze(-2)) & (col.unsqueeze(-1) < e.unsqueeze(-2))
            if (inside & cl.unsqueeze(-1) & rl.unsqueeze(-2)).any():
                raise ValueError("column_indices: a column lies inside one of its query block's ranges")

    def _block_rows_mask(self, batch: int, qb0: int, qb1: int, seqlen_k: int) -> torch.Tensor:
        sl = (batch, slice(None), slice(qb0, qb1))
        rc, cc = self.range_counts[sl], self.column_counts[sl]
        s, e = self.range_starts[sl].long(), self.range_ends[sl].long()
        rl = self._live(rc, self.max_ranges)
        width = self.seqlen_k + 1
        # +1 at each range start, -1 at its end; a running sum > 0 marks covered keys.
        edges = torch.zeros(*rc.shape, width, dtype=torch.int32, device=rc.device)
        edges.scatter_add_(-1, torch.where(rl, s, self.seqlen_k), rl.int())
        edges.scatter_add_(-1, torch.where(rl, e, self.seqlen_k), -rl.int())
        mask = edges.cumsum(-1)[..., : self.seqlen_k] > 0
        cl = self._live(cc, self.max_columns)
        col = torch.where(cl, self.column_indices[sl].long(), self.seqlen_k)
        cols = torch.zeros(*cc.shape, width, dtype=torch.bool, device=cc.device)
        cols.scatter_(-1, col, True)
        return (mask | cols[..., : self.seqlen_k])[..., :seqlen_k]

    def _computed_entries(self, batch: int, seqlen_q: int, seqlen_k: int, offset: int, causal: bool) -> torch.Tensor:
        q0_all, q1_all = self._query_block_bounds(seqlen_q, self.device)
        out = torch.zeros(self.num_heads, dtype=torch.int64, device=self.device)
        step = max(1, _ENTRY_COUNT_ELEMENTS // max(1, self.num_heads * max(self.max_ranges, self.max_columns)))
        for b0 in range(0, self.num_query_blocks, step):
            b1 = min(self.num_query_blocks, b0 + step)
            q0, q1 = q0_all[None, b0:b1, None], q1_all[None, b0:b1, None]
            rl = self._live(self.range_counts[batch, :, b0:b1], self.max_ranges)
            s = self.range_starts[batch, :, b0:b1].long().clamp(max=seqlen_k)
            e = self.range_ends[batch, :, b0:b1].long().clamp(max=seqlen_k)
            out += (causal_tile_entries(q0, q1, s, e, offset, causal) * rl).sum((1, 2))
            cl = self._live(self.column_counts[batch, :, b0:b1], self.max_columns)
            c = self.column_indices[batch, :, b0:b1].long()
            out += (causal_tile_entries(q0, q1, c, (c + 1).clamp(max=seqlen_k), offset, causal) * cl).sum((1, 2))
        return out

    def kept(self, sums: KeySums, batch: int = 0) -> torch.Tensor:
        rows = self._check_sums(sums)
        s = sums.values.shape[-1]
        dev = sums.prefix.device

        def pick(t):  # [H, nq, ...] of sequence `batch` -> the rows of sums, on their device
            t = t[batch]
            return (t if sums.query_blocks is None else t[:, rows.to(t.device)]).to(dev)

        live_r = torch.arange(self.max_ranges, device=dev) < pick(self.range_counts).unsqueeze(-1)
        starts = pick(self.range_starts).long().clamp(0, s)
        ends = pick(self.range_ends).long().clamp(0, s)
        ranges = ((sums.prefix.gather(-1, ends) - sums.prefix.gather(-1, starts)) * live_r).sum(-1)
        live_c = torch.arange(self.max_columns, device=dev) < pick(self.column_counts).unsqueeze(-1)
        cols = sums.values.gather(-1, pick(self.column_indices).long().clamp(0, s - 1)).double()
        return ranges + (cols * live_c).sum(-1)

    def to(self, device) -> "VerticalSlashLayout":
        return VerticalSlashLayout(
            self.range_counts.to(device), self.range_starts.to(device), self.range_ends.to(device),
            self.column_counts.to(device), self.column_indices.to(device), self.block_size_q,
            self.seqlen_q, self.seqlen_k, validate=False, shared_heads=self.shared_heads,
        )


@dataclass(frozen=True, eq=False)
class PageSelection:
    """Decode's sparse index over a paged KV cache: per (sequence, kv head) the logical pages that the kv
    head's query heads read, in any order; one selection serves the whole GQA group, so each page is read
    once. Entries past `counts` are not read; a selected page's tokens past the sequence's length are
    masked by the kernel.

    pages:  int32 [B, H, K] logical page numbers (H = the cache's kv heads, or 1: the same for all)
    counts: int32 [B, H], each <= K
    """

    pages: torch.Tensor
    counts: torch.Tensor
    page_size: int

    def __post_init__(self):
        check_tensor("pages", self.pages, ndim=3, dtypes=INDEX_DTYPES)
        check_tensor("counts", self.counts, ndim=2, dtypes=INDEX_DTYPES, device=self.pages.device)
        check_positive_int("page_size", self.page_size)
        if tuple(self.counts.shape) != tuple(self.pages.shape[:2]):
            raise ValueError(f"counts: expected shape {tuple(self.pages.shape[:2])} (pages' leading dims), "
                             f"got {tuple(self.counts.shape)}")

    @property
    def width(self) -> int:
        return self.pages.shape[2]

    def token_mask(self, seqlens: torch.Tensor, length: int) -> torch.Tensor:
        """bool [B, H, length]: the tokens the selection reads (tests, references, plots)."""
        b, h, k = self.pages.shape
        live = torch.arange(k, device=self.pages.device) < self.counts.unsqueeze(-1)
        tok = self.pages.long().unsqueeze(-1) * self.page_size + torch.arange(self.page_size, device=self.pages.device)
        tok = torch.where(live.unsqueeze(-1) & (tok < seqlens.view(-1, 1, 1, 1).long()), tok, length)
        mask = torch.zeros(b, h, length + 1, dtype=torch.bool, device=self.pages.device)
        mask.scatter_(-1, tok.flatten(2).clamp(max=length), True)
        return mask[..., :length]

    def density(self, seqlens: torch.Tensor) -> torch.Tensor:
        """float [B, H]: tokens read / tokens in the sequence (on the device; no sync)."""
        b, h, k = self.pages.shape
        live = torch.arange(k, device=self.pages.device) < self.counts.unsqueeze(-1)
        lens = seqlens.view(-1, 1, 1).long()
        start = self.pages.long() * self.page_size
        read = ((lens - start).clamp(0, self.page_size) * live).sum(-1)
        return read.double() / lens.view(-1, 1).clamp(min=1).double()
