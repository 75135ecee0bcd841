#!/usr/bin/env bash
# The block-sparse kernel's GPU session in one call: GPU tests, then the benchmark (and config sweeps).
#   bash bench/gpu_block_sparse.sh            # tests + benchmark at 8K, 32K, 128K
#   SWEEP=1 bash bench/gpu_block_sparse.sh    # also time alternative tile configs (<= 32K) and 64-blocks
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest -q -m gpu tests/test_block_sparse.py 2>&1 | tail -n 15 | tee "$OUT/gpu_tests.log"
variants=()
if [ "${SWEEP:-0}" = 1 ]; then
    variants=(--variants ${VARIANTS:-128,128,8,3 128,128,8,2,1 128,64,8,3,1 128,64,8,3})
    python3 bench/bench_block_sparse.py --seqlens 32768 --block 64 --no-flex --densities 0.1 1.0 \
        --variants ${VARIANTS64:-64,64,4,3,1 64,64,8,2} --out "$OUT/block64" 2>&1 | tail -n 14
fi
python3 bench/bench_block_sparse.py --seqlens ${SEQLENS:-8192 32768 131072} "${variants[@]}" --out "$OUT"
