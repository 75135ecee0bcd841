"""The short table bench/gpu_suite.sh prints last: each step's exit, then the figures the issues set bars for.

    python bench/summarize.py OUT_DIR

Reads OUT_DIR/steps.txt, bench_block_sparse.json and bench_methods.json (whichever exist) and prints,
for the block-sparse kernel, effective TFLOP/s per length and density with the ratio to cuDNN dense and
to FlexAttention on the same mask; for the methods, the total time split into estimate / index /
attention with the speed-up over cuDNN dense causal. Each bar is marked "ok" or "MISS" against its target.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


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
    print(f"{'S':>6} {'density':>8} {'ours':>7} {'flex':>7} {'cudnn':>7} {'/cudnn':>7} {'/flex':>6} "
          f"{'gpu/cudnn':>9} {'gpu/flex':>8}")
    for s in sorted({r["seqlen"] for r in rows}):
        at = [r for r in rows if r["seqlen"] == s]
        cudnn_row = next(r for r in at if r["kernel"] == "sdpa_cudnn_dense")
        cudnn = cudnn_row["tflops"]
        ours = sorted((r for r in at if r["kernel"] == "ours"), key=lambda r: r["density"])
        for r in ours:
            frow = next((f for f in at if f["kernel"] == "flex" and f["density"] == r["density"]), None)
            flex = frow["tflops"] if frow else None
            bars = []  # beats Flex (eager and GPU time), then the bars at 128K/10% and 100%
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
            fx = f"{flex:7.0f} {r['tflops'] / flex:6.2f}" if flex else f"{'-':>7} {'-':>6}"
            gc = f"{g_cudnn:9.2f}" if g_cudnn else f"{'-':>9}"
            gf = f"{g_flex:8.2f}" if g_flex else f"{'-':>8}"
            print(f"{s // 1024:>5}K {100 * r['density']:7.1f}% {r['tflops']:7.0f} {fx.split()[0]:>7} {cudnn:7.0f} "
                  f"{r['tflops'] / cudnn:7.2f} {fx.split()[1]:>6} {gc} {gf}  {' '.join(bars)}")


def methods(out: Path) -> None:
    data = _load(out / "bench_methods.json")
    if not data:
        print("methods: no results")
        return
    print("\nmethods, one layer, total ms = estimate + index + attention; speed-up over cuDNN dense causal")
    print(f"{'S':>6} {'method':>15} {'est':>7} {'index':>7} {'attn':>8} {'total':>9} {'speedup':>8} {'density':>8}")
    targets = {131072: 6.0, 1048576: 30.0}
    for r in data["rows"]:
        name = r["method"]
        if "error" in r:
            print(f"{r['seqlen'] // 1024:>5}K {name:>15}  {r['error'][:60]}")
            continue
        if name == "dense":
            note = " (extrapolated)" if r.get("extrapolated") else ""
            print(f"{r['seqlen'] // 1024:>5}K {name:>15} {'':>7} {'':>7} {'':>8} {r['total_ms']:9.1f} {'1.0':>8}"
                  f" {1.0:8.3f}{note}")
            continue
        g = lambda key: f"{r[key]:.2f}" if r.get(key) is not None else "-"  # noqa: E731
        bar = ""
        if name in ("vertical_slash", "vs_pairs") and r["seqlen"] in targets:
            bar = f">={targets[r['seqlen']]:.0f}x " + _mark(r["speedup"] >= targets[r["seqlen"]])
            if r["seqlen"] == 131072 and r.get("est_index_frac") is not None:
                bar += f", est+idx {100 * r['est_index_frac']:.1f}% " + _mark(r["est_index_frac"] <= 0.10)
        print(f"{r['seqlen'] // 1024:>5}K {name:>15} {g('estimate_ms'):>7} {g('index_ms'):>7} {g('attention_ms'):>8} "
              f"{r['total_ms']:9.1f} {r['speedup']:8.1f} {r['density']:8.3f}  {bar}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python bench/summarize.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    steps(out)
    block_sparse(out)
    methods(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
