"""Probe: profile the end-to-end benchmark's synthetic model (bench_e2e.synthetic_model) with the package's
profiler, so `minference` runs it with per-head patterns instead of the uniform default.

    python bench/probes/profile_synth.py --model synth8b --layers 4 --length 131072 --layer-target 0.9 \
        --out bench/results/patches
    SPARSE_ATTN_PATCHES=bench/results/patches python bench/bench_e2e.py --methods minference ...

Calibration input: bench_e2e.synthetic_prompt (seed 7, not the benchmark's prompt seed) at --length tokens; the
profile (target recall per head, tail target on the last query block, as `sparse_attn.profiler.profile_model`)
is named after the model (sparse_attn/<model>-<layers>l), so patch() finds it by identity when --out is on
$SPARSE_ATTN_PATCHES. --layer-target: per layer a mean recall instead of a per-head target (the end-to-end
benchmark's bar is recall >= 0.9 per layer); --max-budget drops candidates whose budgets exceed length / N keys
(vertical-slash and A-shape only: large vertical-slash budgets are not sparse at 128K and their layouts
are large). Prints the chosen pattern
counts, per layer the mean recall and density, and the time taken.
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

import bench_e2e  # noqa: E402
from sparse_attn.profiler import default_candidates, profile_model  # noqa: E402
from sparse_attn.profiles import profile_filename, save_profile  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synth8b", choices=sorted(bench_e2e.SHAPES))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--layer-target", type=float, default=None)
    p.add_argument("--query-blocks", type=int, default=None)
    p.add_argument("--max-budget", type=int, default=16,
                   help="vertical / slash / window budgets at most length / N keys")
    p.add_argument("--patterns", nargs="+", default=["a_shape", "vertical_slash", "block_sparse", "dense"],
                   help="candidate patterns (their registry grids); the default leaves out those whose estimators "
                        "cost more on the GPU than the profiler's FLOP count says (flexprefill, xattention)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench/results/patches")
    a = p.parse_args()
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    model = bench_e2e.synthetic_model(a.model, a.layers, dtype=dtype, device=a.device)
    ids = bench_e2e.synthetic_prompt(model.config.vocab_size, 1, a.length, seed=7, device=a.device)
    cap = a.length // a.max_budget
    capped = ("vertical_size", "slash_size", "window")  # key counts; block top-k's grid stays whole
    candidates = [c for c in default_candidates(a.length) if c["pattern"] in a.patterns
                  and all(c[n] <= cap for n in capped if n in c)]
    t0 = time.perf_counter()
    profile, _ = profile_model(model, ids, candidates=candidates, target=a.target, layer_target=a.layer_target,
                               query_blocks=a.query_blocks, name=model.name_or_path, progress=False)
    path = save_profile(profile, Path(a.out) / profile_filename(model.name_or_path))
    kinds = collections.Counter(h["pattern"] for layer in profile.layers for h in layer)
    print(f"{path}: {dict(kinds)} from {len(candidates)} candidates in {time.perf_counter() - t0:.1f} s")
    for li, layer in enumerate(profile.layers):
        worst = [min(h["recall"], h.get("tail_recall", 1.0)) for h in layer]
        print(f"layer {li}: recall {sum(h['recall'] for h in layer) / len(layer):.3f} (with the tail "
              f"{sum(worst) / len(worst):.3f}), density {sum(h['density'] for h in layer) / len(layer):.4f}; "
              + ", ".join(f"{h['pattern']}:" + ",".join(f"{k}={v}" for k, v in h.items()
                                                     if k not in ('pattern', 'recall', 'density', 'tail_recall'))
                          + f" r={h['recall']:.2f}" for h in layer[:: max(1, len(layer) // 8)]))
    print(f"settings {profile.settings}")


if __name__ == "__main__":
    main()
