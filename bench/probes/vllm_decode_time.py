"""Where a vLLM decode step of sparse_attn's backend spends its time (GPU, vLLM importable as for bench_vllm).

    python bench/probes/vllm_decode_time.py --model DIR [--eager] [--ctx 8192] [--tokens 32] [--config JSON]

Runs bench_vllm's `run` in this process with the backend's forward and metadata build wrapped: per kind of
step (decode only, mixed, prefill only, captured) the calls, host time (synchronised before and after, except
while capturing) and the batch shapes seen. Prints one table; the engine's own log goes to stderr.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--config", default=None)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--out", default="/tmp/vllm_decode_time.json")
    args = ap.parse_args(argv)
    import torch

    import bench_vllm
    from sparse_attn.integrations.vllm import backend as be

    stats = collections.defaultdict(lambda: [0, 0.0])
    shapes = collections.Counter()
    fwd, build = be.SparseAttentionImpl.forward, be.SparseAttentionMetadataBuilder.build

    def timed_forward(self, layer, query, key, value, kv_cache, md, output, *a, **kw):
        capturing = query.is_cuda and torch.cuda.is_current_stream_capturing()
        if md is None:
            kind = "profile"
        elif capturing:
            kind = "captured"
        else:
            kind = ("decode" if md.num_decodes else "") + ("+prefill" if md.prefills else "")
            shapes[(md.num_decodes, len(md.prefills), md.num_actual_tokens, tuple(md.block_table.shape))] += 1
        if not capturing:
            torch.cuda.synchronize()
        t = time.perf_counter()
        r = fwd(self, layer, query, key, value, kv_cache, md, output, *a, **kw)
        if not capturing:
            torch.cuda.synchronize()
        stats["forward " + kind][0] += 1
        stats["forward " + kind][1] += time.perf_counter() - t
        return r

    def timed_build(self, *a, **kw):
        t = time.perf_counter()
        r = build(self, *a, **kw)
        stats["build"][0] += 1
        stats["build"][1] += time.perf_counter() - t
        return r

    be.SparseAttentionImpl.forward = timed_forward
    be.SparseAttentionMetadataBuilder.build = timed_build
    prompts = [[(13 * i + 7 * b + 5) % 128000 + 1 for i in range(args.ctx)] for b in range(args.batch)]
    pfile = Path("/tmp/vllm_decode_time.prompts.json")
    pfile.write_text(json.dumps(prompts))
    run_args = ["run", "--model", args.model, "--backend", "CUSTOM", "--prompts", str(pfile), "--load-format",
                "dummy", "--dtype", "bfloat16", "--max-model-len", str(args.ctx + 256), "--ttft", "--max-tokens",
                str(args.tokens + 1), "--no-prefix-caching", "--warmup", "1", "--gpu-memory-utilization", "0.9",
                "--out", args.out]
    if args.eager:
        run_args.append("--eager")
    if args.config:
        run_args += ["--config", args.config]
    t = time.perf_counter()
    bench_vllm.main(run_args)
    total = time.perf_counter() - t
    print(f"\nwhole run {total:.1f} s")
    for k, (n, s) in sorted(stats.items()):
        print(f"{k:24s} calls {n:7d}  host s {s:8.3f}  ms/call {1e3 * s / max(n, 1):8.3f}")
    print("batch shapes (decodes, prefills, tokens, block table):")
    for shape, n in shapes.most_common(8):
        print(f"  {shape}: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
