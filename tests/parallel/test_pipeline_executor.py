"""The pipeline executor on real gloo processes, p = 2 and 4: 1F1B, interleaved 1F1B, ZB-H1 and
orders chosen to be awkward (all forwards first; random orders that only respect the
dependencies, so a rank receives messages in another order than it uses them, with the
backward fused or split) all finish, and give the loss and gradients of the same chain of
layers run in one process. Stages are Linear layers whose weight gradients the split
schedules defer, in float64, so only the order of the sums differs. With data parallelism
beside ZB-H1, every gradient bucket starts during the schedule, as its W work ends (rank 0's
backwards fused, the other's split); a list that would hand the reducer a weight's last
gradient twice is refused."""

import random

import pytest
import torch

from hybridpar_ext.parallel.weight_grad import DeferrableLinear
from hybridpar_ext.testing import TOLERANCE, run_ranks

WIDTH, BATCH, SEQ = 5, 3, 2   # awkward on purpose; each microbatch is BATCH x SEQ x WIDTH


class LinearStage(torch.nn.Module):
    """Virtual stage `index` of `count`: tanh(Linear) on what the previous stage passed, as a
    one-tensor tuple (the executor's convention for what travels between stages)."""

    def __init__(self, index: int, count: int):
        super().__init__()
        torch.manual_seed(100 + index)   # the same weights whichever process builds the stage
        self.linear = DeferrableLinear(WIDTH, WIDTH, dtype=torch.float64)
        self.is_first, self.is_last = index == 0, index == count - 1

    def forward(self, inputs):
        x = inputs if self.is_first else inputs[0]
        y = torch.tanh(self.linear(x))
        return y if self.is_last else (y,)

    def loss(self, out, target):
        return ((out - target) ** 2).mean()

    def activation_shape(self, microbatch: int, seq: int):
        return (1, microbatch, seq, WIDTH)


def data(m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(BATCH, SEQ, WIDTH, generator=g, dtype=torch.float64) for _ in range(m)]
    targets = [torch.randn(BATCH, SEQ, WIDTH, generator=g, dtype=torch.float64) for _ in range(m)]
    return inputs, targets


def random_order(p: int, v: int, m: int, seed: int, split: bool = False):
    """Each rank's list, taken from one random global order in which every action comes after
    what it needs: valid, but with forwards and backwards of a chunk out of microbatch order
    (and with `split`, each backward as B and a W some time after it)."""
    from hybridpar_ext.parallel.schedules import Action, rank_and_chunk

    rng = random.Random(seed)
    last = p * v - 1
    backward = "B" if split else "BW"
    done, lists = set(), [[] for _ in range(p)]
    todo = {(op, s, i) for op in ("F", backward) + (("W",) if split else ()) for s in range(p * v) for i in range(m)}

    def ready(op, s, i):
        if op == "F":
            return s == 0 or ("F", s - 1, i) in done
        if op == "W":
            return ("B", s, i) in done
        return ("F", s, i) in done and (s == last or (backward, s + 1, i) in done)

    while todo:
        op, s, i = rng.choice(sorted(a for a in todo if ready(*a)))
        todo.remove((op, s, i))
        done.add((op, s, i))
        rank, chunk = rank_and_chunk(s, p)
        lists[rank].append(Action(op, chunk, i))
    return lists


def schedules(p: int):
    """(label, v, m, schedule) of every case a group of p ranks runs."""
    return [("1f1b", 1, p + 1, "1f1b"), ("1f1b m<p", 1, 1, "1f1b"),
            ("interleaved", 2, 2 * p, "interleaved"), ("zero-bubble", 1, p + 1, "zero-bubble"),
            ("gpipe", 2, p, [[a for a in lst if a.op == "F"] + [a for a in lst if a.op == "BW"]
                             for lst in random_order(p, 2, p, 0)]),
            ("random", 2, 3, random_order(p, 2, 3, p)),
            ("random split", 2, 3, random_order(p, 2, 3, p + 1, split=True))]


def run_schedules(rank, world, p=None):
    """Every schedule of p ranks (default: the world) on the group of ranks 0..p-1; the
    other ranks only take part in creating the group."""
    import torch.distributed as dist

    from hybridpar_ext.parallel import PipelineSchedule

    group = dist.new_group(list(range(p or world)))   # a subgroup, as the mesh's pp group is
    if rank >= (p or world):
        return None
    world = p or world
    out = {}
    for label, v, m, schedule in schedules(world):
        chunks = [LinearStage(k * world + rank, world * v) for k in range(v)]
        pipe = PipelineSchedule(chunks, group, m, schedule=schedule)
        inputs, targets = data(m)
        stats = pipe.step(inputs, targets)
        assert 0 < stats.busy_s <= stats.wall_s, (label, stats)
        out[label] = {"loss": stats.loss, "bubble": stats.bubble, "predicted": stats.predicted_bubble,
                      "grads": {k * world + rank: [p.grad.tolist() for p in c.parameters()]
                                for k, c in enumerate(chunks)}}
    return out


def reference(count: int, m: int):
    """The chain of `count` stages in one process, the whole batch at once."""
    stages = [LinearStage(i, count) for i in range(count)]
    inputs, targets = data(m)
    x = torch.cat(inputs)
    for s in stages:
        x = s(x if s.is_first else (x,))
        x = x if s.is_last else x[0]
    loss = stages[-1].loss(x, torch.cat(targets))
    loss.backward()
    return loss.item(), {i: [p.grad for p in s.parameters()] for i, s in enumerate(stages)}


def four_rank_checks(rank, world):
    """The 4-rank checks of this file in one launch (starting processes costs more than the
    checks): every schedule on groups of 2 and of 4 ranks, then zero bubble under DP."""
    import torch.distributed as dist

    out = {f"p{p}": run_schedules(rank, world, p) for p in (2, 4)}
    dist.barrier()
    out["zero_bubble_dp"] = zero_bubble_with_data_parallelism(rank, world)
    return out


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(four_rank_checks, 4, timeout=180)


@pytest.mark.parametrize("p", [2, 4])
def test_every_order_finishes_and_matches_one_process(four_ranks, p):
    results = [r[f"p{p}"] for r in four_ranks[:p]]
    assert all(r[f"p{p}"] is None for r in four_ranks[p:])
    tol = TOLERANCE[torch.float64]
    for label, v, m, _ in schedules(p):
        ref_loss, ref_grads = reference(p * v, m)
        # The last virtual stage, p v - 1, is on the last rank whatever v.
        assert results[-1][label]["loss"] == pytest.approx(ref_loss, rel=tol), label
        for r in results:
            for stage, grads in r[label]["grads"].items():
                for got, want in zip(grads, ref_grads[int(stage)]):
                    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=tol,
                                               atol=tol * want.abs().max().item(), msg=f"{label} stage {stage}")
            assert 0 <= r[label]["bubble"] < 1
        # The simulator's prediction for stages of equal cost, reported with the measurement.
        if label in ("1f1b", "interleaved"):
            for r in results:
                assert r[label]["predicted"] == pytest.approx((p - 1) / (v * m + p - 1)), label
        if label == "zero-bubble":   # F = B = W in the prediction: idle p - 1 of 3 m + p - 1
            for r in results:
                assert r[label]["predicted"] == pytest.approx((p - 1) / (3 * m + p - 1)), label


def test_bad_schedules_are_refused_before_any_communication():
    from hybridpar_ext.parallel.schedules import Action, ScheduleError, simulate

    # The executor refuses what the simulator refuses; here the simulator alone (no group needed).
    with pytest.raises(ScheduleError, match="deadlocks"):
        F, BW = (lambda i: Action("F", 0, i)), (lambda i: Action("BW", 0, i))
        simulate([[F(0), BW(0), F(1), BW(1)], [F(1), BW(1), F(0), BW(0)]], 2, 1, 2)


def refusals(rank, world):
    import torch.distributed as dist

    from hybridpar_ext.parallel import PipelineSchedule

    import contextlib

    from hybridpar_ext.parallel.schedules import Action

    messages = []
    chunks = [LinearStage(k * world + rank, world * 2) for k in range(2)]
    for args in ((chunks, 3, "interleaved"), (chunks, 4, "zero-bubble"), (chunks[::-1], 2, "interleaved")):
        try:
            PipelineSchedule(args[0], dist.group.WORLD, args[1], schedule=args[2])
        except ValueError as err:
            messages.append(str(err))
    # Valid for the simulator, but under a data-parallel reducer rank 0's weights would get their
    # last gradient twice (BW1 with the reduction on, then W0): refused on every rank.
    F, B, W, BW = ((lambda i, op=op: Action(op, 0, i)) for op in ("F", "B", "W", "BW"))
    mixed = [[F(0), F(1), B(0), BW(1), W(0)], [F(0), BW(0), F(1), BW(1)]]
    try:
        PipelineSchedule(LinearStage(rank, world), dist.group.WORLD, 2, no_sync=contextlib.nullcontext,
                         schedule=mixed)
    except ValueError as err:
        messages.append(str(err))
    return messages


def test_the_executor_refuses_bad_input_alike_on_every_rank():
    results = run_ranks(refusals, 2, timeout=60)
    first = results[0]
    assert "microbatches (m = 3) must be a multiple of the pipeline stages (p = 2); try m = 2 or 4" in first[0]
    assert "schedule 'zero-bubble' runs one model chunk per rank: virtual stages (v) must be 1, got 2" in first[1]
    assert "chunk 0 of rank 0 is virtual stage 0 of 4, so is_first must be True" in first[2]
    assert "rank 0 runs BW1 as chunk 0's last input backward with W work of that chunk after it" in first[3]
    assert results[1][:2] == first[:2] and results[1][3] == first[3]


def zero_bubble_with_data_parallelism(rank, world):
    from hybridpar_ext.parallel import GradientSync, init_mesh
    from hybridpar_ext.parallel.pipeline import ModelChunks, PipelineSchedule

    mesh = init_mesh(dp=2, pp=2)
    m = 3
    chunks = ModelChunks([LinearStage(mesh.pp_rank, 2)])
    # A bucket per parameter: each must start as soon as its last gradient work is done.
    sync = GradientSync(chunks, mesh.dp_group, bucket_cap_mb=1e-6)
    pipe = PipelineSchedule(chunks, mesh.pp_group, m, no_sync=sync.no_sync, schedule="zero-bubble")
    inputs, targets = data(m, seed=1 + mesh.dp_rank)
    pipe.step(inputs, targets)
    sync.finish()
    started = [(r.num_buckets, r.started_during_backward) for r in sync.reducers]
    return {"started": started, "stage": mesh.pp_rank,
            "grads": [p.grad.tolist() for p in chunks.parameters()]}


def test_zero_bubble_starts_each_gradient_bucket_when_its_w_work_is_done(four_ranks):
    results = [r["zero_bubble_dp"] for r in four_ranks]
    # One process: both DP ranks' batches, the mean of their losses.
    stages = [LinearStage(i, 2) for i in range(2)]
    loss = 0.0
    for seed in (1, 2):
        inputs, targets = data(3, seed)
        x = torch.cat(inputs)
        x = stages[1]((stages[0](x)[0],))
        loss = loss + stages[1].loss(x, torch.cat(targets)) / 2
    loss.backward()
    tol = TOLERANCE[torch.float64]
    for r in results:
        assert r["started"] and all(n == s and n >= 2 for n, s in r["started"]), r["started"]
        for got, want in zip(r["grads"], stages[r["stage"]].parameters()):
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want.grad, rtol=tol,
                                       atol=tol * want.grad.abs().max().item())
