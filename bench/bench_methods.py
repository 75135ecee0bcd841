"""Methods benchmark: one attention layer (32 query / 8 kv heads, D=128, bf16, batch 1), each method's
time split into estimation, index building and attention, against cuDNN dense causal in the same run.

    python bench/bench_methods.py --seqlens 32768 131072 524288 1048576 --out bench/results

Phases are timed with CUDA events and a synchronize between phases; each number is the median over
--repeats runs after --warmup runs. "call" is the same method timed as one public call,
`sparse_attn.sparse_attention(q, k, v, method, ...)`, with no synchronize between its phases: what a user
waits for (the phase split is for attribution; its synchronizes leave the GPU idle between phases). The call
is timed before each pass of the phases, alternating, so both see the same power state of the GPU. Dense attention above --dense-max tokens is not run: it is
extrapolated from the largest measured length by the quadratic law and marked "(extrap.)" in the table.
Prints a table and writes bench_methods.json under --out. Needs CUDA.

Inputs (--data): "structured" (default) gives attention the shapes real heads have, so the estimators'
choices and the resulting densities are realistic: every query and key is a shared direction (4x the noise)
plus Gaussian noise, rotated by RoPE (base 10000), which makes a local band with periodic slashes; the
first 4 keys are sinks. "random" is plain Gaussian q, k, v: no structure, so vertical-slash's top
diagonals scatter and its index approaches dense.

Timing helpers are local to this script (bench/common.py did not exist when it was written).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

METHODS = ("a_shape", "vertical_slash", "vs_pairs", "block_sparse", "minference")
# "vs_pairs": vertical_slash with share_heads=2 (one index per pair of query heads of a GQA group, two heads
# per kernel program); same budgets, so the same amount of attention work as "vertical_slash".


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[32768, 131072, 524288, 1048576])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--vertical-size", type=int, default=1000)
    p.add_argument("--slash-size", type=int, default=6096)
    p.add_argument("--top-k", type=int, default=None,
                   help="block_sparse key blocks per query block (default: use --density)")
    p.add_argument("--density", type=float, default=0.05, help="block_sparse fraction of visible key blocks")
    p.add_argument("--sink", type=int, default=128)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--data", choices=("structured", "random"), default="structured")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dense-max", type=int, default=524288,
                   help="longest length at which dense runs; longer ones are extrapolated")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results")))
    return p.parse_args(argv)


def timed_phases(phases, warmup: int, repeats: int, call=None):
    """phases: list of (name, fn(prev) -> result), run in order, each fed the previous result.
    call: optionally the same work as one function, timed just before each pass of the phases (so that both
    see the same power state of the GPU; timed after all the phases' passes it read 0-9 % slower), with no
    result of the phases alive (at 1M both together might not fit in 80 GB).
    Returns ({name: median ms}, last result); with call, the dict also holds "call"."""
    steps = [("call", call), *phases] if call is not None else phases
    times = {name: [] for name, _ in steps}
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


def dense_baseline(q, k, v):
    """SDPA cuDNN dense causal (GQA through enable_gqa, else k/v repeated outside the timed region).
    Returns (callable, label)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    for backend, label in ((SDPBackend.CUDNN_ATTENTION, "cudnn"), (SDPBackend.FLASH_ATTENTION, "flash")):
        for gqa in (True, False):
            kk, vv = (k, v) if gqa else (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))

            def run(_=None, kk=kk, vv=vv, backend=backend, gqa=gqa):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa and group > 1)

            try:
                run()
                torch.cuda.synchronize()
                return run, label + ("" if gqa else " (k/v repeated)")
            except RuntimeError:
                del kk, vv
                continue
    raise RuntimeError("no SDPA cuDNN or flash backend runs these inputs")


def method_phases(name, args, q, k, v):
    from sparse_attn import dispatch
    from sparse_attn.methods import default_head_config

    common = dict(causal=True, scale=None, block_size=64, last_q=64)
    if name == "minference":
        config = default_head_config(q.shape[1], k.shape[2])

        def total(_):
            out, density = dispatch.run_head_config(q, k, v, config, **common)
            return out, density

        return [("total", total)], config[0]
    if name == "a_shape":
        config, density = {"pattern": "a_shape", "sink": args.sink, "window": args.window}, None
    elif name in ("vertical_slash", "vs_pairs"):
        config, density = {"pattern": "vertical_slash", "vertical_size": args.vertical_size,
                           "slash_size": args.slash_size}, None
        if name == "vs_pairs":
            common["share_heads"] = 2
    else:
        config = {"pattern": "block_sparse", "top_k": args.top_k}
        density = None if args.top_k is not None else args.density
    configs = [config] * q.shape[1]
    phases = [
        ("estimate", lambda _: dispatch.estimate_pattern(config["pattern"], q, k, configs, density=density,
                                                         **common)),
        ("index", lambda est: dispatch.build_pattern(config["pattern"], est, q, k, configs, block_size=64)),
        ("attention", lambda layout: (dispatch.attend(q, k, v, layout, causal=True, scale=None), layout)),
    ]
    return phases, dict(config, density=density) if density is not None else config


def public_call(name, args, q, k, v):
    """The method as one sparse_attn.sparse_attention call with the benchmark's configuration."""
    from sparse_attn import sparse_attention

    kw = dict(causal=True, block_size=64, min_seqlen=0)
    if name == "a_shape":
        kw.update(method="a_shape", sink=args.sink, window=args.window)
    elif name in ("vertical_slash", "vs_pairs"):
        kw.update(method="vertical_slash", vertical_size=args.vertical_size, slash_size=args.slash_size,
                  last_q=64, share_heads=2 if name == "vs_pairs" else 1)
    elif name == "block_sparse":
        kw.update(method="block_sparse", top_k=args.top_k, density=None if args.top_k is not None else args.density)
    else:
        return None  # minference is already timed as one call
    return lambda _: sparse_attention(q, k, v, **kw)


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


def make_inputs(args, s, dtype, dev="cuda"):
    g = torch.Generator(device=dev).manual_seed(0)
    shape_q, shape_kv = (args.heads, s, args.head_dim), (args.kv_heads, s, args.head_dim)
    q = torch.randn(shape_q, device=dev, dtype=dtype, generator=g)
    k = torch.randn(shape_kv, device=dev, dtype=dtype, generator=g)
    v = torch.randn(shape_kv, device=dev, dtype=dtype, generator=g)
    if args.data == "structured":
        u = torch.randn(args.kv_heads, 1, args.head_dim, device=dev, generator=g) * 4
        k += u.to(dtype)
        k[:, :4] += u.to(dtype)  # sinks
        q += u.repeat_interleave(args.heads // args.kv_heads, 0).to(dtype)
        rope_(q), rope_(k)
    return q[None], k[None], v[None]


def bench_length(s, args, dtype, dense_ref):
    q, k, v = make_inputs(args, s, dtype)
    rows = []
    flops = 4 * args.heads * args.head_dim * s * (s + 1) / 2  # causal dense: QK^T and PV
    if s <= args.dense_max:
        torch.cuda.reset_peak_memory_stats()
        run, label = dense_baseline(q, k, v)
        t = timed_phases([("attention", run)], args.warmup, args.repeats)[0]  # the output is not kept alive
        dense = {"ms": t["attention"], "label": label, "extrapolated": False}
        dense_ref.update(s=s, ms=t["attention"], label=label)
        del run
    else:
        if not dense_ref:
            raise SystemExit(f"--dense-max {args.dense_max} < {s}: no measured dense length to extrapolate from")
        ms = dense_ref["ms"] * (s / dense_ref["s"]) ** 2
        dense = {"ms": ms, "label": dense_ref["label"], "extrapolated": True, "from_seqlen": dense_ref["s"]}
    rows.append({"seqlen": s, "method": "dense", "total_ms": dense["ms"], "density": 1.0,
                 "tflops": flops / dense["ms"] / 1e9, **dense})
    for name in args.methods:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        row = {"seqlen": s, "method": name}
        try:
            phases, config = method_phases(name, args, q, k, v)
            t, result = timed_phases(phases, args.warmup, args.repeats, call=public_call(name, args, q, k, v))
            density = result[1].density() if name == "minference" else result[1].head_density(True)
            del result
            if "call" in t:
                row["call_ms"] = t.pop("call")
                row["call_speedup"] = dense["ms"] / row["call_ms"]
            row.update({f"{p}_ms": ms for p, ms in t.items()}, config=config, density=float(density.mean()))
            row["total_ms"] = sum(t.values())
            row["speedup"] = dense["ms"] / row["total_ms"]
            if "estimate_ms" in row:
                row["est_index_frac"] = (row["estimate_ms"] + row["index_ms"]) / row["total_ms"]
            row["effective_tflops"] = flops * row["density"] / row["total_ms"] / 1e9
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = "OOM: " + str(e).split("\n")[0][:200]
        except Exception as e:  # a method failing must not hide the others' numbers
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        print(json.dumps(row), flush=True)
    del q, k, v
    torch.cuda.empty_cache()
    return rows


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(rows, device, args):
    print(f"\nMethods benchmark on {device}: 1 layer, B=1, {args.heads} q / {args.kv_heads} kv heads, "
          f"D={args.head_dim}, {args.dtype}, {args.data} inputs; median ms; speedup vs dense in the same run")
    head = (f"{'seqlen':>8} {'method':>15} {'estimate':>9} {'index':>8} {'attention':>10} {'total':>10} "
            f"{'est+idx':>8} {'speedup':>8} {'call':>8} {'x call':>7} {'density':>8} {'peakGiB':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['seqlen']:>8} {r['method']:>15}  {r['error']}")
            continue
        total = _fmt(r["total_ms"], ".2f") + (" (extrap.)" if r.get("extrapolated") else "")
        frac = _fmt(r.get("est_index_frac") and 100 * r["est_index_frac"], ".1f")
        name = r["method"] + (f" [{r['label']}]" if r["method"] == "dense" else "")
        print(f"{r['seqlen']:>8} {name:>15} {_fmt(r.get('estimate_ms'), '.2f'):>9} {_fmt(r.get('index_ms'), '.2f'):>8} "
              f"{_fmt(r.get('attention_ms'), '.2f'):>10} {total:>10} {frac + '%' if frac != '-' else '-':>8} "
              f"{_fmt(r.get('speedup'), '.1f'):>8} {_fmt(r.get('call_ms'), '.2f'):>8} "
              f"{_fmt(r.get('call_speedup'), '.2f'):>7} {_fmt(r.get('density'), '.3f'):>8} "
              f"{_fmt(r.get('peak_gib'), '.1f'):>8}")
    if any(r.get("extrapolated") for r in rows):
        print("dense '(extrap.)': not run; the largest measured dense time scaled by (seqlen / measured)^2")
    print("minference: the uniform default config (sparse_attn.methods.default_head_config), total only")
    print("total: the phases' sum, a synchronize between them; call: one sparse_attention call (x call: its "
          "speed-up)")


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_methods.py needs a CUDA GPU (none found); nothing was measured.", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    device = torch.cuda.get_device_name()
    rows, dense_ref = [], {}
    t0 = time.time()
    for s in sorted(args.seqlens):
        rows += bench_length(s, args, dtype, dense_ref)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "torch": torch.__version__, "dtype": args.dtype, "heads": args.heads,
            "kv_heads": args.kv_heads, "head_dim": args.head_dim, "warmup": args.warmup, "repeats": args.repeats,
            "date": time.strftime("%Y-%m-%d"), "wall_s": time.time() - t0, "args": vars(args)}
    (out / "bench_methods.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print_table(rows, device, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
