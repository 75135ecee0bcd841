"""Peak memory of one layer's attention call per method, against the bytes of its q, k, v and output.

    python bench/probes/probe_memory.py --seqlens 1048576                       # CUDA: torch.cuda.max_memory_allocated
    python bench/probes/probe_memory.py --device cpu --seqlens 32768 65536 --heads 4 --kv-heads 1 --index-only

ratio = (bytes of q, k, v + the call's peak above them) / (bytes of q, k, v and output): the bar is <= 1.5 at
1M tokens (32 / 8 heads, D=128, bf16). On CUDA the whole public call runs (`sparse_attention`, row chunks
included). On the CPU, where the sparse methods attend by a dense masked reference, `--index-only` measures
what grows with the query blocks instead: the call with its attention replaced by an empty output (estimation
and index per row chunk as the call makes them; `--row-chunk` scales the chunking down with the length), the
peak from torch.profiler's allocation events.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(BENCH.parent), str(BENCH)]  # sparse_attn from the repository, common from bench/

import torch  # noqa: E402

from common import device_info, methods_inputs, out_dir, parse_method_spec, print_table, write_json  # noqa: E402

GIB = 1 << 30


def _cpu_peak(fn) -> int:
    """Peak of live bytes torch allocated on the CPU during fn (allocation and free events, in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []
    for e in prof.events():
        nbytes = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if nbytes:
            events.append((e.time_range.start, nbytes))
    now = peak = 0
    for _, nbytes in sorted(events):
        now += nbytes
        peak = max(peak, now)
    return peak


def _cuda_peak(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _index_only(name, kwargs, q, k, v):
    """The public call (row chunks, shared estimates and all) with the attention itself replaced by an
    empty output of the chunk's shape: what estimation and index building hold."""
    from sparse_attn import dispatch, sparse_attention

    attend = dispatch.attend
    dispatch.attend = lambda q, k, v, layout, **kw: torch.empty_like(q)
    try:
        sparse_attention(q, k, v, name, min_seqlen=0, **kwargs)
    finally:
        dispatch.attend = attend


def main():
    from sparse_attn import methods, sparse_attention
    from sparse_attn.patterns import patterns

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1 << 20])
    ap.add_argument("--methods", nargs="+", default=None,
                    help="method specs NAME[:key=value,...] (default: every prefill pattern and minference)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--index-only", action="store_true", help="estimation + index only (the CPU measurement)")
    ap.add_argument("--row-chunk", type=int, default=None,
                    help="override methods.ROW_CHUNK (and ROW_CHUNKS_FROM = 2x it), to scale the chunking down")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.row_chunk:
        methods.ROW_CHUNK, methods.ROW_CHUNKS_FROM = args.row_chunk, 2 * args.row_chunk
    specs = args.methods or [p.name for p in patterns() if p.prefill] + [methods.MIXTURE]
    specs = (["dense"] if not args.index_only and "dense" not in specs else []) + specs
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    peak_of = _cuda_peak if args.device == "cuda" else _cpu_peak
    rows = []
    for s in args.seqlens:
        q, k, v = methods_inputs(s, dtype, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                                 device=args.device)
        inputs = sum(t.numel() * t.element_size() for t in (q, k, v))
        base = inputs + q.numel() * q.element_size()  # q, k, v and the output
        for spec in specs:
            label, name, kwargs = (spec, "dense", {}) if spec == "dense" else parse_method_spec(spec)
            if args.index_only and name == "dense":
                continue
            if args.index_only:
                fn = lambda: _index_only(name, kwargs, q, k, v)  # noqa: E731
            else:
                fn = lambda: sparse_attention(q, k, v, name, min_seqlen=0, **kwargs)  # noqa: E731
            try:
                peak = peak_of(fn)
                error = None
            except torch.OutOfMemoryError as e:
                peak, error = None, f"OOM: {str(e).splitlines()[0][:80]}"
                torch.cuda.empty_cache()
            row = {"method": label, "seqlen": s, "qkvo_gib": base / GIB,
                   "peak_gib": None if peak is None else (inputs + peak) / GIB,
                   "ratio": None if peak is None else (inputs + peak) / base, "error": error}
            rows.append(row)
            print_table([row], list(row), {"qkvo_gib": "{:.2f}", "peak_gib": "{:.2f}", "ratio": "{:.2f}"})
        del q, k, v
    print()
    print_table(rows, ["method", "seqlen", "qkvo_gib", "peak_gib", "ratio", "error"],
                {"qkvo_gib": "{:.2f}", "peak_gib": "{:.2f}", "ratio": "{:.2f}"}, left=("method",))
    write_json(out_dir(args.out) / "memory.json", {"device": device_info(),
                                                   "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
