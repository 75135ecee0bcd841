"""The one timing library of bench/: timers, the methods benchmark's inputs and phases, dense and
FlexAttention baselines, tables, JSON/PNG output. The benchmarks at the top of bench/ and the probes under
bench/probes/ import from here and from the `sparse_attn` package, nothing else of bench/.

Timers, all in ms unless the name says otherwise:
    bench_ms          triton's do_bench: L2 flushed before each call, median (host time beyond the flush shows)
    bench_graph_ms    the call captured once in a CUDA graph, each replay after the same flush: GPU time only
    graph_replay_ms   mean of back-to-back graph replays (no flush, no host work)
    event_ms          one call between CUDA events, the GPU idle before it and finished after
    median_event_ms   median of event_ms after warm-up calls
    gpu_host_ms       median GPU ms per call and host ms until the last call returned (batches of calls)
    host_us           host microseconds per call with calls queued and no sync
    kernel_ms         per-kernel GPU time from torch.profiler
    time_phases       a method's phases in order, each between events with a synchronize around it

`sparse_attn` is imported inside the functions that use it, so this module imports without it.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


def out_dir(arg: Optional[str] = None) -> Path:
    """--out, else $OUT (the device machine's result folder), else bench/results (git-ignored)."""
    path = Path(arg or os.environ.get("OUT") or Path(__file__).parent / "results")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------------------ timers

def bench_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of fn in ms (triton's do_bench: L2 flushed between calls, CUDA events)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def event_ms(fn: Callable[[], object], spin_cycles: int = 0) -> float:
    """One call of fn, in ms between CUDA events (the GPU idle before it, its work finished after; no L2
    flush, no warm-up: the probes that alternate variants call this in their own loops). spin_cycles > 0
    queues a GPU spin of that many cycles before the start event, so the host runs through fn's launches
    while the GPU is still busy: the time then leaves out host time before fn's first kernel."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if spin_cycles:
        torch.cuda._sleep(spin_cycles)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def median_event_ms(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median of `repeats` event_ms calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(event_ms(fn) for _ in range(repeats))


def gpu_host_ms(fn: Callable[[], object], repeats: int, batch: int = 1) -> Tuple[float, float]:
    """(median GPU ms per call, median host ms per batch) over `repeats` event pairs, each around `batch`
    calls with a synchronize before it; host ms is the time until the last call of the batch returned, so a
    host-bound call shows host >= GPU. One untimed call first."""
    fn()
    gpu, host = [], []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a.record()
        for _ in range(batch):
            fn()
        b.record()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        gpu.append(a.elapsed_time(b) / batch)
    return statistics.median(gpu), statistics.median(host)


def host_us(fn: Callable[[], object], n: int = 200) -> Tuple[float, float]:
    """(host us per call with n calls queued and no sync, us per call including the final sync)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6, (time.perf_counter() - t0) / n * 1e6


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


def graph_replay_ms(fn: Callable[[], object], n: int = 50) -> float:
    """Mean ms of n back-to-back replays of fn captured in a CUDA graph (no flush, no host work); nan where fn
    cannot be captured."""
    try:
        graph = capture_graph(fn, warmup=3)
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n
    except Exception as e:  # noqa: BLE001
        print(f"graph_replay_ms: capture failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
        torch.cuda.synchronize()
        return float("nan")


def eager_and_graph_ms(fn: Callable[[], object], rep_ms: int = 100, graph: bool = True) -> Dict[str, float]:
    """{"ms": bench_ms (the eager call; host time beyond the L2 flush shows), "gpu_ms": bench_graph_ms (the
    same call replayed from a CUDA graph after the same flush: GPU time only), the latter only with graph}."""
    out = {"ms": bench_ms(fn, rep_ms=rep_ms)}
    if graph:
        out["gpu_ms"] = bench_graph_ms(fn)
    return out


def kernel_ms(fn: Callable[[], object], repeats: int = 1) -> Dict[str, Tuple[float, int]]:
    """{GPU op name: (median over `repeats` profiled calls of its summed GPU ms per call, launches per call)},
    from torch.profiler. A profiled long kernel on a power-capped GPU can read a few per cent lower than the
    same kernel timed by events."""
    from torch.profiler import ProfilerActivity, profile

    per = defaultdict(list)
    launches: Dict[str, int] = {}
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        seen, count = defaultdict(float), defaultdict(int)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                seen[e.name] += e.device_time / 1e3
                count[e.name] += 1
        for name, ms in seen.items():
            per[name].append(ms)
            launches[name] = count[name]
    return {name: (statistics.median(v), launches[name]) for name, v in per.items()}


def time_phases(phases: Sequence[Tuple[str, Callable]], warmup: int, repeats: int,
                call: Optional[Callable] = None) -> Tuple[Dict[str, float], object]:
    """phases: (name, fn(prev) -> result) run in order, each fed the previous result, each between CUDA
    events with a synchronize around it. call: optionally the same work as one function fn(None), timed just
    before each pass of the phases (alternating, so both see the same power state of the GPU), with no
    result of the phases alive. Returns ({name: median ms}, the last pass's result); with call the dict also
    holds "call"."""
    steps = [("call", call), *phases] if call is not None else list(phases)
    times: Dict[str, List[float]] = {name: [] for name, _ in steps}
    result = None
    for it in range(warmup + repeats):
        result = None
        for name, fn in steps:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            if name == "call":
                fn(None)
            else:
                result = fn(result)
            end.record()
            torch.cuda.synchronize()
            if it >= warmup:
                times[name].append(start.elapsed_time(end))
    return {name: statistics.median(t) for name, t in times.items()}, result


def device_info() -> Dict[str, str]:
    import triton

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "triton": triton.__version__}


# --------------------------------------------------------------------------------------- dense and Flex

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


def random_causal_block_mask(heads: int, seqlen: int, block: int, density: float, gen) -> torch.Tensor:
    """bool [1, heads, n, n] (n = ceil(seqlen / block)) on CUDA: each visible key block kept with probability
    `density`, the diagonal block always (the block-sparse benchmark's layouts)."""
    n = math.ceil(seqlen / block)
    qb = torch.arange(n, device="cuda")[:, None]
    kb = torch.arange(n, device="cuda")[None, :]
    mask = torch.rand(1, heads, n, n, device="cuda", generator=gen) < density
    return (mask & (kb <= qb)) | (kb == qb)


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


# ------------------------------------------------------------- the methods benchmark's inputs and phases
# One layer, B=1, 32 query / 8 kv heads, D=128, bf16, causal; vertical-slash budgets as MInference's
# (1000 vertical / 6096 slash), 64-row blocks, last_q 64; A-shape 128 sink + 4096 window; block_sparse 5 %.
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
DATA = ("structured", "random", "mixed")
SCATTERED = 200  # keys per scattered head of the "mixed" input
VERTICAL_SIZE, SLASH_SIZE = 1000, 6096


def rope_(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate x [H, S, D] in place by rotary position embeddings (pairs of adjacent dims), head by head."""
    s, d = x.shape[1], x.shape[2]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
    ang = torch.arange(s, device=x.device, dtype=torch.float32)[:, None] * inv
    cos, sin = ang.cos(), ang.sin()
    for h in range(x.shape[0]):
        x1, x2 = x[h, :, ::2].float(), x[h, :, 1::2].float()
        x[h] = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2).to(x.dtype)
    return x


def methods_inputs(seqlen: int, dtype=torch.bfloat16, *, heads: int = HEADS, kv_heads: int = KV_HEADS,
                   head_dim: int = HEAD_DIM, data: str = "structured", device: str = "cuda"):
    """(q [1, heads, S, D], k, v [1, kv_heads, S, D]): the methods benchmark's inputs (seed 0). "structured":
    every query and key is a shared direction per kv head (4x the noise) plus Gaussian noise, rotated by RoPE
    (a local band with periodic slashes), the first 4 keys sinks; "random": plain Gaussian q, k, v;
    "mixed": the first half of the kv heads (and their query heads) structured, the other half attending
    to SCATTERED keys at random positions with no positional structure: those keys and every query carry
    a shared direction (norm 12, against the noise's ~11), so a query that sees them gives them nearly all
    its mass (no RoPE on these heads: no local band, no diagonals)."""
    if data not in DATA:
        raise ValueError(f"data: expected one of {DATA}, got {data!r}")
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn((heads, seqlen, head_dim), device=device, dtype=dtype, generator=g)
    k = torch.randn((kv_heads, seqlen, head_dim), device=device, dtype=dtype, generator=g)
    v = torch.randn((kv_heads, seqlen, head_dim), device=device, dtype=dtype, generator=g)
    local = kv_heads // 2 if data == "mixed" else (kv_heads if data == "structured" else 0)
    if local:
        group = heads // kv_heads
        u = torch.randn(local, 1, head_dim, device=device, generator=g) * 4
        k[:local] += u.to(dtype)
        k[:local, :4] += u.to(dtype)  # sinks
        q[:local * group] += u.repeat_interleave(group, 0).to(dtype)
        rope_(q[:local * group]), rope_(k[:local])
    if data == "mixed":
        group = heads // kv_heads
        w = torch.randn(kv_heads - local, 1, head_dim, device=device, generator=g)
        w = w / w.norm(dim=-1, keepdim=True) * 12
        for i, h in enumerate(range(local, kv_heads)):
            targets = torch.randperm(seqlen, device=device, generator=g)[:SCATTERED]
            k[h, targets] += w[i].to(dtype)
        q[local * group:] += w.repeat_interleave(group, 0).to(dtype)
    return q[None], k[None], v[None]


def vs_layout(q, k, *, share_heads: int = 1, vertical_size: int = VERTICAL_SIZE, slash_size: int = SLASH_SIZE):
    """The vertical-slash layout of the methods benchmark's record configuration for q, k (64-row blocks,
    last_q 64), for the probes of that kernel family."""
    from sparse_attn import dispatch

    configs = [{"pattern": "vertical_slash", "vertical_size": vertical_size, "slash_size": slash_size}] * q.shape[1]
    est = dispatch.estimate_pattern("vertical_slash", q, k, configs, share_heads=share_heads, causal=True,
                                    scale=None, block_size=64, last_q=64)
    return dispatch.build_pattern("vertical_slash", est, q, k, configs, block_size=64, share_heads=share_heads)


def parse_method_spec(text: str):
    """"name" or "name:key=value,key=value" -> (label, name, kwargs), checked against the methods registry
    (ValueError naming what is accepted). Values are ints, floats or none."""
    from sparse_attn.methods import check_method_kwargs, list_methods

    name, _, rest = text.partition(":")
    if name not in list_methods() or name == "dense":
        raise ValueError(f"unknown method {name!r}; expected one of {[m for m in list_methods() if m != 'dense']}")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"{text!r}: expected key=value after ':', got {item!r}")
        kwargs[key] = _spec_value(value)
    try:
        check_method_kwargs(name, kwargs)
    except TypeError as e:
        raise ValueError(str(e)) from e
    return text, name, kwargs


def _spec_value(text: str):
    if text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def method_phases(name: str, kwargs: dict, q, k, v):
    """A method that runs one pattern (the uniform methods generated from the registry) split into
    (phase, fn(prev) -> result): estimate, index (the layout), attention (the output); None for methods
    that are not one pattern (the per-head mixture, dense)."""
    from sparse_attn import dispatch
    from sparse_attn.methods import check_method_kwargs, get_method
    from sparse_attn.patterns import get_pattern

    method = get_method(name)
    if method.pattern is None:
        return None
    pattern = get_pattern(method.pattern)
    merged = check_method_kwargs(name, kwargs)
    configs = [{"pattern": pattern.name, **{b: merged[b] for b in pattern.budget_names}}] * q.shape[1]
    common = dict(causal=True, block_size=merged["block_size"], **pattern.run_options(merged))
    return [
        ("estimate", lambda _: dispatch.estimate_pattern(pattern.name, q, k, configs, scale=None, **common)),
        ("index", lambda est: dispatch.build_pattern(pattern.name, est, q, k, configs, **common)),
        ("attention", lambda layout: dispatch.attend(q, k, v, layout, causal=True, scale=None)),
    ]


def method_call(name: str, kwargs: dict, q, k, v, stats: Optional[dict] = None) -> Callable:
    """The method as one public `sparse_attn.sparse_attention` call, fn(_) -> output (min_seqlen 0)."""
    from sparse_attn import sparse_attention

    return lambda _: sparse_attention(q, k, v, name, causal=True, min_seqlen=0, stats=stats, **kwargs)


def method_recall(name: str, kwargs: dict, q, k, v, rows) -> Dict[str, float]:
    """{"recall": the share of the dense attention mass the method's sparse index keeps, mean over query
    heads and the sampled rows (sparse_attn.recall.sampled_rows); dense heads count 1, "density": the
    index's computed / causal entries}. Runs the method once (min_seqlen 0) to get its layouts."""
    from sparse_attn.methods import _run_rows, check_method_kwargs, get_method

    method = get_method(name)
    merged = check_method_kwargs(name, {**kwargs, "min_seqlen": 0})
    merged.pop("decode", None), merged.pop("decode_config", None)
    # As the public call runs it: row chunks of a long call (each chunk's layouts over its rows and the keys
    # they see, measured on the sampled rows inside it), so a 1M-token call needs no whole-call layout here.
    _, record, _ = _run_rows(method, q, k, v, causal=True, scale=None, head_config=None, **merged)
    return {"recall": float(record.recall(q, k, rows=rows).mean()), "density": float(record.density().mean())}


# ---------------------------------------------------------------------------------------------- output

def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1))


def format_table(rows: List[dict], columns: List[str], formats: Optional[Dict[str, str]] = None,
                 headers: Optional[Dict[str, str]] = None, markdown: bool = False, left: Sequence[str] = ()) -> str:
    """Text table of rows (dicts) over columns: fixed-width, or a markdown table with markdown=True. formats:
    column -> format string (default "{}"); a missing or None cell prints "-". headers: column -> title
    (default the column name). Columns in `left` are left-aligned, the rest right-aligned."""
    formats, headers = formats or {}, headers or {}
    titles = [headers.get(c, c) for c in columns]
    cells = [[formats.get(c, "{}").format(r[c]) if r.get(c) is not None else "-" for c in columns] for r in rows]
    widths = [max(len(t), *(len(row[i]) for row in cells)) for i, t in enumerate(titles)]

    def line(values):
        parts = [x.ljust(w) if c in left else x.rjust(w) for c, x, w in zip(columns, values, widths)]
        return "| " + " | ".join(parts) + " |" if markdown else "  ".join(parts).rstrip()

    lines = [line(titles)]
    if markdown:
        lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += [line(row) for row in cells]
    return "\n".join(lines)


def print_table(rows: List[dict], columns: List[str], formats: Optional[Dict[str, str]] = None, **kw) -> str:
    """format_table, printed (flushed); returns the text too."""
    text = format_table(rows, columns, formats, **kw)
    print(text, flush=True)
    return text


def plot_frontier(path: Path, rows: List[dict], title: str) -> None:
    """One panel per (input, length): x speed-up vs dense, y recall, one line per pattern through its budgets
    (rows as bench_methods.py --frontier writes them: data, seqlen, pattern, call_speedup, recall)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("pattern") and "error" not in r and r.get("recall") is not None]
    panels = sorted({(r["data"], r["seqlen"]) for r in rows})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (data, s) in zip(axes[0], panels):
        for i, name in enumerate(sorted({r["pattern"] for r in rows})):
            pts = sorted((r["call_speedup"], r["recall"]) for r in rows
                         if r["pattern"] == name and r["data"] == data and r["seqlen"] == s)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name, color=f"C{i}")
        ax.axvline(1.0, color="gray", linestyle=":", label="cuDNN dense")
        ax.set_xscale("log")
        ax.set_title(f"{data}, {s // 1024}K tokens")
        ax.set_xlabel("speed-up vs cuDNN (one call)")
        ax.set_ylabel("recall (dense attention mass kept)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
