"""Vertical-slash attention for Hopper (sm_90), written in Gluon: the Triton kernel's tile loop with
explicit wgmma groups and, for the common K/V layouts, a warp-specialised TMA loader. The default where it
applies (`SPARSE_ATTN_VS_BACKEND=auto`, kernel.forward): on the H100 the warp-specialised kernel's attention
call is 3-4 % faster than the Triton kernel's (41.8-42.1 against 43.4-43.5 ms at 128K in the same run; 634
against 636 ms at 1M), since the compute warpgroup reads each tile's bounds an iteration ahead instead of
waiting on them before its softmax (H100, 2026-11-23).

Two kernels, same plan, tile list and program order as the Triton kernel (ranges cut into BN-wide tiles,
then the columns BN at a time, one flat list per block), one compute warpgroup (64 query rows) per program,
two programs per SM. Per tile t the compute warpgroup runs FlashAttention-3's intra-warpgroup order:

    issue S[t] = Q K[t]^T;  rescale O;  issue O += P[t-1] V[t-1]
    wait for S[t] only;  softmax(S[t]) -> P[t]  (on the CUDA cores, while PV[t-1] runs)
    wait for PV[t-1]

O is never in flight across the loop's back edge (ptxas serialises every wgmma when registers of one in
flight are read, which carrying it across would cause). What runs in SASS is less: ptxas moves the wait
for PV[t-1] up to just after the row max, so the exponentials do not overlap PV (two tiles per loop trip,
tried to give P[t] its own registers, made ptxas serialise every wgmma). Keys past a tile's end are
masked out of the scores; only tiles that need it (a partial tile, a tile near the causal diagonal, the
columns not every row sees) pay the mask. Q sits in shared memory as the A operand of the score GEMM, P
stays in registers as the A operand of PV.

- `_vs_hopper_ws_kernel` (K/V as contiguous rows, [B, Hkv, S, D], HF's transposed [B, S, Hkv, D] view or
  packed [T, Hkv, D]): warp-specialised. A loader partition (one warpgroup at 40 registers; the compute
  warpgroup gets 216) fills a 3-stage K/V ring: range tiles through TMA (two 64-column messages per tensor),
  column tiles gathered with cp.async. Each stage has a ready and an empty mbarrier; the compute warpgroup
  issues no loads at all and releases a stage once PV of its tile has been waited for. A range tile is
  BN rows from its start: rows past its end (the next keys, or another head's or sequence's rows of the
  2D view) are read and masked out, so a V holding inf/NaN there could leak, as in the Triton kernel's TMA
  path.
- `_vs_hopper_kernel` (everything else, e.g. a padded last dim): the compute warpgroup fills the ring itself
  with cp.async, one commit group per K or V tile, two iterations of lead. Slower (58.9 ms at 128K): every
  thread generates its 16 row addresses per tile.

Scope: 16-bit inputs, head dim 64 or 128, 64-row layout blocks, one head per program, the last dim
contiguous; `kernel.forward` takes the Triton kernel for everything else.
"""
from __future__ import annotations

import torch

try:  # Gluon ships with Triton >= 3.5; anything missing means this path is off
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_init, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    AVAILABLE = True
except Exception:  # noqa: BLE001
    AVAILABLE = False

__all__ = ["AVAILABLE", "supported", "forward"]

BM = 64
BN = 64
STAGES = 3
HEAD_DIMS = (64, 128)
# Warp-specialised kernel: a compute and a loader warpgroup, 128 registers a thread at launch (2 programs
# per SM); the loader gives up all but 40 (a one- or two-warp loader spills in the column gathers), so the
# compute warpgroup gets 216 (no spills in the compute warpgroup; the loader spills 16 bytes in its column-gather
# branch, ptxas -v on sm_90).
WS_MAXNREG = 128
WS_LOADER = (4, 40)  # loader partition: warps, registers

if AVAILABLE:

    @gluon.jit
    def _tile_keys(t, n_tiles, n_total, TS, TE, COLS, n_cols, lane, BN: gl.constexpr):
        """Keys of tile t of the block's list and which of them are real (a range tile: start + lane below
        its end; a column tile: listed columns). Tiles past the list give no real key."""
        tt = gl.minimum(t, gl.maximum(n_total - 1, 0))
        if tt < n_tiles:
            start = gl.load(TS + tt)
            keys = start + lane
            ok = lane < gl.load(TE + tt) - start
        else:
            c = (tt - n_tiles) * BN + lane
            ok = c < n_cols
            keys = gl.load(COLS + c, mask=ok, other=0)
        return keys, ok & (t < n_total)

    @gluon.jit
    def _copy_rows(X, keys, ok, s_xn, dst, D: gl.constexpr, LD: gl.constexpr):
        """cp.async the rows `keys` of X ([BN, D], zeros where not ok) into dst, as one commit group."""
        d = gl.arange(0, D, layout=gl.SliceLayout(0, LD))
        async_copy.async_copy_global_to_shared(dst, X + keys.to(gl.int64)[:, None] * s_xn + d[None, :],
                                               mask=ok[:, None])
        async_copy.commit_group()

    @gluon.jit
    def _tile_ends(t, n_tiles, TS, TE):
        """(start, end) of range tile t; (0, 0) for a column tile."""
        on = t < n_tiles
        return gl.load(TS + t, mask=on, other=0), gl.load(TE + t, mask=on, other=0)

    @gluon.jit
    def _needs_mask(t, start, end, n_tiles, n_full, n_seen, BN: gl.constexpr):
        """Whether tile t (range tiles: from start to end, see _tile_ends) has keys some row must not see: a
        partial range tile, a range tile past the ones every row sees whole, a column tile past the columns
        every row sees."""
        if t < n_tiles:
            need = (end - start < BN) | (t >= n_full)
        else:
            need = (t - n_tiles + 1) * BN > n_seen
        return need

    @gluon.jit
    def _mask_scores(s, keys, ok, rows, off, CAUSAL: gl.constexpr):
        """Scores of keys outside ok (or above a row's causal limit) set to -inf."""
        okm = ok[None, :]
        if CAUSAL:
            okm = okm & (keys[None, :] <= rows[:, None] + off)
        return gl.where(okm, s, float("-inf"))

    @gluon.jit
    def _fold(s, m_i, l_i, qk_scale, P_L: gl.constexpr, DT: gl.constexpr):
        """Scores of one tile folded into the running max / sum: (P in PV's register layout, the factor for O,
        new max, new sum)."""
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        # a row with no key yet keeps m = -inf: shift by 0 there, so exp2 gives 0, not NaN
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s * qk_scale - m_use[:, None])
        alpha = gl.exp2(m_i - m_use)
        l_i = l_i * alpha + gl.sum(p, 1)
        return gl.convert_layout(p.to(DT), P_L), alpha, m_new, l_i

    @gluon.jit
    def _softmax(s, m_i, l_i, need, keys, ok, rows, off, qk_scale, CAUSAL: gl.constexpr, P_L: gl.constexpr,
                 DT: gl.constexpr):
        """_fold of the tile's scores, masked first where need (_mask_scores)."""
        if need:
            s = _mask_scores(s, keys, ok, rows, off, CAUSAL)
        return _fold(s, m_i, l_i, qk_scale, P_L, DT)

    @gluon.jit
    def _program(CU_Q, CU_K, num_heads, group, nqb, seqlen_q, seqlen_k, VARLEN: gl.constexpr):
        """(query block, kv head, batch, query head, first row, rows, first key, keys) of this program, in the
        Triton kernel's order: the heads of a kv head side by side, last blocks first."""
        qb = nqb - 1 - gl.program_id(0) // group
        n_kv = num_heads // group
        hk = gl.program_id(1) % n_kv
        b = gl.program_id(1) // n_kv
        h = hk * group + gl.program_id(0) % group
        if VARLEN:
            q_start = gl.load(CU_Q + b)
            sq = gl.load(CU_Q + b + 1) - q_start
            k_start = gl.load(CU_K + b)
            sk = gl.load(CU_K + b + 1) - k_start
        else:
            zero = b * 0  # tensors, like the loads above
            q_start = zero
            sq = seqlen_q + zero
            k_start = zero
            sk = seqlen_k + zero
        return qb, hk, b, h, q_start, sq, k_start, sk

    @gluon.jit
    def _block_lists(COUNTS, FIRST_TILE, T_START, T_END, block, BN: gl.constexpr, NC: gl.constexpr):
        """The plan's counts for one block (range tiles, tiles every row sees, gathered keys, gathered keys every
        row sees rounded down to BN, all tiles) and its tile starts / ends / gathered keys ("columns": the
        layout's columns and the keys of spilled range tiles, listed after its range tiles)."""
        n_tiles = gl.load(COUNTS + block * NC)
        n_full = gl.load(COUNTS + block * NC + 1)
        n_cols = gl.load(COUNTS + block * NC + 2)
        n_seen = gl.load(COUNTS + block * NC + 3) // BN * BN
        first = gl.load(FIRST_TILE + block)
        n_total = n_tiles + (n_cols + BN - 1) // BN
        return n_tiles, n_full, n_cols, n_seen, n_total, T_START + first, T_END + first, T_START + first + n_tiles

    @gluon.jit
    def _load_q(Qh, s_qm, q_start, q0, sq, BM: gl.constexpr, D: gl.constexpr, LD: gl.constexpr):
        """The block's query rows of one head (Qh: its base), zeros past the sequence."""
        rq = gl.arange(0, BM, layout=gl.SliceLayout(1, LD))
        dq = gl.arange(0, D, layout=gl.SliceLayout(0, LD))
        q_rows = (q_start + q0 + rq).to(gl.int64)
        return gl.load(Qh + q_rows[:, None] * s_qm + dq[None, :], mask=(q0 + rq < sq)[:, None], other=0.0)

    @gluon.jit
    def _store_rows(acc, m_i, l_i, Oh, s_om, LSEh, s_lm, q_start, q0, sq, BM: gl.constexpr, D: gl.constexpr,
                    RETURN_LSE: gl.constexpr, O_L: gl.constexpr):
        """O = acc / l for the block's rows of one head (Oh, LSEh: its bases), and lse; rows that saw no key
        get 0 (acc is 0 there) and lse -inf."""
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, O_L))
        seen = l_o > 0.0
        out = acc / gl.where(seen, l_o, 1.0)[:, None]
        ro = gl.arange(0, BM, layout=gl.SliceLayout(1, O_L))
        do = gl.arange(0, D, layout=gl.SliceLayout(0, O_L))
        o_rows = (q_start + q0 + ro).to(gl.int64)
        gl.store(Oh + o_rows[:, None] * s_om + do[None, :], out.to(Oh.dtype.element_ty), mask=(q0 + ro < sq)[:, None])
        if RETURN_LSE:
            m_o = gl.convert_layout(m_i, gl.SliceLayout(1, O_L))
            lse = gl.where(seen, (m_o + gl.log2(gl.where(seen, l_o, 1.0))) * 0.6931471805599453, float("-inf"))
            gl.store(LSEh + o_rows * s_lm, lse, mask=q0 + ro < sq)

    @gluon.jit
    def _vs_hopper_kernel(
        Q, K, V, O, LSE, COUNTS, FIRST_TILE, T_START, T_END, CU_Q, CU_K,
        s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om, s_lb, s_lh, s_lm,
        num_heads, group, nqb, seqlen_q, seqlen_k, qk_scale,
        BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, CAUSAL: gl.constexpr, VARLEN: gl.constexpr,
        RETURN_LSE: gl.constexpr, STAGES: gl.constexpr, SWIZZLE: gl.constexpr, NC: gl.constexpr,
    ):
        S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BN, 16])
        O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, D, 16])
        P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
        LD: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // (D // 8), D // 8],
                                            warps_per_cta=[4, 1], order=[1, 0])
        dtype: gl.constexpr = Q.dtype.element_ty
        SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=SWIZZLE, element_bitwidth=16, rank=2)
        gl.static_assert(STAGES == 3, "the K/V ring's wait counts are written for 3 stages")

        qb, hk, b, h, q_start, sq, k_start, sk = _program(CU_Q, CU_K, num_heads, group, nqb, seqlen_q, seqlen_k,
                                                           VARLEN)
        q0 = qb * BM
        if q0 < sq:
            off = sk - sq
            b64 = b.to(gl.int64)
            h64 = h.to(gl.int64)
            hk64 = hk.to(gl.int64)

            q_smem = gl.allocate_shared_memory(dtype, [BM, D], SMEM,
                                               _load_q(Q + b64 * s_qb + h64 * s_qh, s_qm, q_start, q0, sq, BM, D, LD))
            k_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D], SMEM)
            v_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D], SMEM)

            n_tiles, n_full, n_cols, n_seen, n_total, TS, TE, COLS = _block_lists(
                COUNTS, FIRST_TILE, T_START, T_END, (b64 * num_heads + h64) * nqb + qb, BN, NC)
            Kb = K + b64 * s_kb + hk64 * s_kh + k_start.to(gl.int64) * s_kn
            Vb = V + b64 * s_vb + hk64 * s_vh + k_start.to(gl.int64) * s_vn

            # K/V ring of 3 stages, filled by cp.async, one commit group per K or V tile. Before the loop:
            # K0 V0 K1 V1 K2. Iteration t (1 .. n-1) needs K[t] and V[t - 1]; after its barrier the stages of
            # K[t - 1] and V[t - 2] are free (their GEMMs were waited for in iteration t - 1), so it issues
            # K[t + 2] and V[t + 1]: two iterations of lead for both. The keys of a tile (scalar loads, a
            # gather for column tiles) are loaded an iteration before its first copy.
            lane = gl.arange(0, BN, layout=gl.SliceLayout(1, LD))
            keys0, ok0 = _tile_keys(0, n_tiles, n_total, TS, TE, COLS, n_cols, lane, BN)
            keys1, ok1 = _tile_keys(1, n_tiles, n_total, TS, TE, COLS, n_cols, lane, BN)
            keys2, ok2 = _tile_keys(2, n_tiles, n_total, TS, TE, COLS, n_cols, lane, BN)
            _copy_rows(Kb, keys0, ok0, s_kn, k_smem.index(0), D, LD)
            _copy_rows(Vb, keys0, ok0, s_vn, v_smem.index(0), D, LD)
            _copy_rows(Kb, keys1, ok1, s_kn, k_smem.index(1), D, LD)
            _copy_rows(Vb, keys1, ok1, s_vn, v_smem.index(1), D, LD)
            _copy_rows(Kb, keys2, ok2, s_kn, k_smem.index(2), D, LD)
            keys3, ok3 = _tile_keys(3, n_tiles, n_total, TS, TE, COLS, n_cols, lane, BN)

            rows = q0 + gl.arange(0, BM, layout=gl.SliceLayout(1, S_L))
            lane_s = gl.arange(0, BN, layout=gl.SliceLayout(0, S_L))
            # Tile 0 (with no tile at all, tile 0 is all masked: rows end with l = 0, out 0, lse -inf).
            st, en = _tile_ends(0, n_tiles, TS, TE)
            need = _needs_mask(0, st, en, n_tiles, n_full, n_seen, BN) | (n_total == 0)
            keys_s, ok_s = _tile_keys(0, n_tiles, n_total, TS, TE, COLS, n_cols, lane_s, BN)
            async_copy.wait_group(4)
            gl.thread_barrier()
            fence_async_shared()
            s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), gl.zeros([BM, BN], gl.float32, S_L),
                              use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s, ))
            m_i = gl.full([BM], float("-inf"), gl.float32, gl.SliceLayout(1, S_L))
            l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, S_L))
            p16, alpha, m_i, l_i = _softmax(s, m_i, l_i, need, keys_s, ok_s, rows, off, qk_scale, CAUSAL, P_L, dtype)
            acc = gl.zeros([BM, D], gl.float32, O_L)
            for t in range(1, n_total):
                async_copy.wait_group(2)  # K[t] and V[t - 1] have landed
                gl.thread_barrier()
                fence_async_shared()
                s = warpgroup_mma(q_smem, k_smem.index(t % STAGES).permute((1, 0)),
                                  gl.zeros([BM, BN], gl.float32, S_L), use_acc=False, is_async=True)
                _copy_rows(Kb, keys3, ok3, s_kn, k_smem.index((t + 2) % STAGES), D, LD)
                _copy_rows(Vb, keys2, ok2, s_vn, v_smem.index((t + 1) % STAGES), D, LD)
                keys2 = keys3
                ok2 = ok3
                keys3, ok3 = _tile_keys(t + 3, n_tiles, n_total, TS, TE, COLS, n_cols, lane, BN)
                st, en = _tile_ends(t, n_tiles, TS, TE)
                need = _needs_mask(t, st, en, n_tiles, n_full, n_seen, BN)
                keys_s, ok_s = _tile_keys(t, n_tiles, n_total, TS, TE, COLS, n_cols, lane_s, BN)
                # O is not in flight here: rescale it, then PV[t - 1] runs while the softmax of S[t] does.
                acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, O_L))[:, None]
                acc = warpgroup_mma(p16, v_smem.index((t - 1) % STAGES), acc, is_async=True)
                s = warpgroup_mma_wait(1, deps=(s, ))
                p16, alpha, m_i, l_i = _softmax(s, m_i, l_i, need, keys_s, ok_s, rows, off, qk_scale, CAUSAL,
                                                P_L, dtype)
                acc = warpgroup_mma_wait(0, deps=(acc, ))
            last = gl.maximum(n_total - 1, 0)
            async_copy.wait_group(0)
            gl.thread_barrier()
            fence_async_shared()
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, O_L))[:, None]
            acc = warpgroup_mma(p16, v_smem.index(last % STAGES), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc, ))

            _store_rows(acc, m_i, l_i, O + b64 * s_ob + h64 * s_oh, s_om, LSE + b64 * s_lb + h64 * s_lh, s_lm,
                        q_start, q0, sq, BM, D, RETURN_LSE, O_L)


    @gluon.jit
    def _ws_loader(KD, VD, k_smem, v_smem, ready, empty, TS, COLS, n_tiles, n_cols, n_total, row0, col0, Kb, Vb,
                   s_kn, s_vn, D: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                   LOADER_WARPS: gl.constexpr):
        """Worker partition (LOADER_WARPS warps): fills the K/V ring. Tile t waits until its stage is empty (the
        consumer released tile t - STAGES), then loads: a range tile (rows start .. start + BN of the 2D
        views KD / VD, whose head starts at row0, col0) through TMA, a column tile gathered with cp.async by
        the partition's threads (listed columns, zeros past them; each thread's copies arrive on the stage's
        ready barrier, then one plain arrival once all have issued theirs)."""
        LDW: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // (D // 8), D // 8],
                                             warps_per_cta=[LOADER_WARPS, 1], order=[1, 0])
        lane = gl.arange(0, BN, layout=gl.SliceLayout(1, LDW))
        d = gl.arange(0, D, layout=gl.SliceLayout(0, LDW))
        start_next = gl.load(TS, mask=n_tiles > 0, other=0)
        for t in range(n_total):
            # a tile's start is loaded a tile ahead: its latency overlaps the wait for the stage, not the TMA issue
            start = start_next
            start_next = gl.load(TS + t + 1, mask=t + 1 < n_tiles, other=0)
            stage = t % STAGES
            mbarrier.wait(empty.index(stage), ((t // STAGES) & 1) ^ 1)
            bar = ready.index(stage)
            if t < n_tiles:
                mbarrier.expect(bar, 2 * KD.block_type.nbytes)
                tma.async_copy_global_to_shared(KD, [row0 + start, col0], bar, k_smem.index(stage))
                tma.async_copy_global_to_shared(VD, [row0 + start, col0], bar, v_smem.index(stage))
            else:
                c = (t - n_tiles) * BN + lane
                ok = c < n_cols
                keys = gl.load(COLS + c, mask=ok, other=0).to(gl.int64)
                async_copy.async_copy_global_to_shared(k_smem.index(stage), Kb + keys[:, None] * s_kn + d[None, :],
                                                       mask=ok[:, None])
                async_copy.async_copy_global_to_shared(v_smem.index(stage), Vb + keys[:, None] * s_vn + d[None, :],
                                                       mask=ok[:, None])
                async_copy.mbarrier_arrive(bar)
                gl.thread_barrier()
                mbarrier.arrive(bar, count=1)

    @gluon.jit
    def _tile_mask(t, start, end, n_tiles, n_full, n_seen, COLS, n_cols, lane, BN: gl.constexpr):
        """(need, column keys) of tile t, from its (start, end) loaded ahead (_needs_mask). A column tile's keys
        are loaded here (early, off the way to the softmax), only where it is masked; everything else about the
        keys is left to _tile_keys_of, called only where the tile is masked. (Built here for every tile, a range
        tile's keys and bounds predicates cost ~50 instructions a warp per tile, whether masked or not.)"""
        need = _needs_mask(t, start, end, n_tiles, n_full, n_seen, BN)
        if t < n_tiles:
            ckeys = gl.zeros_like(lane)
        else:
            c = (t - n_tiles) * BN + lane
            ckeys = gl.load(COLS + c, mask=(c < n_cols) & need, other=0)
        return need, ckeys

    @gluon.jit
    def _tile_keys_of(t, start, end, ckeys, n_tiles, n_total, n_cols, lane, BN: gl.constexpr):
        """(keys, which are real) of tile t: a range tile's from its (start, end), a column tile's ckeys."""
        if t < n_tiles:
            keys = start + lane
            ok = lane < end - start
        else:
            keys = ckeys
            ok = (t - n_tiles) * BN + lane < n_cols
        return keys, ok & (t < n_total)

    @gluon.jit
    def _ws_consumer(q_smem, k_smem, v_smem, ready, empty, TS, TE, COLS, n_tiles, n_full, n_seen, n_cols, n_total,
                     q0, off, qk_scale, BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, CAUSAL: gl.constexpr,
                     STAGES: gl.constexpr):
        """Default partition (one warpgroup): the tile loop (module docstring) without any loads of its own.
        Tile t is in stage t % STAGES, ready at phase (t // STAGES) & 1; the stage is released (arrive on
        empty) once PV of its tile has been waited for. Returns (O unnormalised, running max, running sum)."""
        S_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BN, 16])
        O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, D, 16])
        P_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_L, k_width=2)
        dtype: gl.constexpr = q_smem.dtype
        rows = q0 + gl.arange(0, BM, layout=gl.SliceLayout(1, S_L))
        lane_s = gl.arange(0, BN, layout=gl.SliceLayout(0, S_L))
        m_i = gl.full([BM], float("-inf"), gl.float32, gl.SliceLayout(1, S_L))
        l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, S_L))
        acc = gl.zeros([BM, D], gl.float32, O_L)
        if n_total > 0:
            st, en = _tile_ends(0, n_tiles, TS, TE)
            st_next, en_next = _tile_ends(1, n_tiles, TS, TE)
            mbarrier.wait(ready.index(0), 0)
            if n_tiles == 0:
                fence_async_shared()  # a column tile: written by cp.async, read by wgmma
            need, ckeys = _tile_mask(0, st, en, n_tiles, n_full, n_seen, COLS, n_cols, lane_s, BN)
            s = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), gl.zeros([BM, BN], gl.float32, S_L),
                              use_acc=False, is_async=True)
            s = warpgroup_mma_wait(0, deps=(s, ))
            if need:
                keys_s, ok_s = _tile_keys_of(0, st, en, ckeys, n_tiles, n_total, n_cols, lane_s, BN)
                s = _mask_scores(s, keys_s, ok_s, rows, off, CAUSAL)
            p16, alpha, m_i, l_i = _fold(s, m_i, l_i, qk_scale, P_L, dtype)
            for t in range(1, n_total):
                # tile t's ends were loaded an iteration ago; load tile t + 1's now
                st = st_next
                en = en_next
                st_next, en_next = _tile_ends(t + 1, n_tiles, TS, TE)
                stage = t % STAGES
                mbarrier.wait(ready.index(stage), (t // STAGES) & 1)
                if t >= n_tiles:
                    fence_async_shared()
                s = warpgroup_mma(q_smem, k_smem.index(stage).permute((1, 0)),
                                  gl.zeros([BM, BN], gl.float32, S_L), use_acc=False, is_async=True)
                need, ckeys = _tile_mask(t, st, en, n_tiles, n_full, n_seen, COLS, n_cols, lane_s, BN)
                acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, O_L))[:, None]
                acc = warpgroup_mma(p16, v_smem.index((t - 1) % STAGES), acc, is_async=True)
                s = warpgroup_mma_wait(1, deps=(s, ))
                if need:
                    keys_s, ok_s = _tile_keys_of(t, st, en, ckeys, n_tiles, n_total, n_cols, lane_s, BN)
                    s = _mask_scores(s, keys_s, ok_s, rows, off, CAUSAL)
                p16, alpha, m_i, l_i = _fold(s, m_i, l_i, qk_scale, P_L, dtype)
                acc = warpgroup_mma_wait(0, deps=(acc, ))
                mbarrier.arrive(empty.index((t - 1) % STAGES), count=1)
            last = n_total - 1
            acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, O_L))[:, None]
            acc = warpgroup_mma(p16, v_smem.index(last % STAGES), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc, ))
        return acc, m_i, l_i

    @gluon.jit
    def _vs_hopper_ws_kernel(
        Q, K, V, KD, VD, O, LSE, COUNTS, FIRST_TILE, T_START, T_END, CU_Q, CU_K,
        s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om, s_lb, s_lh, s_lm,
        row_b, row_h, col_h,
        num_heads, group, nqb, seqlen_q, seqlen_k, qk_scale,
        BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, CAUSAL: gl.constexpr, VARLEN: gl.constexpr,
        RETURN_LSE: gl.constexpr, STAGES: gl.constexpr, SWIZZLE: gl.constexpr, NC: gl.constexpr,
        LOADER_WARPS: gl.constexpr, LOADER_REGS: gl.constexpr,
    ):
        """Warp-specialised (module docstring): _ws_loader fills the K/V ring while the warpgroup computes
        (_ws_consumer); ready / empty mbarriers per stage. Blocks past a short sequence's end have no tiles
        (the plan counts none) and store nothing."""
        O_L: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, D, 16])
        LD: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // (D // 8), D // 8],
                                            warps_per_cta=[4, 1], order=[1, 0])
        dtype: gl.constexpr = Q.dtype.element_ty
        SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=SWIZZLE, element_bitwidth=16, rank=2)

        qb, hk, b, h, q_start, sq, k_start, sk = _program(CU_Q, CU_K, num_heads, group, nqb, seqlen_q, seqlen_k,
                                                           VARLEN)
        q0 = qb * BM
        off = sk - sq
        b64 = b.to(gl.int64)
        h64 = h.to(gl.int64)
        hk64 = hk.to(gl.int64)
        q_smem = gl.allocate_shared_memory(dtype, [BM, D], SMEM,
                                           _load_q(Q + b64 * s_qb + h64 * s_qh, s_qm, q_start, q0, sq, BM, D, LD))
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D], KD.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, D], VD.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        fence_async_shared()

        n_tiles, n_full, n_cols, n_seen, n_total, TS, TE, COLS = _block_lists(
            COUNTS, FIRST_TILE, T_START, T_END, (b64 * num_heads + h64) * nqb + qb, BN, NC)
        Kb = K + b64 * s_kb + hk64 * s_kh + k_start.to(gl.int64) * s_kn
        Vb = V + b64 * s_vb + hk64 * s_vh + k_start.to(gl.int64) * s_vn
        row0 = (b * row_b + hk * row_h + k_start).to(gl.int32)
        col0 = (hk * col_h).to(gl.int32)

        acc, m_i, l_i = gl.warp_specialize([
            (_ws_consumer, (q_smem, k_smem, v_smem, ready, empty, TS, TE, COLS, n_tiles, n_full, n_seen, n_cols,
                            n_total, q0, off, qk_scale, BM, BN, D, CAUSAL, STAGES)),
            (_ws_loader, (KD, VD, k_smem, v_smem, ready, empty, TS, COLS, n_tiles, n_cols, n_total, row0, col0,
                          Kb, Vb, s_kn, s_vn, D, BN, STAGES, LOADER_WARPS)),
        ], [LOADER_WARPS], [LOADER_REGS])

        _store_rows(acc, m_i, l_i, O + b64 * s_ob + h64 * s_oh, s_om, LSE + b64 * s_lb + h64 * s_lh, s_lm, q_start,
                    q0, sq, BM, D, RETURN_LSE, O_L)


def supported(q, k, v, out, layout, group: int, heads: int) -> bool:
    """Whether these (validated) inputs can take the Gluon kernel."""
    if not AVAILABLE or not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    return (q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] in HEAD_DIMS
            and layout.block_size_q == BM and heads == 1
            and all(t.stride(-1) == 1 for t in (q, k, v, out)))


def tma_layout(k, v, packed: bool) -> bool:
    """Whether k and v have a layout the warp-specialised kernel's TMA loader reads (see _tma_views)."""
    return AVAILABLE and _tma_geometry(k, v, packed) is not None


def _smem_layout(dtype, d: int):
    """The shared layout of a [rows, d] tile (Q's and the K/V ring's alike: the swizzle depends on d alone). The
    kernels take only its swizzle width and rebuild it: a layout object among a kernel's constexprs breaks
    Triton's JIT hooks (they serialise the constants as JSON; vLLM installs one)."""
    gdt = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return gl.NVMMASharedLayout.get_default_for([BN, d], gdt)


def _tma_views(k, v, packed: bool):
    """(k2d, v2d, row_b, row_h, col_h): 2D views of k and v where key `key` of (batch b, kv head hk) is row
    b * row_b + hk * row_h + key (plus the sequence's first key when packed), columns hk * col_h + [0, D);
    None where the strides fit neither [B, Hkv, S, D] contiguous nor rows of all heads side by side
    ([B, S, Hkv, D] seen transposed, or packed [T, Hkv, D])."""
    geometry = _tma_geometry(k, v, packed)
    if geometry is None:
        return None
    shape, strides, row_b, row_h, col_h = geometry
    views = [torch.as_strided(x, shape, strides) for x in (k, v)]
    return views[0], views[1], row_b, row_h, col_h


def _tma_geometry(k, v, packed: bool):
    """(shape, strides, row_b, row_h, col_h) of _tma_views' 2D views, without building them; None where it
    returns None."""
    d = k.shape[-1]
    if k.stride() != v.stride() or k.shape != v.shape:
        return None
    if packed:
        t, hkv = k.shape[0], k.shape[1]
        if k.stride() != (hkv * d, d, 1):
            return None
        shape, strides, row_b, row_h, col_h = (t, hkv * d), (hkv * d, 1), 0, 0, d
    else:
        bsz, hkv, sk = k.shape[:3]
        if k.stride() == (hkv * sk * d, sk * d, d, 1):
            shape, strides, row_b, row_h, col_h = (bsz * hkv * sk, d), (d, 1), hkv * sk, sk, 0
        elif k.stride() == (sk * hkv * d, d, hkv * d, 1):
            shape, strides, row_b, row_h, col_h = (bsz * sk, hkv * d), (hkv * d, 1), sk, 0, d
        else:
            return None
    if shape[0] >= 2 ** 31 or shape[0] == 0:
        return None
    return shape, strides, row_b, row_h, col_h


def forward(q, k, v, out, lse, plan, cu, strides, lse_strides, num_heads: int, group: int,
            nqb: int, lengths, qk_scale: float, *, causal: bool, packed: bool, batch: int,
            num_kv_heads: int, loads: str = "tma") -> None:
    """Launch on the tile lists of a plan made with BN; strides: (q, k, v, out) 4-tuples (batch, head, row,
    dim), the last dim contiguous. loads: "tma" (the warp-specialised kernel where k / v have one of the
    layouts _tma_views takes, else cp.async) or "cp.async" (the compute warpgroup gathers every tile)."""
    if loads not in ("tma", "cp.async"):
        raise ValueError(f"loads: expected 'tma' or 'cp.async', got {loads!r}")
    d = q.shape[-1]
    kv_smem = _smem_layout(q.dtype, d)
    sq, sk, sv, so = (s[:3] for s in strides)
    grid = (nqb * group, batch * num_kv_heads)
    views = _tma_views(k, v, packed) if loads == "tma" else None
    if views is not None:
        k2, v2, row_b, row_h, col_h = views
        kd, vd = (TensorDescriptor(x, list(x.shape), list(x.stride()), [BN, d], kv_smem) for x in (k2, v2))
        _vs_hopper_ws_kernel[grid](
            q, k, v, kd, vd, out, lse if lse is not None else out, *plan, *cu,
            *sq, *sk, *sv, *so, *lse_strides, row_b, row_h, col_h, num_heads, group, nqb, *lengths,
            qk_scale, BM=BM, BN=BN, D=d, CAUSAL=causal, VARLEN=packed, RETURN_LSE=lse is not None, STAGES=STAGES,
            SWIZZLE=kv_smem.swizzle_byte_width, NC=plan[0].shape[-1], LOADER_WARPS=WS_LOADER[0],
            LOADER_REGS=WS_LOADER[1], num_warps=4, maxnreg=WS_MAXNREG)
        return
    _vs_hopper_kernel[grid](
        q, k, v, out, lse if lse is not None else out, *plan, *cu,
        *sq, *sk, *sv, *so, *lse_strides, num_heads, group, nqb, *lengths, qk_scale,
        BM=BM, BN=BN, D=d, CAUSAL=causal, VARLEN=packed, RETURN_LSE=lse is not None, STAGES=STAGES,
        SWIZZLE=kv_smem.swizzle_byte_width, NC=plan[0].shape[-1], num_warps=4)
