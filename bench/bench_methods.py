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

Recall: beside each speed-up, the share of the dense attention mass the method's index keeps, on
--recall-bands bands of --recall-rows query rows spread over the sequence (0 bands: not measured); the
attention is scored densely on those rows only (sparse_attn.recall), so it costs a small part of a call.

Frontier (--frontier): every registered prefill pattern at each budget of its registry sweep (its own
defaults otherwise), timed as one call, with recall and density, against cuDNN in the same run, on each
--data input; writes frontier.json, frontier.md (the table) and frontier.png (x: speed-up vs cuDNN, y:
recall, one line per pattern through its budgets, one panel per input):

    python bench/bench_methods.py --frontier --seqlens 131072 --data structured mixed

Inputs (--data, one or several): "structured" (default) gives attention the shapes real heads have, so the estimators'
choices and the resulting densities are realistic: every query and key is a shared direction (4x the noise)
plus Gaussian noise, rotated by RoPE (base 10000), which makes a local band with periodic slashes; the
first 4 keys are sinks. "random" is plain Gaussian q, k, v: no structure, so estimators that look for
structure find little and their indices approach dense. "mixed": half the kv heads (and their query heads)
structured, half attending to 200 scattered keys with no positional structure (bench/common.py).
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

from common import (DATA, method_call, method_phases, method_recall, methods_inputs, parse_method_spec,  # noqa: E402
                    plot_frontier, time_phases)


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
    p.add_argument("--data", choices=DATA, nargs="+", default=["structured"])
    p.add_argument("--recall-bands", type=int, default=16, help="bands of query rows recall is measured on (0: off)")
    p.add_argument("--recall-rows", type=int, default=64, help="query rows per recall band")
    p.add_argument("--frontier", action="store_true",
                   help="every prefill pattern over its registry sweep: speed-up and recall (see above)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dense-max", type=int, default=524288,
                   help="longest length at which dense runs; longer ones are extrapolated")
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results")))
    args = p.parse_args(argv)
    if args.methods is None:
        args.methods = frontier_specs(args.seqlens) if args.frontier else default_specs()
    return args


def frontier_specs(seqlens):
    """Per registered prefill pattern, a spec per budget of its sweep at the longest length (its defaults
    where it has no sweep)."""
    from sparse_attn.patterns import patterns

    specs = []
    for p in patterns():
        if not p.prefill:
            continue
        grid = p.sweep(max(seqlens), 64) if p.sweep is not None else [{}]
        for budget in grid:
            specs.append(parse_spec(p.name + (":" if budget else "") + ",".join(f"{k}={v}" for k, v in budget.items())))
    return specs


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


def bench_length(s, data, args, dtype, dense_ref):
    q, k, v = methods_inputs(s, dtype, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                             data=data)
    recall_rows = None
    if args.recall_bands:
        from sparse_attn.recall import sampled_rows

        recall_rows = sampled_rows(s, args.recall_bands, args.recall_rows)
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
    rows.append({"seqlen": s, "data": data, "method": "dense", "total_ms": dense["ms"], "density": 1.0,
                 "recall": 1.0, "tflops": flops / dense["ms"] / 1e9, **dense})
    for label, name, kwargs in args.methods:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        row = {"seqlen": s, "data": data, "method": label, "pattern": name}
        try:
            phases = None if args.frontier else method_phases(name, kwargs, q, k, v)
            call = method_call(name, kwargs, q, k, v)
            t = None
            if phases is not None:
                try:
                    t = time_phases(phases, args.warmup, args.repeats, call=call)[0]
                except torch.cuda.OutOfMemoryError as e:  # the phases build whole-call layouts; the call
                    row["phases_error"] = "OOM: " + str(e).split("\n")[0][:120]  # runs in row chunks
                    torch.cuda.empty_cache()
            if t is None:
                t = time_phases([("call", call)], args.warmup, args.repeats)[0]
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
            if recall_rows is not None:
                row["recall"] = method_recall(name, kwargs, q, k, v, recall_rows)["recall"]
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
          f"D={args.head_dim}, {args.dtype}, {' / '.join(args.data)} inputs; median ms; speedup vs dense in the same run")
    head = (f"{'data':>10} {'seqlen':>8} {'method':>15} {'estimate':>9} {'index':>8} {'attention':>10} {'total':>10} "
            f"{'est+idx':>8} {'speedup':>8} {'call':>8} {'x call':>7} {'density':>8} {'recall':>7} {'peakGiB':>8}")
    width = max([15] + [len(r["method"]) for r in rows])
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['data']:>10} {r['seqlen']:>8} {r['method']:>{width}}  {r['error']}")
            continue
        total = _fmt(r["total_ms"], ".2f") + (" (extrap.)" if r.get("extrapolated") else "")
        frac = _fmt(r.get("est_index_frac") and 100 * r["est_index_frac"], ".1f")
        name = r["method"] + (f" [{r['label']}]" if r["method"] == "dense" else "")
        print(f"{r['data']:>10} {r['seqlen']:>8} {name:>{width}} {_fmt(r.get('estimate_ms'), '.2f'):>9} {_fmt(r.get('index_ms'), '.2f'):>8} "
              f"{_fmt(r.get('attention_ms'), '.2f'):>10} {total:>10} {frac + '%' if frac != '-' else '-':>8} "
              f"{_fmt(r.get('speedup'), '.1f'):>8} {_fmt(r.get('call_ms'), '.2f'):>8} "
              f"{_fmt(r.get('call_speedup'), '.2f'):>7} {_fmt(r.get('density'), '.3f'):>8} "
              f"{_fmt(r.get('recall'), '.3f'):>7} "
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
    rows = []
    t0 = time.time()
    for data in args.data:
        dense_ref = {}
        for s in sorted(args.seqlens):
            rows += bench_length(s, data, args, dtype, dense_ref)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "torch": torch.__version__, "dtype": args.dtype, "heads": args.heads,
            "kv_heads": args.kv_heads, "head_dim": args.head_dim, "warmup": args.warmup, "repeats": args.repeats,
            "date": time.strftime("%Y-%m-%d"), "wall_s": time.time() - t0,
            "args": {**vars(args), "methods": [label for label, _, _ in args.methods]}}
    name = "frontier" if args.frontier else "bench_methods"
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print_table(rows, device, args)
    if args.frontier:
        write_frontier(rows, out, device, args)
    return 0


def write_frontier(rows, out: Path, device: str, args) -> None:
    """frontier.md (per input and length: pattern, budget, speed-up, recall, density) and frontier.png."""
    from common import format_table

    lines = [f"Speed-up vs cuDNN (one sparse_attention call) and recall on {device}, {time.strftime('%Y-%m-%d')}: "
             f"1 layer, B=1, {args.heads} q / {args.kv_heads} kv heads, D={args.head_dim}, {args.dtype}; recall on "
             f"{args.recall_bands} bands of {args.recall_rows} query rows", ""]
    for data in args.data:
        for s in sorted(args.seqlens):
            table = [dict(r, budget=r["method"].partition(":")[2] or "defaults") for r in rows
                     if r["data"] == data and r["seqlen"] == s and r["method"] != "dense" and "error" not in r]
            lines += [f"{data}, {s} tokens:", "", format_table(
                table, ["pattern", "budget", "call_speedup", "recall", "density"],
                {"call_speedup": "{:.2f}", "recall": "{:.3f}", "density": "{:.3f}"},
                {"call_speedup": "speed-up"}, markdown=True, left=("pattern", "budget")), ""]
    (out / "frontier.md").write_text("\n".join(lines))
    print("\n".join(lines))
    plot_frontier(out / "frontier.png", rows, f"speed-up vs cuDNN and recall, {device}")


if __name__ == "__main__":
    sys.exit(main())
