"""The offline profiler: exact recall/density from block mass, the choice on heads with a planted pattern,
the budget greedy, and the CLI (argument errors, a profile written for a tiny model that loads and fits it)."""
import json
import subprocess
import sys

import pytest
import torch

from helpers import randn
from sparse_attn import cli
from sparse_attn.estimators import a_shape_layout, block_topk_layout, estimate_block_topk, estimate_vertical_slash
from sparse_attn.estimators.vertical_slash import build_vertical_slash_index
from sparse_attn.profiler import (
    LayerScores,
    _hull,
    block_mass,
    candidate_cost,
    candidate_cost_table,
    compare_uniform,
    default_candidates,
    head_config_scores,
    mass_recall,
    profile_model,
    score_candidates,
    floor_mask,
    sample_query_blocks,
    select_budget,
    select_heads,
    select_layer_target,
)
from sparse_attn.integrations.hf import is_patched
from sparse_attn.layouts import KeySums, Layout
from sparse_attn.patterns import get_pattern, mixture_default
from sparse_attn.profiles import load_profile
from sparse_attn.recall import attention_recall

T, D = 2048, 128
SCALE = D ** -0.5


@pytest.mark.parametrize("seqlen", [64, 300, 513])
def test_block_mass_recall_and_density_equal_the_definitions(seqlen):
    g = torch.Generator().manual_seed(seqlen)
    q = randn(g, 1, 6, seqlen, 32, scale=2, device="cpu")
    k = randn(g, 1, 2, seqlen, 32, scale=2, device="cpu")
    mass = block_mass(q, k, chunk_elements=6 * seqlen * 64)  # several row chunks
    assert torch.allclose(mass.sum(-1).sum(-1), torch.full((6,), float(seqlen)), rtol=1e-5)
    vi, si = estimate_vertical_slash(q, k, vertical_size=[3, 5, 70, 1, 2, 9], slash_size=[2, 4, 1, 66, 3, 7])
    layouts = [
        a_shape_layout(1, 6, seqlen, seqlen, sink=[0, 64, 1, 128, 64, 0], window=[1, 64, 100, 7, 300, 64]),
        block_topk_layout(estimate_block_topk(q, k, top_k=[2, 3, 1, 4, 2, 5]), seqlen, seqlen),
        build_vertical_slash_index(vi, si, seqlen, seqlen, block_size_q=64),
    ]
    for layout in layouts:
        assert torch.allclose(mass_recall(layout, mass), attention_recall(q, k, layout)[0], atol=1e-6)
    scores = score_candidates(q, k, default_candidates(seqlen))
    for i, cfg in enumerate(scores.candidates):
        if cfg["pattern"] == "a_shape":
            layout = a_shape_layout(1, 6, seqlen, seqlen, sink=cfg["sink"], window=cfg["window"])
            assert torch.allclose(scores.density[i], layout.head_density()[0])
            assert torch.allclose(scores.recall[i], attention_recall(q, k, layout)[0], atol=1e-6)


def _local_head():
    """ALiBi-like: logit(i, j) = -beta (i - j), so the mass sits in a window of ~1/beta tokens."""
    q, k = torch.zeros(T, D), torch.zeros(T, D)
    i = torch.arange(T).float()
    beta = 0.05
    k[:, 0], k[:, 1] = i / T, 1.0
    q[:, 0], q[:, 1] = beta * T / SCALE, -beta * i / SCALE
    return q, k


def _vertical_head(g, peak=10.0):
    """Key 0 and 12 keys spread over the first half share a direction every query aligns with."""
    cols = torch.cat([torch.tensor([0]), torch.randperm(T // 2 - 64, generator=g)[:12] + 64])
    k = 0.3 * torch.randn(T, D, generator=g)
    q = 0.3 * torch.randn(T, D, generator=g)
    k[:, 0] = 0.0
    k[cols] = 0.0
    k[cols, 0] = q[:, 0] = (peak / SCALE) ** 0.5
    return q, k


def _slash_head(g, offsets=(300, 777, 1201, 1500), peak=16.0):
    """Random unit codes per position; query i is the sum of the codes of keys i - o: diagonals at o."""
    k = torch.randn(T, D, generator=g) / D ** 0.5
    q = torch.zeros(T, D)
    for o in offsets:
        q[o:] += k[:-o] * peak / SCALE
    return q, k


def _block_head(g, clusters=16, peak=12.0):
    """Each 64-token block carries one of 16 orthonormal codes: blocks attend to blocks of their code."""
    basis = torch.linalg.qr(torch.randn(D, clusters, generator=g))[0].T
    codes = basis[torch.randint(0, clusters, (T // 64,), generator=g)].repeat_interleave(64, 0)
    return codes * (peak / SCALE), codes.clone()


@pytest.fixture(scope="module")
def planted():
    g = torch.Generator().manual_seed(0)
    heads = [_local_head(), _vertical_head(g), _slash_head(g), _block_head(g)]
    q = torch.stack([h[0] for h in heads])[None]
    k = torch.stack([h[1] for h in heads])[None]
    # the fixed-shape patterns each head was planted for (adaptive ones, such as flexprefill, may fit several)
    fixed = [c for c in default_candidates(T) if c["pattern"] in ("a_shape", "vertical_slash", "block_sparse", "dense")]
    return q, k, score_candidates(q, k, fixed)


def test_profiler_picks_the_planted_pattern(planted):
    q, k, scores = planted
    cost = candidate_cost_table(scores.candidates, scores.density, T, "time", 64, last_q=64)
    picks = select_heads(scores, 0.95, cost)
    chosen = [scores.candidates[i] for i in picks]
    assert [c["pattern"] for c in chosen] == ["a_shape", "vertical_slash", "vertical_slash", "block_sparse"]
    assert chosen[0]["window"] <= 128  # the ~1/beta = 20-token window, at block granularity
    assert chosen[1]["vertical_size"] > 64 and chosen[1]["slash_size"] == 64  # columns, not diagonals
    assert chosen[2]["slash_size"] > 64  # chosen diagonals beyond the forced nearest 64
    for h, i in enumerate(picks):
        assert scores.recall[i, h] >= 0.95 and scores.density[i, h] < 0.5
    # The planted structure is real: A-shape cannot hold the columns, the diagonals or the blocks.
    a_shape = [i for i, c in enumerate(scores.candidates) if c["pattern"] == "a_shape"]
    assert (scores.recall[a_shape, 1:] < 0.8).all()


def test_chosen_configs_run_as_profiled(planted):
    """The runtime plans a profile's per-head config with per-head budgets; the recall and density must be
    those measured for each head's candidate alone."""
    q, k, scores = planted
    cost = candidate_cost_table(scores.candidates, scores.density, T, "time", 64, last_q=64)
    picks = select_heads(scores, 0.95, cost)
    recall, density = head_config_scores(q, k, [scores.candidates[i] for i in picks])
    assert torch.allclose(recall, scores.recall[picks, range(4)], atol=1e-9)
    assert torch.allclose(density, scores.density[picks, range(4)], atol=1e-9)


def test_tail_recall_keeps_a_retrieval_head_off_a_shape():
    """Local everywhere except the last block, which reads one key 1500 tokens back (a pass-key question):
    the mean recall of A-shape is high, its recall on the last block is not."""
    q, k = _local_head()
    k[500, 2] = 1.0
    q[-64:, 2] = 100.0 / SCALE  # beats the -beta * 1500 = -75 distance penalty
    q, k = q[None, None], k[None, None]
    scores = score_candidates(q, k, default_candidates(T))
    cost = candidate_cost_table(scores.candidates, scores.density, T, "time", 64, last_q=64)
    mean_only = LayerScores(scores.candidates, scores.recall, scores.density)
    assert scores.candidates[select_heads(mean_only, 0.95, cost)[0]]["pattern"] == "a_shape"
    chosen = select_heads(scores, 0.95, cost)[0]
    assert scores.candidates[chosen]["pattern"] not in ("a_shape", "dense")  # a pattern that reads the far key
    assert scores.tail_recall[chosen, 0] >= 0.95
    # A-shape loses the far key's mass; a tail target below what it keeps lets it back in.
    a_shape = [i for i, c in enumerate(scores.candidates) if c["pattern"] == "a_shape"]
    kept = scores.tail_recall[a_shape, 0].max().item()
    assert kept < 0.5
    assert scores.candidates[select_heads(scores, 0.95, cost, tail_target=kept * 0.99)[0]]["pattern"] == "a_shape"


def test_select_heads_falls_back_to_the_best_recall():
    cands = [{"pattern": "a_shape", "sink": 0, "window": 64}, {"pattern": "block_sparse", "top_k": 2}]
    scores = LayerScores(cands, torch.tensor([[0.5, 0.97], [0.9, 0.99]], dtype=torch.float64),
                         torch.tensor([[0.1, 0.1], [0.2, 0.05]], dtype=torch.float64))
    cost = candidate_cost_table(cands, scores.density, 4096, "flops", 64, last_q=64)
    # head 0: nothing reaches 0.95 -> highest recall (1); head 1: both do -> the cheaper (1, density 0.05).
    assert select_heads(scores, 0.95, cost) == [1, 1]
    assert select_heads(scores, 0.5, cost) == [0, 1]


def test_candidate_cost_weighs_speed_and_estimation():
    assert candidate_cost("dense", 1.0, 8192) == 1.0
    assert candidate_cost("vertical_slash", 0.1, 8192, cost="flops") == pytest.approx(0.1 + 64 / 8192)
    assert candidate_cost("vertical_slash", 0.1, 8192) > candidate_cost("block_sparse", 0.1, 8192)
    assert candidate_cost("a_shape", 0.1, 8192) < candidate_cost("block_sparse", 0.1, 8192)
    with pytest.raises(ValueError, match="cost"):
        candidate_cost("dense", 1.0, 8192, cost="watts")


def test_hull_and_budget_greedy():
    assert _hull([0.1, 0.2, 0.3, 1.0], [0.5, 0.6, 0.95, 1.0]) == [0, 2, 3]  # 0.2 lies under 0.1 -> 0.3
    cands = [{"pattern": "a_shape", "sink": 0, "window": 64}, {"pattern": "block_sparse", "top_k": 4},
             {"pattern": "dense"}]
    recall = torch.tensor([[0.5, 0.9], [0.9, 0.92], [1.0, 1.0]], dtype=torch.float64)
    density = torch.tensor([[0.1, 0.1], [0.3, 0.3], [1.0, 1.0]], dtype=torch.float64)
    layer = LayerScores(cands, recall, density)
    cost = [candidate_cost_table(cands, density, 8192, "flops", 64, last_q=64)]
    assert select_budget([layer], cost, 0.101) == [[0, 0]]
    # 0.2 more buys head 0's step to block_sparse (+0.4 recall), not head 1's (+0.02).
    assert select_budget([layer], cost, 0.21) == [[1, 0]]
    assert select_budget([layer], cost, 1.0) == [[2, 2]]
    with pytest.raises(ValueError, match="budget"):
        select_budget([layer], cost, 0.05)


def test_budget_greedy_within_a_floor():
    """With a floor the greedy only picks candidates that meet it (recall and tail), never one whose lower
    recall is higher but whose tail is below the tail target."""
    cands = [{"pattern": "a_shape", "sink": 0, "window": 64}, {"pattern": "block_sparse", "top_k": 4},
             {"pattern": "vertical_slash", "vertical_size": 64, "slash_size": 64}, {"pattern": "dense"}]
    recall = torch.tensor([[0.5, 0.95], [0.96, 0.99], [0.9, 0.96], [1.0, 1.0]], dtype=torch.float64)
    tail = torch.tensor([[1.0, 0.99], [1.0, 0.97], [1.0, 0.985], [1.0, 1.0]], dtype=torch.float64)
    density = torch.tensor([[0.1, 0.1], [0.3, 0.3], [0.5, 0.5], [1.0, 1.0]], dtype=torch.float64)
    layer = LayerScores(cands, recall, density, tail)
    cost = [candidate_cost_table(cands, density, 8192, "flops", 64, last_q=64)]
    allowed = [floor_mask(layer, 0.95, 0.98)]
    assert allowed[0].T.tolist() == [[False, True, False, True], [True, False, True, True]]
    assert select_budget([layer], cost, 0.76) == [[3, 1]]  # head 1 takes block_sparse: tail 0.97
    assert select_budget([layer], cost, 0.76, allowed) == [[3, 0]]
    assert select_budget([layer], cost, 0.201, allowed) == [[1, 0]]  # = select_heads at the floor
    assert select_heads(layer, 0.95, cost[0], tail_target=0.98) == [1, 0]
    with pytest.raises(ValueError, match="cheapest allowed"):
        select_budget([layer], cost, 0.15, allowed)
    # No candidate meets the floor: only the one with the best lower recall is allowed.
    first3 = LayerScores(cands[:3], recall[:3], density[:3], tail[:3])
    assert floor_mask(first3, 0.99, 0.98).T.tolist() == [[False, True, False], [False, True, False]]


# --- the CLI ---------------------------------------------------------------------------------------------


class _CharTokenizer:
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return type("Enc", (), {"input_ids": [2 + ord(c) % 120 for c in text]})()


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=128,
                                      max_position_embeddings=1024)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("argv,message", [
    (["profile", "--target", "1.5"], "expected a number in (0, 1]"),
    (["profile", "--length", "0"], "expected a positive int"),
    (["profile", "--target", "0.9", "--budget", "0.3"], "not allowed with argument"),
    (["profile", "--cost", "watts"], "invalid choice"),
    (["profile", "--floor", "2"], "expected a number in (0, 1]"),
    (["profile", "--budget", "0.3", "--layer-target", "0.9"], "not allowed with argument"),
    (["profile", "--layer-target", "0"], "expected a number in (0, 1]"),
    (["compare"], "--profile"),
    (["import-minference", "x.json"], "--out"),
    ([], "command"),
])
def test_cli_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_profile_writes_a_profile_that_fits_the_model(tmp_path, monkeypatch, capsys):
    model = _tiny_llama()
    monkeypatch.setattr(cli, "_load", lambda args: (model, _CharTokenizer()))
    out, png = tmp_path / "tiny.json", tmp_path / "tiny.png"
    with pytest.raises(SystemExit, match="--budget"):
        cli.main(["profile", "--budget", "3", "--out", str(out)])
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    assert cli.main(["profile", "--length", "384", "--name", "org/tiny-llama", "--text", str(text), "--out", str(out),
                     "--plot", str(png), "--no-progress"]) == 0
    profile = load_profile(out)
    profile.check_model(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    assert profile.model["name"] == "org/tiny-llama" and profile.settings["seqlen"] == 384
    assert profile.settings["tail_recall_target"] == 0.98
    assert all(0.0 <= h["recall"] <= 1.0 and h["recall"] >= 0.95 for layer in profile.layers for h in layer)
    assert png.stat().st_size > 1000
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--text"):
        cli.main(["profile", "--text", str(tmp_path / "missing.txt"), "--out", str(out)])


def test_profile_model_budget_mode_spends_at_most_the_budget():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (1, 320), generator=torch.Generator().manual_seed(0))
    profile, layers = profile_model(model, ids, budget=0.7, cost="flops", progress=False)
    assert profile.settings["budget"] == 0.7 and profile.settings["recall_target"] is None
    spent = [candidate_cost(h["pattern"], h["density"], 320, cost="flops") for layer in profile.layers for h in layer]
    assert sum(spent) / len(spent) <= 0.7 + 1e-3  # densities are rounded to 4 digits in the file
    with pytest.raises(ValueError, match="input_ids"):
        profile_model(model, ids[0], progress=False)
    with pytest.raises(ValueError, match="tail_target"):
        profile_model(model, ids, tail_target=1.5, progress=False)
    with pytest.raises(ValueError, match="floor: only with budget"):
        profile_model(model, ids, floor=0.9, progress=False)


def test_profile_model_budget_within_a_floor_keeps_every_head_at_the_floor():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (1, 320), generator=torch.Generator().manual_seed(1))
    floor, _ = profile_model(model, ids, target=0.9, tail_target=0.9, cost="flops", progress=False)
    floor_cost = [candidate_cost(h["pattern"], h["density"], 320, cost="flops") for layer in floor.layers for h in layer]
    budget = sum(floor_cost) / len(floor_cost) + 0.1
    profile, _ = profile_model(model, ids, budget=budget, floor=0.9, tail_target=0.9, cost="flops", progress=False)
    assert profile.settings["floor"] == 0.9 and profile.settings["tail_recall_target"] == 0.9
    heads = [h for layer in profile.layers for h in layer]
    assert all(h["recall"] >= 0.9 - 1e-4 and h["tail_recall"] >= 0.9 - 1e-4 for h in heads)
    spent = [candidate_cost(h["pattern"], h["density"], 320, cost="flops") for h in heads]
    assert sum(spent) / len(spent) <= budget + 1e-3
    assert sum(spent) >= sum(floor_cost) - 1e-3  # from the floor, never below it
    with pytest.raises(ValueError, match="cheapest allowed"):
        profile_model(model, ids, budget=min(floor_cost) / 2, floor=0.9, tail_target=0.9, cost="flops",
                      progress=False)


def test_compare_uniform_against_the_mixture_default_patterns_sweep():
    """compare_uniform scores a profile and, by default, the sweep of the pattern the mixture uses without a
    profile, on the model's own q/k (captured through the attention hook), as the runtime plans them."""
    model = _tiny_llama()
    ids = torch.randint(0, 128, (1, 320), generator=torch.Generator().manual_seed(2))
    heads = [{"pattern": "a_shape", "sink": 64, "window": 64}, {"pattern": "block_sparse", "top_k": 2},
             {"pattern": "vertical_slash", "vertical_size": 64, "slash_size": 64}, {"pattern": "dense"}]
    profile = load_profile({"format": "sparse_attn.profile/1", "settings": {}, "layers": [heads, heads[::-1]],
                            "model": {"name": "tiny", "architecture": "LlamaForCausalLM", "num_layers": 2,
                                      "num_heads": 4, "num_kv_heads": 2, "head_dim": 16}})
    out = compare_uniform(model, ids, profile, progress=False)
    name = mixture_default(320)["pattern"]
    sweep = get_pattern(name).sweep(320, 64)
    assert [{k: u[k] for k in u if k not in ("recall", "density")} for u in out["uniform"]] == [
        {"pattern": name, **b} for b in sweep]
    assert out["seqlen"] == 320 and 0 < out["profile"]["density"] < 1 and 0 < out["profile"]["recall"] <= 1
    assert all(0 < u["recall"] <= 1 + 1e-6 and 0 < u["density"] <= 1 + 1e-9 for u in out["uniform"])
    assert not is_patched(model) and model.config._attn_implementation == "sdpa"


def test_cli_import_minference(tmp_path, capsys):
    config = [{"0": ["vertical_and_slash", 1000, 6096, 0.9], "1": ["stream_llm", 100, 800, 0.8]},
              {"0": ["block_sparse", 0, 0, 0.7], "1": ["vertical_and_slash", 30, 800, 0.95]}]
    src = tmp_path / "mi.json"
    src.write_text(json.dumps(config))
    out = tmp_path / "imported.json"
    with pytest.raises(SystemExit, match="--name"):
        cli.main(["import-minference", str(src), "--out", str(out)])
    assert cli.main(["import-minference", str(src), "--out", str(out), "--name", "org/m", "--num-kv-heads", "1",
                     "--head-dim", "64"]) == 0
    profile = load_profile(out)
    assert [h["pattern"] for h in profile.layer(0)] == ["vertical_slash", "a_shape"]
    assert profile.layer(0)[1]["window"] == 800
    assert profile.model["num_layers"] == 2 and profile.model["num_heads"] == 2


def test_python_dash_m_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "sparse_attn.cli", "profile", "--target", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--target" in r.stderr


@pytest.mark.parametrize("seqlen, count", [(1000, 5), (777, 3), (640, 4)])
def test_sampled_query_blocks_score_those_rows_exactly(seqlen, count):
    """Recall scored on a sample of query blocks equals attention_recall on those blocks' rows, for block,
    range and generic layouts; density stays every row's (the layout's own); the last block is in it."""
    g = torch.Generator().manual_seed(seqlen + count)
    q = randn(g, 1, 6, seqlen, 32, scale=2, device="cpu")
    k = randn(g, 1, 2, seqlen, 32, scale=2, device="cpu")
    blocks = sample_query_blocks(seqlen, 64, count)
    nq = -(-seqlen // 64)
    assert blocks[0] == 0 and blocks[-1] == nq - 1 and len(blocks) == count
    assert sample_query_blocks(seqlen, 64, nq) is None
    full = block_mass(q, k)
    mass = block_mass(q, k, query_blocks=blocks, chunk_elements=6 * seqlen * 64)  # one block a chunk
    assert torch.allclose(mass, full[:, blocks], atol=1e-6)
    vi, si = estimate_vertical_slash(q, k, vertical_size=[3, 5, 70, 1, 2, 9], slash_size=[2, 4, 1, 66, 3, 7])
    layouts = [
        a_shape_layout(1, 6, seqlen, seqlen, sink=[0, 64, 1, 128, 64, 0], window=[1, 64, 100, 7, 300, 64]),
        block_topk_layout(estimate_block_topk(q, k, top_k=[2, 3, 1, 4, 2, 5]), seqlen, seqlen),
        build_vertical_slash_index(vi, si, seqlen, seqlen, block_size_q=64),
    ]
    sums, all_sums = KeySums.of(mass, 64, blocks), KeySums.of(full, 64)
    rows = [(b * 64, min(seqlen, b * 64 + 64)) for b in blocks.tolist()]
    for layout in layouts:
        assert torch.allclose(layout.kept(sums), layout.kept(all_sums)[:, blocks], atol=1e-9)
        assert torch.allclose(Layout.kept(layout, sums), layout.kept(all_sums)[:, blocks], atol=1e-9)
        want = attention_recall(q, k, layout, rows=rows)[0]
        assert torch.allclose(mass_recall(layout, mass, query_blocks=blocks), want, atol=1e-6)
    cands = [{"pattern": "a_shape", "sink": 64, "window": 128}, {"pattern": "block_sparse", "top_k": 2},
             {"pattern": "vertical_slash", "vertical_size": 64, "slash_size": 64}]
    scores = score_candidates(q, k, cands, query_blocks=blocks)
    layout = a_shape_layout(1, 6, seqlen, seqlen, sink=64, window=128)
    assert torch.allclose(scores.recall[0], attention_recall(q, k, layout, rows=rows)[0], atol=1e-6)
    assert torch.allclose(scores.density[0], layout.head_density()[0])
    assert torch.allclose(scores.tail_recall[0], attention_recall(q, k, layout, rows=[rows[-1]])[0], atol=1e-6)
    with pytest.raises(ValueError, match="last query block"):
        score_candidates(q, k, cands, query_blocks=blocks[:-1])
    with pytest.raises(ValueError, match="query_blocks"):
        KeySums.of(mass, 64, blocks.flip(0))
    with pytest.raises(ValueError, match="query_blocks"):
        sample_query_blocks(seqlen, 64, 1)


def test_layer_target_greedy_buys_the_cheapest_recall_until_the_mean_reaches_it():
    """Three heads: one cheap to keep whole, one diffuse (recall ~ density), one in between. The greedy keeps
    the mean at the target, paying where a unit of cost buys the most recall, and stops there."""
    cands = [{"pattern": "a_shape", "sink": 0, "window": 64}, {"pattern": "block_sparse", "top_k": 4},
             {"pattern": "block_sparse", "top_k": 16}, {"pattern": "dense"}]
    recall = torch.tensor([[0.90, 0.05, 0.70], [0.99, 0.30, 0.90], [1.0, 0.60, 0.97], [1.0, 1.0, 1.0]],
                          dtype=torch.float64)
    density = torch.tensor([[0.02, 0.02, 0.02], [0.05, 0.3, 0.05], [0.2, 0.6, 0.2], [1.0, 1.0, 1.0]],
                           dtype=torch.float64)
    layer = LayerScores(cands, recall, density)
    cost = candidate_cost_table(cands, density, 8192, "flops", 64, last_q=64)
    assert select_layer_target(layer, cost, 0.5) == [0, 0, 0]  # 0.55 already
    # Heads 0 and 2's first steps (+0.09 / +0.2 at 0.03 each) are not enough; head 1's hull runs straight to
    # dense, and that overshoot is then traded down to the cheapest candidates that keep the mean.
    assert select_layer_target(layer, cost, 0.72) == [1, 1, 1]
    for target in (0.75, 0.8, 0.85, 0.9, 0.95, 1.0):
        picks = select_layer_target(layer, cost, target)
        assert sum(recall[i, h].item() for h, i in enumerate(picks)) / 3 >= target - 1e-12
    assert select_layer_target(layer, cost, 1.0) == [2, 3, 3]
    allowed = torch.tensor([[False] * 3, [True] * 3, [True] * 3, [True] * 3])
    assert select_layer_target(layer, cost, 0.5, allowed) == [1, 1, 1]


def test_profile_model_layer_target_keeps_each_layers_mean_recall():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (1, 700), generator=torch.Generator().manual_seed(2))
    profile, _ = profile_model(model, ids, layer_target=0.9, cost="flops", query_blocks=4, progress=False)
    assert profile.settings["layer_recall_target"] == 0.9 and profile.settings["recall_target"] is None
    assert profile.settings["query_blocks_scored"] == 4
    for layer in profile.layers:
        worst = [min(h["recall"], h["tail_recall"]) for h in layer]
        assert sum(worst) / len(worst) >= 0.9 - 1e-3
    with pytest.raises(ValueError, match="budget, layer_target"):
        profile_model(model, ids, budget=0.5, layer_target=0.9, progress=False)
    with pytest.raises(ValueError, match="layer_target"):
        profile_model(model, ids, layer_target=0.0, progress=False)
