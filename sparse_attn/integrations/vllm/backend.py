"""The vLLM V1 attention backend: sparse prefill over the paged cache, sparse paged decode, vLLM's own cache.

KV cache: vLLM's packed form, logical `(num_blocks, Hkv, block_size, 2 * D)` (K in the first D of the last
dim, V in the second), physically block-major and token-major (stride order NHD: `(num_blocks, block_size,
Hkv, 2 * D)`). K and V are the two halves as views `[num_blocks, block_size, Hkv, D]`: the package's paged
kernels (sparse_attn.kvcache.PagedKVCache) read them in place, through vLLM's block table. The kernel block
size is 64, 32 or 16 tokens (vLLM splits larger cache blocks into those); 64 is preferred.

A step's batch is ordered by vLLM decodes first (reorder threshold 1):
- decodes (one query each): sparse_attn's paged decode kernel over the pages the method's decode pattern
  selects (every page for the dense decode side; every page of sequences shorter than the method's
  min_seqlen), on the device without a host sync, so decode-only batches are CUDA-graph capturable
  (cudagraph support UNIFORM_SINGLE_TOKEN_DECODE). Patterns that score pages read per-layer page summaries
  (key min / max per block, a side tensor of num_blocks x Hkv x D x 2 beside the cache, ~2/block_size of its
  size, not counted by vLLM's memory profiling) refreshed for the blocks each step writes.
- every other request (prefill chunks, extends; chunked prefill and prefix caching on): its queries attend
  to the sequence's whole K/V, gathered from the pages into contiguous [1, Hkv, seq_len, D] tensors (one
  sequence at a time: transient memory of one sequence's K and V), through `sparse_attention` with
  bottom-right causal masking: the method runs on every chunk of a sequence of min_seqlen tokens or more
  (however few queries the scheduler gave the chunk), sequences shorter than that run dense.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch

from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

from ...kvcache import PAGE_SIZES, PagedKVCache, PageSummaries
from ...layouts import PageSelection
from ...methods import sparse_attention
from ...ops.paged_decode import paged_decode_attention
from ..config import read_config
from .cache_write import write_kv
from .settings import HEAD_SIZES, RankSettings, layer_index, not_supported_reasons, resolve_settings
from .stats import get_stats

__all__ = ["SparseAttentionBackend", "SparseAttentionImpl", "SparseAttentionMetadata",
           "SparseAttentionMetadataBuilder"]

PREFERRED_BLOCK_SIZE = 64


@dataclass
class SparseAttentionMetadata:
    """One step's batch, shared by every layer. Decodes are requests [0, num_decodes) and tokens
    [0, num_decodes); `prefills` lists the other requests as host ints (request, first token, last token + 1,
    sequence length)."""

    num_actual_tokens: int
    num_decodes: int
    max_query_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor  # int32 [num_reqs], this step's tokens included
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks]
    slot_mapping: torch.Tensor
    new_pages: int  # pages per request a step can write into (summaries refresh)
    prefills: Tuple[Tuple[int, int, int, int], ...]


class SparseAttentionMetadataBuilder(AttentionMetadataBuilder[SparseAttentionMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    reorder_batch_threshold: int = 1

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        if hasattr(self, "_init_reorder_batch_threshold"):
            self._init_reorder_batch_threshold(1)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> SparseAttentionMetadata:
        cm = common_attn_metadata
        starts = cm.query_start_loc_cpu[: cm.num_reqs + 1].tolist()
        lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
        num_decodes = 0
        while num_decodes < len(lens) and lens[num_decodes] == 1:
            num_decodes += 1
        prefills: Tuple[Tuple[int, int, int, int], ...] = ()
        if num_decodes < cm.num_reqs:
            upper = getattr(cm, "seq_lens_cpu_upper_bound", None)  # exact for prefill rows
            seq_lens = (upper if upper is not None else cm.seq_lens.cpu())[: cm.num_reqs].tolist()
            prefills = tuple((i, starts[i], starts[i + 1], int(seq_lens[i]))
                             for i in range(num_decodes, cm.num_reqs) if lens[i] > 0)
        bs = self.block_size
        # Views of vLLM's persistent buffers only: a captured decode graph reads them again at replay.
        return SparseAttentionMetadata(
            num_actual_tokens=cm.num_actual_tokens, num_decodes=num_decodes, max_query_len=cm.max_query_len,
            query_start_loc=cm.query_start_loc[: cm.num_reqs + 1], seq_lens=cm.seq_lens[: cm.num_reqs],
            block_table=cm.block_table_tensor[: cm.num_reqs], slot_mapping=cm.slot_mapping,
            new_pages=(max(cm.max_query_len, 1) + bs - 2) // bs + 1, prefills=prefills)


class SparseAttentionBackend(AttentionBackend):
    """Registered as AttentionBackendEnum.CUSTOM by sparse_attn's vLLM plugin (see sparse_attn.integrations.vllm)."""

    accept_output_buffer: bool = True
    supported_dtypes: ClassVar[List[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[List[str]] = ["auto", "float16", "bfloat16"]
    forward_includes_kv_cache_update: bool = False

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return SparseAttentionImpl

    @staticmethod
    def get_builder_cls():
        return SparseAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes():
        return sorted(PAGE_SIZES, reverse=True)

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int = 16) -> int:
        return PREFERRED_BLOCK_SIZE

    @classmethod
    def get_supported_head_sizes(cls) -> List[int]:
        return list(HEAD_SIZES)

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> Tuple[int, ...]:
        reasons = not_supported_reasons(head_size=head_size, block_size=block_size, kv_cache_dtype=cache_dtype_str)
        if reasons:
            raise ValueError("sparse_attn backend: " + "; ".join(reasons))
        if block_size not in PAGE_SIZES:
            raise ValueError(f"block_size: the kernel block size must be one of {list(PAGE_SIZES)}, got {block_size}")
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> Tuple[int, ...]:
        # Physically (num_blocks, block_size, Hkv, 2 * D) (NHD); with a layers dimension, blocks stay outermost.
        return (1, 0, 3, 2, 4) if include_num_layers_dimension else (0, 2, 1, 3)

    @classmethod
    def get_required_kv_cache_layout(cls):
        return "NHD"

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def validate_configuration(cls, head_size, dtype, kv_cache_dtype, block_size, *args, **kwargs) -> List[str]:
        """vLLM's checks, with sparse_attn's own reasons in place of the generic ones for the same field."""
        ours = not_supported_reasons(head_size=head_size, block_size=block_size, dtype=dtype,
                                     kv_cache_dtype=kv_cache_dtype)
        generic = {"head_size not supported", "dtype not supported", "kv_cache_dtype not supported",
                   "block_size not supported"}
        theirs = super().validate_configuration(head_size, dtype, kv_cache_dtype, block_size, *args, **kwargs)
        return ours + [r for r in theirs if r not in generic]


_SETTINGS: Dict[tuple, RankSettings] = {}


def _tp_rank_size() -> Tuple[int, int]:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except Exception:  # not initialized: a single process (unit tests)
        return 0, 1


def rank_settings(num_heads: int, num_kv_heads: int, head_size: int) -> RankSettings:
    """The settings of this process's rank, from the served model's config (and $SPARSE_ATTN_CONFIG)."""
    model_config = get_current_vllm_config().model_config
    hf_config = getattr(model_config, "hf_config", None) if model_config is not None else None
    model_dir = getattr(model_config, "model", None) if model_config is not None else None
    config = read_config(hf_config, model_dir=model_dir)
    text = getattr(model_config, "hf_text_config", hf_config) if model_config is not None else None
    num_layers = getattr(text, "num_hidden_layers", None)
    rank, size = _tp_rank_size()
    name = str(model_dir) if model_dir else None
    key = (json.dumps(config.__dict__ if config else None, sort_keys=True, default=str), num_heads, num_kv_heads,
           head_size, rank, size, num_layers, name)
    if key not in _SETTINGS:
        _SETTINGS[key] = resolve_settings(config, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                          head_size=head_size, tp_rank=rank, tp_size=size, num_layers=num_layers,
                                          model_name=name)
    return _SETTINGS[key]


def dense_below(selection: PageSelection, cache: PagedKVCache, min_seqlen: int) -> PageSelection:
    """`selection` with every page for the sequences shorter than min_seqlen (on the device, static shapes)."""
    if min_seqlen <= 1:
        return selection
    b, h, width = selection.pages.shape
    ps = cache.page_size
    width2 = max(width, min(-(-(min_seqlen - 1) // ps), cache.max_pages))
    pages = selection.pages
    if width2 > width:
        pages = torch.cat([pages, pages.new_zeros(b, h, width2 - width)], dim=2)
    short = cache.seqlens < min_seqlen
    every = torch.arange(width2, device=pages.device, dtype=pages.dtype).view(1, 1, -1)
    pages = torch.where(short.view(-1, 1, 1), every, pages)
    counts = torch.where(short.view(-1, 1), cache.num_pages_of().view(-1, 1).to(selection.counts.dtype),
                         selection.counts)
    return PageSelection(pages.contiguous(), counts.contiguous(), ps)


class SparseAttentionImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: Optional[int] = None,
                 alibi_slopes: Optional[List[float]] = None, sliding_window: Optional[int] = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: Optional[float] = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: Optional[str] = None,
                 **extra: Any) -> None:
        unsupported = [name for name, on in (("alibi_slopes", alibi_slopes is not None),
                                             ("sliding_window", sliding_window is not None),
                                             ("logits_soft_cap", bool(logits_soft_cap)),
                                             ("sinks", extra.get("sinks") is not None),
                                             ("kv_sharing_target_layer_name", kv_sharing_target_layer_name is not None))
                       if on]
        if attn_type != AttentionType.DECODER:
            unsupported.append(f"attn_type {attn_type}")
        if unsupported:
            raise NotImplementedError(f"sparse_attn backend: {', '.join(unsupported)} not supported (causal decoder "
                                      "self-attention only)")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        reasons = not_supported_reasons(head_size=head_size, kv_cache_dtype=kv_cache_dtype)
        if reasons:
            raise ValueError("sparse_attn backend: " + "; ".join(reasons))
        self.settings = rank_settings(num_heads, self.num_kv_heads, head_size)
        self._summaries: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # key min, max, mean

    # -- the cache ------------------------------------------------------------------------------------------
    def split_cache(self, kv_cache: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """K and V views [num_blocks, block_size, Hkv, D] of the packed cache (no copy)."""
        kv = kv_cache.transpose(1, 2)
        return kv[..., : self.head_size], kv[..., self.head_size:]

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        if kv_cache.numel() == 0:
            return
        k_cache, v_cache = self.split_cache(kv_cache)
        write_kv(key, value, k_cache, v_cache, slot_mapping)

    def _page_summaries(self, k_cache: torch.Tensor, table: torch.Tensor) -> PageSummaries:
        n, _, hkv, d = k_cache.shape
        if self._summaries is None or self._summaries[0].shape[0] != n or self._summaries[0].dtype != k_cache.dtype \
                or self._summaries[0].device != k_cache.device:
            # No fill (a fill inside a captured graph would rerun at every replay): every page is summarized
            # by the step that writes it, before any step reads it.
            new = lambda: torch.empty(n, hkv, d, device=k_cache.device, dtype=k_cache.dtype)  # noqa: E731
            self._summaries = (new(), new(), new())
        kmin, kmax, kmean = self._summaries
        return PageSummaries(kmin, kmax, table, k_cache.shape[1], kmean)

    # -- attention ------------------------------------------------------------------------------------------
    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: Optional[SparseAttentionMetadata], output: torch.Tensor,
                output_scale: Optional[torch.Tensor] = None, output_block_scale: Optional[torch.Tensor] = None,
                ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("sparse_attn backend: fused output quantization is not supported")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        md = attn_metadata
        idx = layer_index(getattr(layer, "layer_name", "") or "0")
        stats = get_stats()
        if idx == 0 and stats.enabled:
            stats.step()
        k_cache, v_cache = self.split_cache(kv_cache)
        pattern = self.settings.decode_pattern
        summaries = None
        if pattern is not None and pattern.summaries:
            summaries = self._page_summaries(k_cache, md.block_table)
            cache = PagedKVCache(k_cache, v_cache, md.block_table, md.seq_lens, k_cache.shape[1], validate=False)
            new = md.query_start_loc[1:] - md.query_start_loc[:-1]
            first = torch.div((md.seq_lens - new).clamp(min=0), k_cache.shape[1], rounding_mode="floor")
            summaries.update(cache, first.to(torch.int32), md.new_pages)
        if md.num_decodes:
            self._decode(query[: md.num_decodes], k_cache, v_cache, md, output[: md.num_decodes], summaries, idx)
        if md.prefills:
            self._prefill(query, k_cache, v_cache, md, output, idx)
        return output

    def _decode(self, q: torch.Tensor, k_cache, v_cache, md: SparseAttentionMetadata, out: torch.Tensor,
                summaries: Optional[PageSummaries], idx: int) -> None:
        nd, ps = md.num_decodes, k_cache.shape[1]
        cache = PagedKVCache(k_cache, v_cache, md.block_table[:nd], md.seq_lens[:nd], ps, validate=False)
        pattern = self.settings.decode_pattern
        selection = None
        if pattern is not None:
            if summaries is not None:
                summaries = PageSummaries(summaries.kmin, summaries.kmax, md.block_table[:nd], ps, summaries.kmean)
            selection = pattern.select(q, cache, summaries, scale=self.scale, **self.settings.decode_budgets)
            selection = dense_below(selection, cache, self.settings.min_seqlen)
        out.copy_(paged_decode_attention(q, cache, selection, scale=self.scale))
        stats = get_stats()
        if stats.enabled and not _capturing(q):
            stats.add("decode", idx, selection.density(cache.seqlens).mean() if selection is not None else 1.0)

    def _prefill(self, query: torch.Tensor, k_cache, v_cache, md: SparseAttentionMetadata, output: torch.Tensor,
                 idx: int) -> None:
        s = self.settings
        head_config = s.head_config(idx)
        stats = get_stats()
        ps = k_cache.shape[1]
        for req, q0, q1, seq_len in md.prefills:
            pages = md.block_table[req, : -(-seq_len // ps)].long()
            k = k_cache[pages].flatten(0, 1)[:seq_len].transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
            v = v_cache[pages].flatten(0, 1)[:seq_len].transpose(0, 1).unsqueeze(0)
            q = query[q0:q1].transpose(0, 1).unsqueeze(0)  # [1, Hq, Sq, D]
            info: Optional[Dict[str, Any]] = {} if stats.enabled else None
            # A chunk of a sequence of min_seqlen tokens or more runs the method, however few its queries
            # (vLLM's chunk sizes follow its scheduler); shorter sequences follow the method's own rule.
            kwargs = {**s.kwargs, "min_seqlen": 0} if seq_len >= s.min_seqlen else s.kwargs
            out = sparse_attention(q, k, v, s.method, causal=True, scale=self.scale, head_config=head_config,
                                   stats=info, **kwargs)
            output[q0:q1].copy_(out[0].transpose(0, 1))
            if info is not None and "density" in info:
                stats.add("prefill", idx, float(info["density"].float().mean()), q1 - q0)


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()
