"""Shared pieces of the kernel benchmarks: timing, dense and FlexAttention baselines, JSON/PNG output.

Generic on purpose: nothing here knows about a particular sparse kernel.
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch


def out_dir(arg: Optional[str]) -> Path:
    """--out, else $OUT (the device machine's result folder), else bench/results."""
    path = Path(arg or os.environ.get("OUT") or Path(__file__).parent / "results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def bench_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of fn in ms (triton's do_bench: L2 flushed between calls, CUDA events)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def event_ms(fn: Callable[[], object]) -> float:
    """One call of fn, in ms between CUDA events (the GPU idle before it, its work finished after; no L2
    flush, no warm-up: the probes that alternate variants call this in their own loops)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def capture_graph(fn: Callable[[], object], warmup: int = 2) -> "torch.cuda.CUDAGraph":
    """fn captured into a CUDA graph, after `warmup` calls on a side stream (allocator and compile warm-up
    outside the capture). Raises what capture raises, e.g. for a fn that syncs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def bench_graph_ms(fn: Callable[[], object], rep: int = 30, warmup: int = 5) -> float:
    """Median GPU time of fn in ms without its host time: fn is captured once into a CUDA graph and each
    timed replay follows the same L2 flush do_bench does. nan where fn cannot be captured (it syncs)."""
    try:
        graph = capture_graph(fn)
    except Exception as e:  # noqa: BLE001 - report, do not end the benchmark
        print(f"bench_graph_ms: capture failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
        torch.cuda.synchronize()
        return float("nan")
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(warmup + rep)]
    for start, end in events:
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in events[warmup:])
    del graph
    return float(times[len(times) // 2])


def device_info() -> Dict[str, str]:
    import triton

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "triton": triton.__version__}


def repeat_kv(k: torch.Tensor, group: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * group, S, D]: dense baselines get one k/v head per query head, so every
    SDPA backend runs (not all take GQA); the FLOPs are the same."""
    return k if group == 1 else k.repeat_interleave(group, dim=1)


def sdpa_dense_causal(q, k, v, backend: str) -> Callable[[], torch.Tensor]:
    """Dense causal SDPA restricted to one backend: 'flash', 'cudnn', 'efficient' or 'math'."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]

    def run():
        with sdpa_kernel([chosen]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


def _ids_first(mask: torch.Tensor):
    """bool [..., n] -> (count int32 [...], ids int32 [..., n]) with the True ids first, ascending."""
    n = mask.shape[-1]
    ids = torch.arange(n, device=mask.device, dtype=torch.int32)
    keyed = torch.where(mask, ids, ids + n)
    return mask.sum(-1, dtype=torch.int32), (keyed.sort(-1).values % n).int().contiguous()


def flex_block_mask(block_mask: torch.Tensor, block_size: int, seqlen_q: int, seqlen_k: int, causal: bool = True):
    """FlexAttention BlockMask from a bool [B, H, nq, nk] block mask (square blocks, seqlen_q == seqlen_k
    when causal). Blocks wholly below the diagonal go in the 'full' lists (no mask_mod call), the rest are
    partial with the causal mask_mod: FlexAttention's fastest form of the same mask."""
    from torch.nn.attention.flex_attention import BlockMask

    nq, nk = block_mask.shape[-2:]
    if causal:
        qb = torch.arange(nq, device=block_mask.device)[:, None]
        kb = torch.arange(nk, device=block_mask.device)[None, :]
        full = block_mask & (kb < qb)
    else:
        full = block_mask
    partial = block_mask & ~full
    n_partial, partial_ids = _ids_first(partial)
    n_full, full_ids = _ids_first(full)

    def causal_mod(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return BlockMask.from_kv_blocks(n_partial, partial_ids, n_full, full_ids, BLOCK_SIZE=block_size,
                                    mask_mod=causal_mod if causal else None, seq_lengths=(seqlen_q, seqlen_k))


_flex_compiled = None


def flex_attention_fn(q, k, v, block_mask) -> Callable[[], torch.Tensor]:
    """Compiled FlexAttention (GQA native) over a BlockMask."""
    global _flex_compiled
    from torch.nn.attention.flex_attention import flex_attention

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    gqa = q.shape[1] != k.shape[1]
    return lambda: _flex_compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1))


def print_table(rows: List[dict], columns: List[str], formats: Dict[str, str]) -> str:
    """Fixed-width text table of rows (dicts) over columns; returns it too."""
    cells = [[formats.get(c, "{}").format(r[c]) if r.get(c) is not None else "-" for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def plot_panels(path: Path, panels: Dict[str, Dict[str, tuple]], hlines: Dict[str, Dict[str, float]],
                xlabel: str, ylabel: str, title: str) -> None:
    """One subplot per panel key: lines name -> (xs, ys), dashed horizontal references name -> y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], panels.items()):
        for name, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o", label=name)
        for i, (name, y) in enumerate(hlines.get(panel, {}).items()):
            ax.axhline(y, linestyle="--", color=f"C{len(lines) + i}", label=name)
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
