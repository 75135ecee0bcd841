"""Plain PyTorch attention over any mask or sparse layout: the oracle every kernel is tested against,
and the CPU fallback.

Processes query rows in chunks, so memory grows with chunk x seqlen_k, never seqlen_q x seqlen_k.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .._checks import FLOAT_DTYPES, check_cu_seqlens, check_tensor
from ..layouts import Layout

__all__ = ["reference_attention", "AttentionInputs", "check_attention_inputs"]

Mask = Union[None, torch.Tensor, Layout]

# Elements of one chunk's score matrix (heads x rows x keys): 2**25 float32 is 128 MiB.
_CHUNK_ELEMENTS = 1 << 25


class AttentionInputs:
    """Shapes of a (q, k, v) call, in either the padded [B, H, S, D] or the packed [T, H, D] layout."""

    def __init__(self, q, k, v, cu_seqlens_q=None, cu_seqlens_k=None):
        packed = cu_seqlens_q is not None or cu_seqlens_k is not None
        if packed and (cu_seqlens_q is None or cu_seqlens_k is None):
            raise ValueError("cu_seqlens_q, cu_seqlens_k: pass both for packed (varlen) inputs, or neither")
        nd = 3 if packed else 4
        form = "[total_tokens, heads, head_dim] (packed, with cu_seqlens)" if packed else "[batch, heads, seq, head_dim]"
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_tensor(name, t, ndim=nd, dtypes=FLOAT_DTYPES, device=q.device)
            if t.dim() != nd:
                raise ValueError(f"{name}: expected {form}, got shape {tuple(t.shape)}")
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(f"k, v: expected the dtype of q ({q.dtype}), got k {k.dtype}, v {v.dtype}")
        if k.shape != v.shape:
            raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
        self.packed = packed
        self.head_dim = q.shape[-1]
        if k.shape[-1] != self.head_dim:
            raise ValueError(f"k: expected head_dim {self.head_dim} (that of q), got {k.shape[-1]}")
        if packed:
            self.num_heads, self.num_kv_heads = q.shape[1], k.shape[1]
            self.batch = cu_seqlens_q.numel() - 1
            check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, self.batch, q.shape[0], q.device)
            check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, self.batch, k.shape[0], q.device)
            self.cu_q = cu_seqlens_q.cpu().tolist()
            self.cu_k = cu_seqlens_k.cpu().tolist()
            self.seqlens_q = [b - a for a, b in zip(self.cu_q[:-1], self.cu_q[1:])]
            self.seqlens_k = [b - a for a, b in zip(self.cu_k[:-1], self.cu_k[1:])]
        else:
            self.batch, self.num_heads = q.shape[0], q.shape[1]
            self.num_kv_heads = k.shape[1]
            if k.shape[0] != self.batch:
                raise ValueError(f"k: expected batch {self.batch} (that of q), got {k.shape[0]}")
            self.seqlens_q = [q.shape[2]] * self.batch
            self.seqlens_k = [k.shape[2]] * self.batch
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"k: expected a number of kv heads that divides the query heads ({self.num_heads}), "
                f"got {self.num_kv_heads}"
            )
        self.max_seqlen_q = max(self.seqlens_q, default=0)
        self.max_seqlen_k = max(self.seqlens_k, default=0)

    def sequence(self, t: torch.Tensor, b: int, which: str) -> torch.Tensor:
        """Sequence b of q ('q') or k/v ('k') as [heads, seq, head_dim]."""
        if not self.packed:
            return t[b]
        cu = self.cu_q if which == "q" else self.cu_k
        return t[cu[b] : cu[b + 1]].transpose(0, 1)


def check_attention_inputs(q, k, v, mask: Mask, cu_seqlens_q=None, cu_seqlens_k=None) -> AttentionInputs:
    shapes = AttentionInputs(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if isinstance(mask, Layout):
        if mask.batch != shapes.batch or mask.num_heads != shapes.num_heads:
            raise ValueError(
                f"layout: expected batch {shapes.batch} and {shapes.num_heads} query heads, "
                f"got batch {mask.batch} and {mask.num_heads} heads"
            )
        if mask.seqlen_q < shapes.max_seqlen_q or mask.seqlen_k < shapes.max_seqlen_k:
            raise ValueError(
                f"layout: expected seqlen_q >= {shapes.max_seqlen_q} and seqlen_k >= {shapes.max_seqlen_k}, "
                f"got {mask.seqlen_q} and {mask.seqlen_k}"
            )
    elif isinstance(mask, torch.Tensor):
        check_tensor("mask", mask, ndim=4, dtypes=(torch.bool,), device=q.device)
        b, h, sq, sk = mask.shape
        if b not in (1, shapes.batch) or h not in (1, shapes.num_heads) or sq < shapes.max_seqlen_q or sk < shapes.max_seqlen_k:
            raise ValueError(
                f"mask: expected shape [1 or {shapes.batch}, 1 or {shapes.num_heads}, >= {shapes.max_seqlen_q}, "
                f">= {shapes.max_seqlen_k}], got {tuple(mask.shape)}"
            )
    elif mask is not None:
        raise TypeError(
            f"mask: expected None, a bool tensor or a sparse_attn Layout, got {type(mask).__name__}"
        )
    return shapes


def _mask_rows(mask: Mask, b: int, r0: int, r1: int, sk: int, heads: int, device) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        m = mask[min(b, mask.shape[0] - 1), :, r0:r1, :sk]
    else:
        m = mask.mask_rows(b, r0, r1, sk)
    return m.to(device).expand(heads, r1 - r0, sk)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Mask = None,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    upcast: bool = True,
    chunk_size: Optional[int] = None,
):
    """softmax(q k^T * scale, restricted to `mask` and the causal band) @ v, computed in float32.

    q: [B, Hq, Sq, D] or packed [Tq, Hq, D] with cu_seqlens_q; k, v: [B, Hkv, Sk, D] or [Tk, Hkv, D].
    Hq must be a multiple of Hkv (grouped-query attention). Causal masking is bottom-right aligned
    (query i sees key j <= i + Sk - Sq). Rows that see no key give output 0 and log-sum-exp -inf.
    Returns the output in q's dtype and, with return_lse, the float32 log-sum-exp of shape q.shape[:-1].
    `upcast=False` computes in the input dtype (the low-precision baseline of tolerance checks).
    """
    s = check_attention_inputs(q, k, v, mask, cu_seqlens_q, cu_seqlens_k)
    scale = s.head_dim ** -0.5 if scale is None else float(scale)
    cdt = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    group = s.num_heads // s.num_kv_heads
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    for b in range(s.batch):
        sq, sk = s.seqlens_q[b], s.seqlens_k[b]
        qb = s.sequence(q, b, "q")
        kb = s.sequence(k, b, "k").to(cdt)
        vb = s.sequence(v, b, "k").to(cdt)
        ob = s.sequence(out, b, "q")
        lb = lse[b] if not s.packed else lse[s.cu_q[b] : s.cu_q[b + 1]].transpose(0, 1)
        rows = chunk_size or max(1, _CHUNK_ELEMENTS // max(1, s.num_heads * sk))
        for r0 in range(0, sq, rows):
            r1 = min(sq, r0 + rows)
            qc = qb[:, r0:r1].to(cdt).unflatten(0, (s.num_kv_heads, group))
            scores = torch.matmul(qc, kb.unsqueeze(1).transpose(-1, -2)) * scale  # [Hkv, g, rows, sk]
            allowed = _mask_rows(mask, b, r0, r1, sk, s.num_heads, q.device)
            if causal:
                i = torch.arange(r0, r1, device=q.device)[:, None] + (sk - sq)
                band = torch.arange(sk, device=q.device)[None, :] <= i
                allowed = band.expand(s.num_heads, -1, -1) if allowed is None else allowed & band
            if allowed is not None:
                scores = scores.masked_fill(~allowed.unflatten(0, (s.num_kv_heads, group)), float("-inf"))
            m = torch.logsumexp(scores.float(), dim=-1, keepdim=True)
            p = torch.exp(scores.float() - m).nan_to_num(0.0).to(cdt)
            ob[:, r0:r1] = torch.matmul(p, vb.unsqueeze(1)).flatten(0, 1).to(q.dtype)
            lb[:, r0:r1] = m.squeeze(-1).flatten(0, 1)
    return (out, lse) if return_lse else out


def sdpa(q, k, v, **kwargs) -> torch.Tensor:
    """torch SDPA where k/v may have fewer heads than q (GQA): `enable_gqa` where torch has it (>= 2.5),
    else k/v repeated per query head."""
    group = q.shape[-3] // k.shape[-3]
    if group == 1:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    if _SDPA_GQA:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, -3), v.repeat_interleave(group, -3), **kwargs)


_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def sdpa_layout_attention(q, k, v, mask: Mask, *, causal: bool = False, scale: Optional[float] = None,
                          upcast: bool = True, rows: int = 512) -> torch.Tensor:
    """The same attention as `reference_attention` for [B, H, S, D] inputs, through torch SDPA with the
    layout's boolean mask, `rows` query rows at a time (memory: H x rows x Sk bools).

    The CPU path of the sparse methods: SDPA's fused CPU kernel is several times faster than the explicit
    reference and computes exactly the same entries. No log-sum-exp; rows that see no key give 0.
    """
    s = check_attention_inputs(q, k, v, mask)
    if s.packed:
        raise ValueError("q: sdpa_layout_attention takes [B, H, S, D] tensors; use reference_attention for packed")
    cdt = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    sq, sk = q.shape[2], k.shape[2]
    kc, vc = k.to(cdt), v.to(cdt)
    out = torch.empty_like(q)
    cols = torch.arange(sk, device=q.device)
    for b in range(s.batch):
        for r0 in range(0, sq, rows):
            r1 = min(sq, r0 + rows)
            allowed = _mask_rows(mask, b, r0, r1, sk, s.num_heads, q.device)
            if causal:
                band = cols[None, :] <= torch.arange(r0, r1, device=q.device)[:, None] + (sk - sq)
                allowed = band.expand(s.num_heads, -1, -1) if allowed is None else allowed & band
            o = sdpa(q[b:b + 1, :, r0:r1].to(cdt), kc[b:b + 1], vc[b:b + 1],
                     attn_mask=None if allowed is None else allowed[None], scale=scale)
            out[b:b + 1, :, r0:r1] = o.nan_to_num(0.0).to(q.dtype)  # a row with no key: SDPA gives NaN
    return out
