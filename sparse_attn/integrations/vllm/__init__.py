"""sparse_attn as a vLLM (V1, >= 0.20) attention backend, plugged in without touching vLLM's files.

Installing sparse_attn registers the plugin `sparse_attn` in the `vllm.general_plugins` entry-point group;
vLLM calls `register()` in every process, which registers the backend as `AttentionBackendEnum.CUSTOM`.
Select it with `--attention-backend CUSTOM` or `LLM(model, attention_backend="CUSTOM")`; the method comes
from the model's `sparse_attention_config` block (sparse_attn.integrations.config), or $SPARSE_ATTN_CONFIG.

    SPARSE_ATTN_VLLM_BACKEND=CPU_ATTN   registers over that built-in backend instead (vLLM's CPU platform
                                        always picks CPU_ATTN)
    SPARSE_ATTN_LOG_EVERY=N             log per-layer density every N steps (see .stats)

Importing this package does not import vLLM; `register()` and the backend module do.
"""
from __future__ import annotations

import os

from .stats import ServingStats, disable_stats, enable_stats, get_stats

__all__ = ["register", "BACKEND_PATH", "BACKEND_ENV", "enable_stats", "disable_stats", "get_stats", "ServingStats"]

BACKEND_PATH = "sparse_attn.integrations.vllm.backend.SparseAttentionBackend"
BACKEND_ENV = "SPARSE_ATTN_VLLM_BACKEND"


def register(name: str = None) -> None:
    """Register the backend under AttentionBackendEnum[name] (default CUSTOM, or $SPARSE_ATTN_VLLM_BACKEND).
    The `vllm.general_plugins` entry point."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    name = name or os.environ.get(BACKEND_ENV) or "CUSTOM"
    try:
        member = AttentionBackendEnum[name]
    except (KeyError, ValueError):
        raise ValueError(f"{BACKEND_ENV}: expected an AttentionBackendEnum name (e.g. CUSTOM, CPU_ATTN), "
                         f"got {name!r}") from None
    register_backend(member, BACKEND_PATH)
