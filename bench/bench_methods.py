"""Methods benchmark: one attention layer (32 query / 8 kv heads, D=128, bf16, batch 1), each method's
time split into estimation, index building and attention, against cuDNN dense causal in the same run.

    python bench/bench_methods.py --seqlens 32768 131072 --methods a_shape:window=4096 NAME:key=value,... \
        --out bench/results

--methods takes method specs from the registry (sparse_attn.list_methods(); default: every method with its
own defaults): a name, optionally followed by ":key=value,key=value" with the method's kwargs (ints, floats
or none), so one method can appear in several configurations. Methods that run one pattern (those generated
from a pattern's registry entry) are timed phase by phase: estimate, index, attention, each with CUDA events
and a synchronize between phases; each number is the median over --repeats runs after --warmup runs. "call"
is the same method timed as one public call, `sparse_attn.sparse_attention(q, k, v, method, ...)`, with no
synchronize between its phases: what a user waits for (the phase split is for attribution; its synchronizes
leave the GPU idle between phases). The call is timed before each pass of the phases, alternating, so both
see the same power state of the GPU. Per-head mixtures are timed as the call alone. Dense attention above
--dense-max tokens is not run: it is extrapolated from the largest measured length by the quadratic law and
marked "(extrap.)" in the table. Prints a table and writes bench_methods.json under --out. Needs CUDA.

Inputs (--data): "structured" (default) gives attention the shapes real heads have, so the estimators'
choices and the resulting densities are realistic: every query and key is a shared direction (4x the noise)
plus Gaussian noise, rotated by RoPE (base 10000), which makes a local band with periodic slashes; the
first 4 keys are sinks. "random" is plain Gaussian q, k, v: no structure, so estimators that look for
structure find little and their indices approach dense.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import method_call, method_phases, methods_inputs, parse_method_spec, time_phases  # noqa: E402


def parse_spec(text: str):
    try:
        return parse_method_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def default_specs():
    from sparse_attn.methods import list_methods

    return [parse_spec(m) for m in list_methods() if m != "dense"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=int, nargs="+", default=[32768, 131072, 524288, 1048576])
    p.add_argument("--methods", nargs="+", type=parse_spec, default=None,
                   help="method specs NAME[:key=value,...] (default: every registered method, its defaults)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--data", choices=("structured", "random"), default="structured")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dense-max", type=int, default=524288,
                   help="longest length at which dense runs; longer ones are extrapolated")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results")))
    args = p.parse_args(argv)
    if args.methods is None:
        args.methods = default_specs()
    return args


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


def bench_length(s, args, dtype, dense_ref):
    q, k, v = methods_inputs(s, dtype, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                             data=args.data)
    rows = []
    flops = 4 * args.heads * args.head_dim * s * (s + 1) / 2  # causal dense: QK^T and PV
    if s <= args.dense_max:
        torch.cuda.reset_peak_memory_stats()
        run, label = dense_baseline(q, k, v)
        t = time_phases([("attention", run)], args.warmup, args.repeats)[0]  # the output is not kept alive
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
    for label, name, kwargs in args.methods:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        row = {"seqlen": s, "method": label}
        try:
            phases = method_phases(name, kwargs, q, k, v)
            call = method_call(name, kwargs, q, k, v)
            if phases is None:
                t = time_phases([("call", call)], args.warmup, args.repeats)[0]
            else:
                t = time_phases(phases, args.warmup, args.repeats, call=call)[0]
            stats = {}
            method_call(name, kwargs, q, k, v, stats)(None)  # untimed: the density it computes
            row["call_ms"] = t.pop("call")
            row["call_speedup"] = dense["ms"] / row["call_ms"]
            row.update({f"{p}_ms": ms for p, ms in t.items()}, config=kwargs, density=float(stats["density"].mean()))
            row["total_ms"] = sum(t.values()) if t else row["call_ms"]
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
    print(f"\nMethods benchmark on {device}, {time.strftime('%Y-%m-%d')}: 1 layer, B=1, {args.heads} q / {args.kv_heads} kv heads, "
          f"D={args.head_dim}, {args.dtype}, {args.data} inputs; median ms; speedup vs dense in the same run")
    head = (f"{'seqlen':>8} {'method':>15} {'estimate':>9} {'index':>8} {'attention':>10} {'total':>10} "
            f"{'est+idx':>8} {'speedup':>8} {'call':>8} {'x call':>7} {'density':>8} {'peakGiB':>8}")
    width = max([15] + [len(r["method"]) for r in rows])
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['seqlen']:>8} {r['method']:>{width}}  {r['error']}")
            continue
        total = _fmt(r["total_ms"], ".2f") + (" (extrap.)" if r.get("extrapolated") else "")
        frac = _fmt(r.get("est_index_frac") and 100 * r["est_index_frac"], ".1f")
        name = r["method"] + (f" [{r['label']}]" if r["method"] == "dense" else "")
        print(f"{r['seqlen']:>8} {name:>{width}} {_fmt(r.get('estimate_ms'), '.2f'):>9} {_fmt(r.get('index_ms'), '.2f'):>8} "
              f"{_fmt(r.get('attention_ms'), '.2f'):>10} {total:>10} {frac + '%' if frac != '-' else '-':>8} "
              f"{_fmt(r.get('speedup'), '.1f'):>8} {_fmt(r.get('call_ms'), '.2f'):>8} "
              f"{_fmt(r.get('call_speedup'), '.2f'):>7} {_fmt(r.get('density'), '.3f'):>8} "
              f"{_fmt(r.get('peak_gib'), '.1f'):>8}")
    if any(r.get("extrapolated") for r in rows):
        print("dense '(extrap.)': not run; the largest measured dense time scaled by (seqlen / measured)^2")
    print("total: the phases' sum, a synchronize between them (methods without phases: the call); call: one "
          "sparse_attention call (x call: its speed-up)")


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
            "date": time.strftime("%Y-%m-%d"), "wall_s": time.time() - t0,
            "args": {**vars(args), "methods": [label for label, _, _ in args.methods]}}
    (out / "bench_methods.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print_table(rows, device, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
