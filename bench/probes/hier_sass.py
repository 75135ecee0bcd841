"""What the hierarchical kernels cost per program on Hopper, read on a machine without a GPU: each kernel is
compiled for sm_90a through tests/ops/compile_sm90_helper.py's stand-in driver, then its cubin is read with
Triton's own cuobjdump (registers, spill stack) and nvdisasm (instructions: the whole kernel and each loop
body, i.e. the code between a backward branch and its target, per level of the search).

    python bench/probes/hier_sass.py                 # a few launch shapes of each kernel
    python bench/probes/hier_sass.py --top-k 32 64

Static counts, not timings: a loop body runs once per level. Prefill is compiled on CPU tensors of 8 query /
2 kv heads, 8192 tokens, D=128, bf16 (key summaries in bf16, as on the GPU); decode on a 64-token-page
cache with top_k 62 (bench_hier's 4K budget).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "ops"), str(ROOT), str(ROOT / "tests")]
os.environ.pop("TRITON_INTERPRET", None)

import compile_sm90_helper as helper  # noqa: E402

helper._install()
import torch  # noqa: E402
import triton  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def costs(ck) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
    res = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", res).groups()
    lines = subprocess.run([str(BIN / "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout.splitlines()
    os.unlink(f.name)
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*\.(L_x_\d+):", line))}
    is_op = [bool(re.match(r"\s*/\*[0-9a-f]+\*/\s+\S", line)) for line in lines]
    loops = [sum(is_op[labels[m.group(1)]:i]) for i, line in enumerate(lines)
             if (m := re.search(r"BRA `\(\.(L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i - 5]
    return {"warps": ck.metadata.num_warps, "regs": int(regs), "stack": int(stack), "instructions": sum(is_op),
            "loops": loops}


def compiled_now(name: str):
    out = [ck for ck in helper.compiled if ck.name.endswith(name)]
    helper.compiled.clear()
    return out[-1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top-k", type=int, nargs="+", default=[16, 32, 64])
    args = ap.parse_args(argv)
    from sparse_attn.estimators import hierarchical as hier
    from sparse_attn.kvcache import PagedKVCache, PageSummaries

    real_summaries = hier.key_summaries
    hier.key_summaries = lambda x, bs, dtype: real_summaries(x, bs, x.dtype)  # k's dtype, as on the GPU
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 8192, 128, generator=gen).to(torch.bfloat16)
    k = torch.randn(1, 2, 8192, 128, generator=gen).to(torch.bfloat16)
    for top_k in args.top_k:
        for heads, warps, chunk, maxnreg in ((1, 4, 8, None), (2, 4, 8, None), (4, 4, 8, None), (4, 4, 16, None),
                                             (4, 8, 8, 128)):
            hier._PREFILL_HEADS, hier._PREFILL_WARPS, hier._PREFILL_CHUNK, hier._PREFILL_MAXNREG = \
                heads, warps, chunk, maxnreg
            hier.hierarchical_layout(q, k, top_k, use_triton=True)
            print(f"prefill top_k {top_k} h{heads} w{warps} c{chunk} r{maxnreg or '-'}: "
                  f"{costs(compiled_now('_prefill_search_kernel'))}")
    pages = torch.randn(64, 64, 2, 128, generator=gen).to(torch.bfloat16)
    cache = PagedKVCache(pages, pages, torch.arange(64, dtype=torch.int32).view(2, 32),
                         torch.tensor([2000, 1500], dtype=torch.int32), 64)
    summaries = PageSummaries.build(cache)
    qd = torch.randn(2, 8, 128, generator=gen).to(torch.bfloat16)
    for warps, chunk in ((4, 32), (8, 32), (8, 64), (16, 128)):
        hier._DECODE_WARPS, hier._DECODE_CHUNK = warps, chunk
        hier.hierarchical_pages(qd, cache, summaries, top_k=62, use_triton=True)
        print(f"decode top_k 62 w{warps} c{chunk}: {costs(compiled_now('_decode_search_kernel'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
