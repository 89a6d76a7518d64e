"""The planner's pipeline schedules (1F1B, interleaved, ZB-H1) against the schedule simulator,
the search's limits, and a layout the user names (``--layout``)."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from hybridpar_ext.parallel.schedules import build_schedule, simulate
from hybridpar_ext.plan import (DEFAULT_CALIBRATION, PRECISIONS, PRESETS, ClusterSpec, Layout, ModelSpec,
                                PlanError, check_layout, costs, format_plan, layouts, parse_layout, plan,
                                predict)

LLAMA70 = PRESETS["llama2-70b"]
H100_64 = ClusterSpec.of("h100", 64)
BF16 = PRECISIONS["bf16-mixed"]
# Odd on purpose: 6 layers (pp 2, 3, 6), 5 heads over 1 kv head, 3 GPUs in a node.
ODD = ModelSpec(layers=6, hidden=320, heads=5, kv_heads=1, ffn=904, vocab=1003, seq=96, name="odd")


def _step(layout, model=LLAMA70, cluster=H100_64):
    return costs.step_time(model, layout, cluster, BF16, DEFAULT_CALIBRATION)


# ------------------------------------------------------------- bubble against the simulator

@pytest.mark.parametrize("kind,p,v,m,recompute", [
    ("zero-bubble", 2, 1, 2, "none"), ("zero-bubble", 4, 1, 8, "full"), ("zero-bubble", 8, 1, 24, "selective"),
    ("1f1b", 4, 1, 4, "none"), ("1f1b", 8, 1, 16, "full"),
    ("interleaved", 4, 2, 8, "none"), ("interleaved", 2, 4, 6, "selective"),
])
def test_bubble_is_the_simulators(kind, p, v, m, recompute):
    """The planner's idle seconds equal the simulator's for the planner's own F, B and W costs of
    a microbatch (a chunk costs 1/v of them): the makespan less the busy time of a rank."""
    layout = Layout(dp=64 // (8 * p), tp=8, pp=p, microbatch=1, microbatches=m, recompute=recompute,
                    virtual_stages=v, schedule=kind)
    t = _step(layout)
    f, b, w = t.microbatch_fbw
    assert 0 < w <= min(f, b)   # where ZB-H1's (p-1)(f+b-w) holds
    assert (f + b + w) * m == pytest.approx(t.compute + t.tp_comm + t.pp_comm, rel=1e-12)
    sim = simulate(build_schedule(kind, p, v, m), p, v, m, f / v, b / v, w / v)
    assert sim.busy[0] == pytest.approx(m * (f + b + w), rel=1e-12)
    assert t.bubble == pytest.approx(sim.makespan - sim.busy[0], rel=1e-9)


def test_zero_bubble_keeps_1f1bs_memory_and_idles_less():
    for p, m in ((2, 4), (4, 8), (8, 8)):
        one_f = Layout(1, 8, p, 1, m, schedule="1f1b")
        zb = Layout(1, 8, p, 1, m, schedule="zero-bubble")
        cluster = ClusterSpec.of("h100", 8 * p)
        a, b = predict(LLAMA70, cluster, one_f, m), predict(LLAMA70, cluster, zb, m)
        assert a.memory == b.memory
        assert b.time.bubble < a.time.bubble and b.time.compute == a.time.compute
        # The simulator agrees that ZB-H1 keeps no more microbatches alive than 1F1B.
        assert max(simulate(build_schedule("zero-bubble", p, 1, m), p, 1, m).peak_activations) <= \
            max(simulate(build_schedule("1f1b", p, 1, m), p, 1, m).peak_activations)


def test_no_pipeline_no_bubble_and_layout_rules():
    assert _step(Layout(8, 8, 1, 1, 2)).bubble == 0.0
    assert Layout(1, 1, 2, 1, 2, virtual_stages=2).schedule == "interleaved"
    assert Layout(1, 1, 2, 1, 2).schedule == "1f1b"
    with pytest.raises(ValueError, match="interleaved needs v >= 2"):
        Layout(1, 1, 2, 1, 2, virtual_stages=2, schedule="zero-bubble")
    with pytest.raises(ValueError, match="schedule must be one of"):
        Layout(1, 1, 2, 1, 2, schedule="zb-v")


# ------------------------------------------------------------------------------ the search

def test_search_offers_every_schedule_where_it_can_run():
    found = list(layouts(LLAMA70, H100_64, 128))
    assert {lay.schedule for lay in found} == {"1f1b", "interleaved", "zero-bubble"}
    for lay in found:
        assert (lay.schedule == "interleaved") == (lay.virtual_stages > 1)
        assert lay.pp > 1 or lay.schedule == "1f1b"
        check_layout(LLAMA70, H100_64, lay, 128)   # the search and the named-layout check agree
    found = set(found)
    for lay in found:   # both one-chunk schedules for every pipeline
        if lay.pp > 1 and lay.virtual_stages == 1:
            assert replace(lay, schedule="zero-bubble") in found and replace(lay, schedule="1f1b") in found


def test_search_picks_zero_bubble_over_1f1b_when_all_else_is_equal():
    result = plan(LLAMA70, H100_64, 128, top=50, virtual_stages=(1,))
    piped = [p for p in result.best if p.layout.pp > 1]
    assert piped and all(p.layout.schedule == "zero-bubble" for p in piped[:10])
    best = result.best[0].layout
    assert best.pp > 1 and best.schedule == "zero-bubble"
    slower = predict(LLAMA70, H100_64, replace(best, schedule="1f1b"), 128)
    assert slower.time.total > result.best[0].time.total and slower.memory == result.best[0].memory


def test_search_respects_its_limits():
    result = plan(LLAMA70, H100_64, 128, top=1000, allow_sp=False, recompute=("selective",),
                  schedules=("1f1b",), allow_zero1=False)
    assert result.best
    for p in result.best:
        lay = p.layout
        assert not lay.sequence_parallel and lay.recompute == "selective" and not lay.zero1
        assert lay.schedule == "1f1b" and lay.virtual_stages == 1
    assert result.constraints == "recompute selective, no sp, no zero1, schedules 1f1b"
    assert "searched only: recompute selective, no sp" in format_plan(result)
    with pytest.raises(PlanError, match="or fewer limits on the search \\(recompute none\\)"):
        plan(PRESETS["llama3-405b"], ClusterSpec.of("h100", 8), 8, recompute=("none",))
    with pytest.raises(ValueError, match="schedules must be among"):
        plan(LLAMA70, H100_64, 128, schedules=("zb-v",))
    with pytest.raises(ValueError, match="recompute must be among"):
        plan(LLAMA70, H100_64, 128, recompute=())


# -------------------------------------------------------------------------- a named layout

def test_every_printed_layout_parses_back_to_itself():
    for model, cluster, batch in ((LLAMA70, H100_64, 128), (ODD, ClusterSpec.of("h100", 6, 3), 12)):
        for lay in layouts(model, cluster, batch):
            assert parse_layout(lay.describe(), cluster.gpus, batch) == lay


def test_parse_layout_grammar():
    lay = parse_layout("dp2 tp4 pp4 v2 mb8 sp zero recompute=selective", 32, 128)
    assert lay == Layout(2, 4, 4, 8, 8, True, "selective", True, 2, "interleaved")
    assert parse_layout("tp8, pp2, zb, m16, rc=full", 64, 64) == Layout(4, 8, 2, 1, 16, recompute="full",
                                                                          schedule="zero-bubble")
    assert parse_layout("tp2", 6, 6) == Layout(3, 2, 1, 1, 2)   # dp what the GPUs leave, mb1


@pytest.mark.parametrize("text,message", [
    ("dp2 tp4 pp4 vx2", "unknown token 'vx2'"),
    ("dp2 tp4 pp4 sp2", "unknown token 'sp2'"),
    ("tp4 recompute=some", "'recompute=some': recompute must be one of none, selective, full"),
    ("tp4 tp2", "'tp2' says again"),
    ("tp4 mb=2x4 mb2", "'mb2' says again"),
    ("tp4 zb 1f1b", "'1f1b' says again"),
    ("dp0 tp4", "'dp0' must be at least 1"),
    ("tp3", "tp3 x pp1 = 3 does not divide the 32 GPUs"),
    ("dp2 tp4", "dp2 x tp4 x pp1 = 8 GPUs, but there are 32"),
    ("tp4 mb3", "does not split into microbatches"),
    ("tp4 pp2 v2 zb", "interleaved needs v >= 2"),
    ("", "expected tokens like"),
])
def test_parse_layout_refuses_naming_the_token(text, message):
    with pytest.raises(ValueError, match="--layout") as info:
        parse_layout(text, 32, 128)
    assert message in str(info.value)


def test_named_layout_is_the_planners_own_evaluation():
    named = parse_layout("dp2 tp8 pp4 v2 mb1 sp recompute=selective", 64, 128)
    result = plan(LLAMA70, H100_64, 128, top=3, named=named)
    assert result.named.layout == named
    own = predict(LLAMA70, H100_64, named, 128)
    assert result.named.time == own.time and result.named.memory == own.memory and result.named.fits
    every = plan(LLAMA70, H100_64, 128, top=100000)
    assert every.best[result.named_rank - 1].time.total == own.time.total   # its place among all
    assert result.named.lost_on.startswith("+") and "yours, #" in format_plan(result)
    # The best named is the best.
    top = plan(LLAMA70, H100_64, 128, named=result.best[0].layout)
    assert top.named_rank == 1 and top.named.lost_on == "best"
    # Outside the limits and faster than what they allow: said so.
    limited = plan(LLAMA70, H100_64, 128, allow_sp=False, schedules=("1f1b",), named=result.best[0].layout)
    assert limited.named_rank == 1 and "faster than the search's best" in limited.named.lost_on


def test_named_layout_that_cannot_run_is_refused():
    with pytest.raises(PlanError, match="tp5 must divide the 64 heads"):
        plan(LLAMA70, ClusterSpec.of("h100", 10, 10), 10, named=Layout(2, 5, 1, 1, 5))
    with pytest.raises(PlanError, match="3 microbatches cannot fill pp4"):
        plan(ODD, ClusterSpec.of("h100", 4, 4), 3, named=Layout(1, 1, 4, 1, 3))
    with pytest.raises(PlanError, match="schedule zero-bubble needs a pipeline"):
        plan(ODD, ClusterSpec.of("h100", 4, 4), 4, named=Layout(4, 1, 1, 1, 1, schedule="zero-bubble"))
    # A pipeline depth that does not divide the layers is fine for a named layout (4 of 6).
    result = plan(ODD, ClusterSpec.of("h100", 4, 4), 8, named=Layout(1, 1, 4, 1, 8, schedule="zero-bubble"))
    assert result.named.fits and result.named.time.bubble > 0


def test_cli_layout_and_limits(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "hybridpar_ext", "plan", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120, cwd=tmp_path)
    base = ("--preset", "llama2-7b", "--gpus", "16", "--global-batch", "64")
    out = run(*base, "--layout", "dp2 tp4 pp2 zb mb2 sp", "--no-sp", "--recompute", "none", "selective",
              "--schedule", "1f1b", "zero-bubble")
    assert out.returncode == 0, out.stderr
    assert "| yours, #" in out.stdout and "dp2 tp4 pp2 mb=2x16 zb sp | zero-bubble |" in out.stdout
    assert "searched only: recompute none/selective, no sp, schedules 1f1b/zero-bubble" in out.stdout
    out = run(*base, "--layout", "dp2 tp4 pp2 zb", "--json", "--no-sp")
    data = json.loads(out.stdout)
    assert data["named"]["schedule"] == "zero-bubble" and not any(b["sequence_parallel"] for b in data["best"])
    out = run(*base, "--layout", "dp2 tp4 pp2 bogus")
    assert out.returncode == 2 and "unknown token 'bogus'" in out.stderr
    out = run(*base, "--schedule", "zb")
    assert out.returncode == 2 and "invalid choice: 'zb'" in out.stderr


# ----------------------------------------------------------------------- the trainer's --plan

@pytest.mark.parametrize("layers,schedule", [(70, "zero-bubble"), (80, "interleaved")])
def test_train_plan_takes_the_planners_schedule(layers, schedule, monkeypatch):
    """``train --plan`` runs the schedule the planner chose, under the trainer's name for it
    (a Llama-2-70B-like shape on 64 of the planner's H100s; only the layers differ)."""
    import torch

    from hybridpar_ext.train import parse_args
    from hybridpar_ext.train.layout import choose_layout, model_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # plan for H100s wherever this runs
    args = parse_args(["--plan", "--layers", str(layers), "--hidden", "8192", "--heads", "64", "--kv-heads", "8",
                       "--ffn", "28672", "--mlp", "swiglu", "--norm", "rmsnorm", "--vocab", "32000",
                       "--seq", "4096", "--global-batch", "128", "--nnodes", "8"])
    config = model_config(args)
    choose_layout(args, config, 64)
    model = ModelSpec.from_gpt_config(config, seq=4096)
    best = plan(model, ClusterSpec.of("h100", 64), 128, top=1).best[0].layout
    assert args.schedule == best.schedule == schedule
    assert (args.dp, args.tp, args.pp, args.virtual_stages) == (best.dp, best.tp, best.pp, best.virtual_stages)
