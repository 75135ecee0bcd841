"""Paged KV caches as decode kernels read them, and the page summaries that query-aware selection scores.

A cache is K and V storage plus, per sequence, a page table (logical page -> physical page) and a length:

- the serving-engine layout: K and V `[num_pages, page_size, Hkv, D]`, page table int32 `[B, max_pages]`
  (pages in any order), lengths int32 `[B]`;
- a contiguous `[B, Hkv, S, D]` cache (Hugging Face's) is read in place as the special case of consecutive
  pages: sequence b's page p starts at token p * page_size of its own rows (`PagedKVCache.from_contiguous`).

Kernels address a physical page `n` as `(n // P) * outer + (n % P) * inner` elements from the storage's
start (P pages per outer step: P = num_pages for the paged layout; P = pages per sequence for a contiguous
cache, whose outer step is the batch), then `t * token + h * head + d * dim` inside it.

`PageSummaries` keeps, per page and kv head, the element-wise min and max of the page's keys (Quest's bound
on q . k), in the cache's dtype (exact: a min or max of values is one of them). `rebuild` fills every page
(a cache filled by prefill); `update(first_page=...)` recomputes only the pages from that logical page on,
the one small launch per decode step that appending tokens needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ._checks import FLOAT_DTYPES, check_positive_int, check_tensor

__all__ = ["PagedKVCache", "PageSummaries", "PAGE_SIZES", "budget_pages", "window_pages", "consecutive_table",
           "contiguous_pages"]

PAGE_SIZES = (16, 32, 64)


def window_pages(window: int, page_size: int) -> int:
    """The most pages the last `window` tokens of a sequence can straddle (0 for no window)."""
    return -(-(int(window) + page_size - 1) // page_size) if window > 0 else 0


def budget_pages(budget: int, page_size: int, max_pages: int) -> int:
    """Pages a token budget buys (at least one; at most the table's width)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < page_size:
        raise ValueError(f"budget: expected an int of at least one page ({page_size} tokens), got {budget!r}")
    return max(1, min(budget // page_size, max_pages))


def contiguous_pages(seqlen: int, page_size: int) -> int:
    """Pages a contiguous cache of `seqlen` tokens is read as (at least one)."""
    return -(-seqlen // page_size) if seqlen else 1


def consecutive_table(batch: int, pages: int, device) -> torch.Tensor:
    """int32 [batch, pages]: the page table of a contiguous cache read as pages (sequence b's page p is b * pages
    + p)."""
    return (torch.arange(batch, device=device, dtype=torch.int32)[:, None] * pages
            + torch.arange(pages, device=device, dtype=torch.int32)[None, :])


@dataclass(frozen=True, eq=False)
class PagedKVCache:
    """A read-only view of one layer's KV cache as pages (see the module docstring).

    k, v: the storage, `[num_pages, page_size, Hkv, D]` (paged) or `[B, Hkv, S, D]` (contiguous).
    page_table: int32 [B, max_pages], physical page of each logical page (entries past a sequence's pages
    are not read). seqlens: int32 [B], tokens of each sequence (its last page may be partly filled).
    validate: check the table and lengths against the storage (reads them back: one device sync).
    """

    k: torch.Tensor
    v: torch.Tensor
    page_table: torch.Tensor
    seqlens: torch.Tensor
    page_size: int
    contiguous: bool = False
    validate: bool = True

    def __post_init__(self):
        check_tensor("k", self.k, ndim=4, dtypes=FLOAT_DTYPES)
        check_tensor("v", self.v, ndim=4, dtypes=(self.k.dtype,), device=self.k.device)
        if self.v.shape != self.k.shape:
            raise ValueError(f"v: expected the shape of k {tuple(self.k.shape)}, got {tuple(self.v.shape)}")
        check_tensor("page_table", self.page_table, ndim=2, dtypes=(torch.int32,), device=self.k.device)
        check_tensor("seqlens", self.seqlens, ndim=1, dtypes=(torch.int32,), device=self.k.device)
        check_positive_int("page_size", self.page_size)
        if self.page_size not in PAGE_SIZES:
            raise ValueError(f"page_size: expected one of {PAGE_SIZES}, got {self.page_size}")
        if self.page_table.shape[0] != self.seqlens.shape[0]:
            raise ValueError(f"seqlens: expected {self.page_table.shape[0]} lengths (page_table's batch), "
                             f"got {self.seqlens.shape[0]}")
        if self.contiguous:
            if self.k.shape[0] != self.batch:
                raise ValueError(f"k: a contiguous cache's batch {self.k.shape[0]} differs from page_table's "
                                 f"{self.batch}")
        elif self.k.shape[1] != self.page_size:
            raise ValueError(f"k: expected pages of page_size = {self.page_size} tokens (dim 1), got "
                             f"{self.k.shape[1]}")
        if self.k.stride(-1) != 1 or self.v.stride(-1) != 1:
            raise ValueError("k, v: expected the head dim contiguous (stride 1)")
        if self.validate:
            self.check_values()

    @classmethod
    def from_contiguous(cls, k: torch.Tensor, v: torch.Tensor, page_size: int = 64,
                        seqlens: Optional[torch.Tensor] = None, validate: bool = True,
                        page_table: Optional[torch.Tensor] = None) -> "PagedKVCache":
        """k, v [B, Hkv, S, D] (any strides with the head dim contiguous) read in place as consecutive pages;
        seqlens default S for every sequence. page_table: `consecutive_table(B, pages)` kept by a caller that
        makes this view at every decode step (it changes only when the cache crosses into a new page)."""
        check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
        b, _, s, _ = k.shape
        pages = contiguous_pages(s, page_size)
        if page_table is None:
            table = consecutive_table(b, pages, k.device)
        elif tuple(page_table.shape) != (b, pages):
            raise ValueError(f"page_table: expected the consecutive table of shape {(b, pages)}, got "
                             f"{tuple(page_table.shape)}")
        else:
            table = page_table
        if seqlens is None:
            seqlens = torch.full((b,), s, dtype=torch.int32, device=k.device)
        return cls(k, v, table, seqlens, page_size, contiguous=True, validate=validate)

    @property
    def batch(self) -> int:
        return self.page_table.shape[0]

    @property
    def max_pages(self) -> int:
        return self.page_table.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1] if self.contiguous else self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def num_pages(self) -> int:
        """Physical pages the storage holds."""
        if self.contiguous:
            return self.k.shape[0] * (-(-self.k.shape[2] // self.page_size))
        return self.k.shape[0]

    @property
    def capacity(self) -> int:
        """Tokens one sequence can hold: max_pages x page_size (the storage's length for a contiguous cache)."""
        return self.k.shape[2] if self.contiguous else self.max_pages * self.page_size

    def addressing(self, t: torch.Tensor) -> Tuple[int, int, int, int, int, int]:
        """(P, outer, inner, token, head, dim) strides in elements of k or v (see the module docstring)."""
        if self.contiguous:
            pages = -(-t.shape[2] // self.page_size)
            return pages, t.stride(0), self.page_size * t.stride(2), t.stride(2), t.stride(1), t.stride(3)
        return t.shape[0], 0, t.stride(0), t.stride(1), t.stride(2), t.stride(3)

    def num_pages_of(self) -> torch.Tensor:
        """int32 [B]: pages each sequence fills (on the device, no sync)."""
        return torch.div(self.seqlens + self.page_size - 1, self.page_size, rounding_mode="floor").to(torch.int32)

    def check_values(self) -> None:
        """Lengths within the capacity, and every page a sequence uses inside the storage (reads back)."""
        lens = self.seqlens.cpu()
        if (lens < 0).any() or (lens > self.capacity).any():
            raise ValueError(f"seqlens: expected lengths in [0, {self.capacity}] (max_pages x page_size, or the "
                             f"contiguous cache's length), got {lens.tolist()}")
        used = torch.arange(self.max_pages)[None, :] < (-(-lens // self.page_size))[:, None]
        table = self.page_table.cpu()
        bad = used & ((table < 0) | (table >= self.num_pages))
        if bad.any():
            b, p = bad.nonzero()[0].tolist()
            raise ValueError(f"page_table: entry [{b}, {p}] = {int(table[b, p])} points outside the cache's "
                             f"{self.num_pages} pages")

    def gather(self, b: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sequence b's keys and values as [Hkv, seqlen, D] (tests and references; copies)."""
        n = int(self.seqlens[b])
        pages = self.page_table[b, : -(-n // self.page_size)].long()
        if self.contiguous:
            per = -(-self.k.shape[2] // self.page_size)
            if n and not torch.equal(pages, torch.arange(b * per, b * per + len(pages), device=pages.device)):
                raise ValueError("page_table: a contiguous cache reads its own consecutive pages")
            return self.k[b, :, :n], self.v[b, :, :n]
        k = self.k[pages].flatten(0, 1)[:n].transpose(0, 1)
        v = self.v[pages].flatten(0, 1)[:n].transpose(0, 1)
        return k, v


@dataclass(eq=False)
class PageSummaries:
    """Per page and kv head the element-wise min, max and mean of the page's keys: kmin, kmax, kmean
    [num_summary_pages, Hkv, D] in the cache's dtype; `table` int32 [B, max_pages] maps each sequence's
    logical page to its summary slot (the page table for a paged cache: one slot per physical page).
    kmean may be None (summaries made without it); patterns that read it say so."""

    kmin: torch.Tensor
    kmax: torch.Tensor
    table: torch.Tensor
    page_size: int
    kmean: Optional[torch.Tensor] = None

    @classmethod
    def empty(cls, cache: PagedKVCache, capacity_pages: Optional[int] = None) -> "PageSummaries":
        """Unfilled summaries for `cache` (call rebuild). A contiguous cache gets capacity_pages slots per
        sequence (default: its current pages), so it can grow without moving its summaries."""
        hkv, d = cache.num_kv_heads, cache.head_dim
        dev, dt = cache.k.device, cache.k.dtype
        if cache.contiguous:
            per = max(capacity_pages or 0, cache.max_pages)
            table = (torch.arange(cache.batch, device=dev, dtype=torch.int32)[:, None] * per
                     + torch.arange(per, device=dev, dtype=torch.int32)[None, :])
            slots = cache.batch * per
        else:
            table, slots = cache.page_table, cache.num_pages
        new = lambda: torch.empty(slots, hkv, d, device=dev, dtype=dt)  # noqa: E731
        return cls(new(), new(), table, cache.page_size, new())

    @classmethod
    def build(cls, cache: PagedKVCache, capacity_pages: Optional[int] = None) -> "PageSummaries":
        out = cls.empty(cache, capacity_pages)
        out.rebuild(cache)
        return out

    @property
    def max_pages(self) -> int:
        return self.table.shape[1]

    def _check(self, cache: PagedKVCache) -> None:
        if cache.page_size != self.page_size or cache.k.dtype != self.kmin.dtype or \
                cache.num_kv_heads != self.kmin.shape[1] or cache.head_dim != self.kmin.shape[2]:
            raise ValueError(f"cache: expected page_size {self.page_size}, dtype {self.kmin.dtype}, "
                             f"{self.kmin.shape[1]} kv heads of dim {self.kmin.shape[2]} (the summaries'), got "
                             f"{cache.page_size}, {cache.k.dtype}, {cache.num_kv_heads}, {cache.head_dim}")
        if cache.max_pages > self.max_pages or cache.batch != self.table.shape[0]:
            raise ValueError(f"cache: {cache.batch} sequences of up to {cache.max_pages} pages do not fit the "
                             f"summaries' {self.table.shape[0]} x {self.max_pages}")

    def rebuild(self, cache: PagedKVCache) -> "PageSummaries":
        """Every page of every sequence, from the cache (after prefill)."""
        return self.update(cache, 0, cache.max_pages)

    def update(self, cache: PagedKVCache, first_page: Union[int, torch.Tensor], num_pages: int = 1
               ) -> "PageSummaries":
        """Recompute `num_pages` logical pages per sequence from `first_page` (an int, or int32 [B] on the
        device, e.g. (seqlens - 1) // page_size after appending one token): one launch, no host sync.
        Pages past a sequence's length are left as they are."""
        from .ops.paged_decode import summarize

        self._check(cache)
        check_positive_int("num_pages", num_pages)
        if not torch.is_tensor(first_page):
            first_page = torch.full((cache.batch,), int(first_page), dtype=torch.int32, device=cache.k.device)
        check_tensor("first_page", first_page, ndim=1, dtypes=(torch.int32,), device=cache.k.device)
        summarize(cache, self, first_page, num_pages)
        return self
