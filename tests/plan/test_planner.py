"""The planner: each formula on hand-computed cases, its memory model against what the
CPU GPT actually allocates, its search, its errors, and its predictions for published
runs (the errors the README states)."""

import json
import subprocess
import sys
import time

import pytest
import torch

from hybridpar_ext.models import GPT, GPTConfig
from hybridpar_ext.plan import (DEFAULT_CALIBRATION, PRECISIONS, PRESETS, ClusterSpec, Layout,
                                ModelSpec, PlanError, costs, format_plan, layouts, plan, predict)
from hybridpar_ext.plan.published import RUNS, compare
from hybridpar_ext.testing import run_ranks

GPT3 = PRESETS["gpt3-175b"]


# ---------------------------------------------------------------------------- formulas

def test_step_flops_is_the_megatron_formula():
    b, s, l, h, v = 1536, GPT3.seq, GPT3.layers, GPT3.hidden, GPT3.vocab
    megatron = 96 * b * s * l * h**2 * (1 + s / (6 * h) + v / (16 * l * h))
    model, hardware = costs.step_flops(GPT3, b, "full")
    assert hardware == pytest.approx(megatron, rel=1e-12)
    # Without recomputation: one forward pass of the layers less.
    assert model == pytest.approx(72 * b * s * l * h**2 * (1 + s / (6 * h)) + 6 * b * s * h * v, rel=1e-12)
    assert costs.step_flops(GPT3, b, "none")[1] == model


def test_parameter_count_by_hand_and_against_the_model():
    h = GPT3.hidden
    hand = GPT3.layers * (12 * h * h + 4 * h) + GPT3.vocab * h + 2 * h
    assert costs.total_params(GPT3) == hand
    for kw in [dict(), dict(norm="rmsnorm", mlp="swiglu", kv_heads=2, tied_embeddings=False, ffn=136)]:
        config = GPTConfig(**kw)
        spec = ModelSpec.from_gpt_config(config)
        actual = sum(p.numel() for p in GPT(config).parameters())
        assert costs.total_params(spec) == actual == config.num_parameters()
        assert costs.stage_params(spec, Layout(1, 1, 1, 1, 1), 0) == actual


def test_tensor_parallel_shards_of_the_parameters():
    # tp 8 splits every matrix 8 ways (kv heads 96 >= 8); norms stay whole; pp 8 gives each
    # stage 12 layers, the first the embedding, the last the tied head's second copy.
    layout = Layout(dp=1, tp=8, pp=8, microbatch=1, microbatches=8)
    h, v = GPT3.hidden, GPT3.vocab
    layer = 12 * h * h / 8 + 4 * h
    assert costs.stage_params(GPT3, layout, 0) == pytest.approx(12 * layer + v * h / 8)
    assert costs.stage_params(GPT3, layout, 7) == pytest.approx(12 * layer + v * h / 8 + 2 * h)
    # GQA with fewer kv heads than tp ranks: the kv projection is replicated, not split 8 ways.
    llama = PRESETS["llama2-70b"]  # 8 kv heads
    wide = Layout(1, 8, 1, 1, 1)
    assert costs.stage_params(llama, wide, 0) == pytest.approx(
        llama.layers * (2 * llama.hidden**2 / 8 + 2 * llama.hidden * llama.kv_dim / 8
                        + 3 * llama.hidden * llama.ffn / 8 + 2 * llama.hidden)
        + llama.vocab * llama.hidden / 8 + llama.hidden + llama.vocab * llama.hidden / 8)


def test_activation_memory_is_korthikanti():
    """Per layer, 16-bit activations, ffn = 4h, MHA, dropout: sbh(34) without TP, sbh(10 + 24/t)
    with TP, 34sbh/t with TP + SP, 2sbh (/t with SP) under full recomputation — plus our fp32
    log-sum-exp per row and head, in place of the paper's 5as^2b attention matrices."""
    s, b, h, a = GPT3.seq, 2, GPT3.hidden, GPT3.heads
    sbh, lse = s * b * h, 4 * s * b * a
    f = lambda t, sp, rc: costs.layer_activation_bytes(GPT3, b, t, sp, rc, 2)  # noqa: E731
    assert f(1, False, "none") == pytest.approx(34 * sbh + lse)
    assert f(8, False, "none") == pytest.approx(sbh * (10 + 24 / 8) + lse / 8)
    assert f(8, True, "none") == pytest.approx(34 * sbh / 8 + lse / 8)
    assert f(8, False, "full") == 2 * sbh
    assert f(8, True, "full") == 2 * sbh / 8


def test_ring_collective_time():
    calib = DEFAULT_CALIBRATION
    gb = 1e9 * 1.0 * calib.link_efficiency
    # 8 ranks: an all-reduce moves 2 * 7/8 of the data through each link in 14 hops.
    assert costs.ring_time(8e9, 8, 1.0, calib) == pytest.approx(2 * 7 / 8 * 8e9 / gb + 14 * calib.hop_latency_s)
    assert costs.ring_time(8e9, 8, 1.0, calib, all_reduce=False) == pytest.approx(7 / 8 * 8e9 / gb + 7 * calib.hop_latency_s)
    assert costs.ring_time(8e9, 1, 1.0, calib) == 0.0


def test_pipeline_bubble_is_p_minus_1_over_m():
    cluster = ClusterSpec.of("a100-80gb", 64)
    for v in (1, 2):
        layout = Layout(dp=2, tp=8, pp=4, microbatch=1, microbatches=8, recompute="full", virtual_stages=v)
        t = costs.step_time(GPT3, layout, cluster, PRECISIONS["bf16-mixed"], DEFAULT_CALIBRATION)
        busy = t.compute + t.tp_comm + t.pp_comm
        # The idle share of the pipeline is (p-1)/(v*m + p-1), as in the Megatron-LM paper.
        assert t.bubble / (busy + t.bubble) == pytest.approx(3 / (v * 8 + 3))


# ------------------------------------------------------- memory against the real model

def _saved_activation_bytes(model, tokens):
    """Bytes of the tensors autograd keeps for backward (each storage once, weights excluded)."""
    storages = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens[:, :-1], tokens[:, 1:])
    return loss, sum(n for ptr, n in storages.items() if ptr not in weights)


@pytest.mark.parametrize("kw", [dict(), dict(norm="rmsnorm", mlp="swiglu", kv_heads=2, tied_embeddings=False),
                                dict(layers=2, hidden=96, heads=6, vocab_size=512, max_seq_len=64)])
def test_memory_model_matches_the_cpu_gpt(kw):
    """fp32 GPT + AdamW on the CPU: weights, gradients and optimizer state exactly; the
    activations kept for backward within 25% (the model is below the real count because our
    fused qkv and gate/up outputs are kept whole where the formula keeps their parts)."""
    torch.manual_seed(0)
    config = GPTConfig(**kw)
    model = GPT(config)
    batch = 3
    tokens = torch.randint(0, config.vocab_size, (batch, config.max_seq_len + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, activations = _saved_activation_bytes(model, tokens)
    loss.backward()
    opt.step()

    predicted = costs.memory_per_gpu(ModelSpec.from_gpt_config(config), Layout(1, 1, 1, batch, 1),
                                     PRECISIONS["fp32"])
    params = list(model.parameters())
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert predicted.params == nbytes(params)
    assert predicted.grads == nbytes(p.grad for p in params)
    moments = [opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]
    assert predicted.optimizer == nbytes(moments)  # (plus one 4-byte step counter per tensor)
    assert 0.75 * activations <= predicted.activations <= activations, (predicted.activations, activations)


def parallel_state_bytes(rank, world, flags):
    """Bytes of weights, gradients and Adam moments on this rank of the parallel trainer after
    one step, and the planner's prediction for its pipeline stage."""
    from hybridpar_ext.plan import costs as plan_costs
    from hybridpar_ext.train import Trainer, check_args, parse_args

    args = parse_args(flags)
    config = check_args(args, world)
    args.dtype = "float32"
    trainer = Trainer(args, config, torch.device("cpu"))
    trainer.step(1)
    params = list(trainer.stage.parameters())
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    opt = trainer.optimizer.optimizer if args.zero else trainer.optimizer
    moments = [t for state in opt.state.values() for k, t in state.items() if k in ("exp_avg", "exp_avg_sq")]
    layout = Layout(args.dp, args.tp, args.pp, args.global_batch // args.dp // args.microbatches,
                    args.microbatches, args.sp, zero1=args.zero)
    predicted = plan_costs.stage_params(ModelSpec.from_gpt_config(config, args.seq), layout, trainer.mesh.pp_rank)
    padding = sum(r.buffers[b].numel() - sum(r.params[i].numel() for i in idx)
                  for r in trainer.sync.reducers for b, idx in enumerate(r.bucket_indices))
    return {"params": nbytes(params), "grads": nbytes(p.grad for p in params), "moments": nbytes(moments),
            "predicted_params": predicted, "padding": padding}


@pytest.mark.parametrize("flags", [
    ["--dp", "2", "--tp", "2", "--kv-heads", "1", "--zero"],          # kv heads replicated over TP
    ["--tp", "2", "--pp", "2", "--untied"],                             # embedding and head on two stages
    ["--dp", "2", "--pp", "2", "--mlp", "swiglu", "--norm", "rmsnorm"],  # the tied head's second copy
], ids=["dp2-tp2-zero1", "tp2-pp2-untied", "dp2-pp2-tied"])
def test_memory_model_matches_the_parallel_trainer(flags):
    """Per rank of the DP x TP x PP trainer: the planner's parameters of its stage exactly
    (weights and gradients, fp32); Adam's moments exactly twice that, or under ZeRO-1 the
    rank's 1/dp of it plus the reducer's padding of each bucket to a multiple of dp. (The
    planner models every stage with the layers of the fullest, so the splits here are even.)"""
    base = ["--layers", "4", "--hidden", "64", "--heads", "4", "--ffn", "96", "--seq", "16",
            "--global-batch", "4", "--microbatches", "2", "--steps", "1", "--data", "synthetic", "--vocab", "96"]
    world = 1
    for name in ("--dp", "--tp", "--pp"):
        world *= int(flags[flags.index(name) + 1]) if name in flags else 1
    results = run_ranks(parallel_state_bytes, world, timeout=120, flags=base + flags)
    zero = "--zero" in flags
    dp = int(flags[flags.index("--dp") + 1]) if "--dp" in flags else 1
    stages = set()
    for r in results:
        stages.add(r["predicted_params"])
        assert r["params"] == r["grads"] == 4 * r["predicted_params"], r
        expected_moments = 8 * ((r["predicted_params"] + r["padding"]) / dp if zero else r["predicted_params"])
        assert r["moments"] == expected_moments, r
    if "--pp" in flags:
        assert len(stages) == 2   # the two stages differ and each was checked against its own


# --------------------------------------------------------------------------- the search

def test_every_layout_is_valid():
    model, cluster = PRESETS["llama2-70b"], ClusterSpec.of("h100", 64)
    found = list(layouts(model, cluster, 128))
    assert found
    for lay in found:
        assert lay.dp * lay.tp * lay.pp == 64
        assert lay.tp <= 8 and model.heads % lay.tp == 0
        assert model.layers % lay.pp == 0
        assert lay.dp * lay.microbatch * lay.microbatches == 128
        assert lay.pp == 1 or lay.microbatches >= lay.pp
        assert not (lay.sequence_parallel and lay.tp == 1) and not (lay.zero1 and lay.dp == 1)
    assert {lay.recompute for lay in found} == {"none", "selective", "full"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_plan_quickly(name):
    model = PRESETS[name]
    gpus = 1024 if model.layers > 100 or model.hidden > 8192 else 256
    start = time.perf_counter()
    # 126 layers (Llama 3 405B) only split evenly into 1, 2, 3, 6, 7, ... stages.
    result = plan(model, ClusterSpec.of("h100", gpus), global_batch=1024,
                  uneven_stages=model.layers == 126)
    assert time.perf_counter() - start < 5
    best = result.best[0]
    assert best.fits and best.memory.total <= (80 - 3) * 0.92 * 2**30
    assert [p.time.total for p in result.best] == sorted(p.time.total for p in result.best)
    assert 0.05 < best.mfu < 0.76
    table = format_plan(result)
    assert "| 1 | " in table and "best" in table


def test_nothing_fits_says_what_is_short():
    with pytest.raises(PlanError) as info:
        plan(PRESETS["llama3-405b"], ClusterSpec.of("h100", 8), global_batch=8)
    message = str(info.value)
    assert "no layout fits" in message and "GiB per GPU" in message and "70.8 GiB usable" in message


def test_bad_input():
    with pytest.raises(ValueError, match="heads \\(64\\) must be a multiple of kv_heads \\(6\\)"):
        ModelSpec(80, 8192, 64, 6, 28672, 32000, 4096)
    with pytest.raises(ValueError, match="gpus must be a positive int"):
        ClusterSpec.of("h100", 0)
    with pytest.raises(ValueError, match="unknown GPU"):
        ClusterSpec.of("v100", 8)
    with pytest.raises(ValueError, match="global_batch must be a positive int"):
        plan(GPT3, ClusterSpec.of("a100-80gb", 8), global_batch=0)
    with pytest.raises(PlanError, match="no valid layout"):
        plan(GPT3, ClusterSpec.of("a100-80gb", 7, gpus_per_node=7), global_batch=5)


def test_cli_table_json_and_errors(tmp_path):
    # Outside the source tree, so that the installed package is the one that runs.
    run = lambda *a: subprocess.run([sys.executable, "-m", "hybridpar_ext", "plan", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120, cwd=tmp_path)
    out = run("--preset", "llama2-7b", "--gpus", "16", "--gpu", "a100-40gb", "--global-batch", "64")
    assert out.returncode == 0, out.stderr
    assert "| rank | layout |" in out.stdout and "A100-SXM4-40GB" in out.stdout
    out = run("--preset", "llama2-7b", "--gpus", "16", "--global-batch", "64", "--json", "--top", "2")
    data = json.loads(out.stdout)
    assert len(data["best"]) == 2 and data["best"][0]["fits"]
    out = run("--layers", "4", "--hidden", "64", "--heads", "4", "--kv-heads", "3", "--ffn", "256",
              "--vocab", "100", "--seq", "64", "--gpus", "2", "--global-batch", "4")
    assert out.returncode == 2 and "must be a multiple of kv_heads" in out.stderr
    out = run("--hidden", "64", "--gpus", "2", "--global-batch", "4")
    assert out.returncode == 2 and "--layers" in out.stderr


# --------------------------------------------------------------------- published runs

@pytest.mark.parametrize("run", RUNS, ids=lambda r: f"{r.model.name}-{r.gpus}")
def test_published_runs(run):
    """The errors stated in the README: Megatron-LM's runs within 10% of the reported
    throughput and the recommended layout the reported one or predicted within 7% of it;
    Llama 3 405B within 25% (its partial recomputation and stage balancing are not modelled)."""
    c = compare(run)
    megatron = run.source.startswith("Narayanan")
    assert abs(c["error"]) <= (0.10 if megatron else 0.25), c
    assert c["same_tp_pp"] or c["recommended_vs_reported_layout"] >= -0.07, c
    assert c["recommended_vs_reported_layout"] <= 1e-9, c  # never worse than the reported layout


def test_calibration_from_bench_results(tmp_path):
    """A comm benchmark measured on an H100 replaces the GEMM efficiency: the matmul row's
    achieved TFLOP/s becomes the efficiency at its width; other GPUs' results are ignored."""
    from hybridpar_ext.plan import from_bench_results

    rows = [{"op": "all_gather_matmul", "world": 1, "x": "(8192, 8192)", "weight": "(4096, 8192)",
             "chunks": 1, "collective_ms": 0.5, "matmul_ms": 1.0}]
    for gpu, name in (("NVIDIA H100 80GB HBM3", "comm-h100.json"), ("NVIDIA A100", "comm-a100.json")):
        (tmp_path / name).write_text(json.dumps({"environment": {"gpu": gpu}, "rows": rows}))
    calib = from_bench_results(str(tmp_path), "H100", peak_tflops=989.0)
    measured = 2 * 8192 * 8192 * 4096 / 1e-3 / 1e12 / 989.0
    assert calib.gemm_efficiency(8192) == pytest.approx(measured)
    assert "comm-h100.json" in calib.source
    assert from_bench_results(str(tmp_path), "H200", peak_tflops=989.0) == DEFAULT_CALIBRATION
