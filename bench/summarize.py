"""The short table bench/gpu_suite.sh prints last: each step's exit, then the headline figures.

    python bench/summarize.py OUT_DIR

Reads OUT_DIR/steps.txt, bench_block_sparse.json and bench_methods.json (whichever exist) and prints,
for the block-sparse kernel, effective TFLOP/s per length and density with the ratio to cuDNN dense and
to FlexAttention on the same mask; for the methods, the total time split into estimate / index /
attention (and as one call) with the speed-up over cuDNN dense causal. Each bar is marked "ok" or "MISS"
against its target. Then FlexPrefill's bars (OUT_DIR/flex_bars/) and the speed-recall frontier table
(OUT_DIR/frontier/frontier.md), where those steps ran.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table  # noqa: E402


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISS"


def steps(out: Path) -> None:
    path = out / "steps.txt"
    if not path.exists():
        return
    print("steps: " + ", ".join(f"{n} {'ok' if rc == '0' else 'FAILED'} ({s} s)"
                                for n, rc, s in (line.split() for line in path.read_text().splitlines() if line)))


def block_sparse(out: Path) -> None:
    data = _load(out / "bench_block_sparse.json")
    if not data:
        print("block-sparse: no results")
        return
    rows = data["rows"]
    print("\nblock-sparse kernel, effective TFLOP/s of the eager call (ours / cuDNN dense, ours / Flex same mask);"
          "\ngpu: the same calls replayed from CUDA graphs (GPU time only, no host launch time)")
    table = []
    for s in sorted({r["seqlen"] for r in rows}):
        at = [r for r in rows if r["seqlen"] == s]
        cudnn_row = next(r for r in at if r["kernel"] == "sdpa_cudnn_dense")
        cudnn = cudnn_row["tflops"]
        for r in sorted((r for r in at if r["kernel"] == "ours"), key=lambda r: r["density"]):
            frow = next((f for f in at if f["kernel"] == "flex" and f["density"] == r["density"]), None)
            flex = frow["tflops"] if frow else None
            bars = []  # beats Flex (eager and GPU time), then the bars at 128K / 10 % and at 100 %
            if flex is not None:
                bars.append(">flex " + _mark(r["tflops"] > flex))
            g_cudnn = g_flex = None
            if r.get("gpu_tflops") and cudnn_row.get("gpu_tflops"):
                g_cudnn = r["gpu_tflops"] / cudnn_row["gpu_tflops"]
            if r.get("gpu_tflops") and frow and frow.get("gpu_tflops"):
                g_flex = r["gpu_tflops"] / frow["gpu_tflops"]
                bars.append("gpu>flex " + _mark(g_flex > 1))
            if s >= 131072 and abs(r["density"] - 0.1) < 0.03:
                bars.append("10%@128K>=0.8x " + _mark(r["tflops"] >= 0.8 * cudnn))
            if r["density"] > 0.99:
                bars.append("100%>=0.8x " + _mark(r["tflops"] >= 0.8 * cudnn))
            table.append({"S": f"{s // 1024}K", "density": 100 * r["density"], "ours": r["tflops"], "flex": flex,
                          "cudnn": cudnn, "/cudnn": r["tflops"] / cudnn, "/flex": flex and r["tflops"] / flex,
                          "gpu/cudnn": g_cudnn, "gpu/flex": g_flex, "bars": " ".join(bars)})
    print_table(table, ["S", "density", "ours", "flex", "cudnn", "/cudnn", "/flex", "gpu/cudnn", "gpu/flex", "bars"],
                {"density": "{:.1f}%", "ours": "{:.0f}", "flex": "{:.0f}", "cudnn": "{:.0f}", "/cudnn": "{:.2f}",
                 "/flex": "{:.2f}", "gpu/cudnn": "{:.2f}", "gpu/flex": "{:.2f}"}, left=["bars"])


def methods(out: Path) -> None:
    data = _load(out / "bench_methods.json")
    if not data:
        print("methods: no results")
        return
    print("\nmethods, one layer, total ms = estimate + index + attention (the phases' sum); call: one "
          "sparse_attention call;\nspeed-ups over cuDNN dense causal in the same run")
    table = []
    for r in data["rows"]:
        name = r["method"]
        row = {"S": f"{r['seqlen'] // 1024}K", "method": name}
        if "error" in r:
            table.append(dict(row, note=r["error"][:60]))
            continue
        if name == "dense":
            table.append(dict(row, total=r["total_ms"], speedup=1.0, density=1.0,
                              note="(extrapolated)" if r.get("extrapolated") else ""))
            continue
        note = ""
        if r.get("est_index_frac") is not None:
            note = f"est+idx {100 * r['est_index_frac']:.1f}%"
        table.append(dict(row, est=r.get("estimate_ms"), index=r.get("index_ms"), attn=r.get("attention_ms"),
                          total=r["total_ms"], speedup=r["speedup"], call=r.get("call_ms"),
                          x_call=r.get("call_speedup"), density=r["density"], recall=r.get("recall"), note=note))
    print_table(table, ["S", "method", "est", "index", "attn", "total", "speedup", "call", "x_call", "density", "recall",
                        "note"],
                {"est": "{:.2f}", "index": "{:.2f}", "attn": "{:.2f}", "total": "{:.1f}", "speedup": "{:.1f}",
                 "call": "{:.1f}", "x_call": "{:.1f}", "density": "{:.3f}", "recall": "{:.3f}"},
                headers={"x_call": "x call"},
                left=["note"])


FLEX_BARS = "flex_bars"  # gpu_suite.sh's step: bench_methods.json of flexprefill / xattention at 128K and 1M


def flex_bars(out: Path) -> None:
    """FlexPrefill's bars: at 128K (gamma 0.9, one call) >= 5x cuDNN with recall >= 0.9 on the mixed input,
    >= 6x on the structured one, estimate + index <= 10 % of the phases; 1M runs. XAttention recorded."""
    data = _load(out / FLEX_BARS / "bench_methods.json")
    if not data:
        return
    print("\nflexprefill / xattention bars (x call: one sparse_attention call vs cuDNN dense, same run)")
    table = []
    for r in data["rows"]:
        if r["method"] == "dense":
            continue
        row = {"data": r["data"], "S": f"{r['seqlen'] // 1024}K", "method": r["method"]}
        if "error" in r:
            table.append(dict(row, bars="MISS " + r["error"][:50]))
            continue
        bars = []
        if r["method"].startswith("flexprefill") and r["seqlen"] == 131072:
            target = 5.0 if r["data"] == "mixed" else 6.0
            bars.append(f">={target:.0f}x " + _mark(r["call_speedup"] >= target))
            if r["data"] == "mixed":
                bars.append("recall>=0.9 " + _mark(r.get("recall", 0) >= 0.9))
            bars.append("est+idx<=10% " + _mark(r.get("est_index_frac", 1) <= 0.10))
        if r["seqlen"] >= 1048576:
            bars.append("1M runs ok")
        table.append(dict(row, x_call=r["call_speedup"], speedup=r.get("speedup"), recall=r.get("recall"),
                          density=r["density"], est_idx=r.get("est_index_frac") and 100 * r["est_index_frac"],
                          bars=" ".join(bars)))
    print_table(table, ["data", "S", "method", "x_call", "speedup", "recall", "density", "est_idx", "bars"],
                {"x_call": "{:.2f}", "speedup": "{:.2f}", "recall": "{:.3f}", "density": "{:.3f}",
                 "est_idx": "{:.1f}%"}, headers={"x_call": "x call", "est_idx": "est+idx"}, left=["bars"])


def frontier(out: Path) -> None:
    path = out / "frontier" / "frontier.md"
    if path.exists():
        print("\n" + path.read_text())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if len(argv) != 1:
        print("usage: python bench/summarize.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    steps(out)
    block_sparse(out)
    methods(out)
    flex_bars(out)
    frontier(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
