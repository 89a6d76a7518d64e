"""Pipeline schedules as data: every schedule for p <= 8, v in {1, 2, 4}, m <= 32 checked by the
simulator (each microbatch's work once per chunk, dependencies across ranks, no deadlock), its
bubble against the published formulas and its peak activations against 1F1B's; ZB-H1's fused
backwards (a B directly followed by its W is one BW: rank 0's list is 1F1B's) and its holds
within a memory budget against the simulator's memory model; the simulator itself against
schedules that are wrong on purpose. Pure Python, no process group."""

import itertools

import pytest

from hybridpar_ext.parallel.schedules import (SCHEDULES, Action, ScheduleError, build_schedule, check_schedule,
                                              formula_bubble, fuse_adjacent_backwards, simulate,
                                              zero_bubble_h1_schedule, zero_bubble_holds)


def valid_cases():
    for kind, p, v, m in itertools.product(SCHEDULES, range(1, 9), (1, 2, 4), range(1, 33)):
        try:
            check_schedule(kind, p, v, m)
        except ValueError:
            continue
        yield kind, p, v, m


@pytest.mark.parametrize("kind", SCHEDULES)
def test_every_schedule_runs_each_piece_of_work_once_in_dependency_order(kind):
    cases = [c for c in valid_cases() if c[0] == kind]
    assert len({(p, v) for _, p, v, _ in cases}) >= (8 if kind != "interleaved" else 14)
    for _, p, v, m in cases:
        lists = build_schedule(kind, p, v, m)
        sim = simulate(lists, p, v, m)   # raises on missing, repeated or deadlocked work
        for r, actions in enumerate(lists):
            assert len(sim.starts[r]) == len(actions)
            for chunk in range(v):
                # Forwards and backwards of a chunk in microbatch order: the receives of a chunk
                # arrive in the order its neighbour sends them.
                for op in ("F", "B", "W", "BW"):
                    order = [a.microbatch for a in actions if a.op == op and a.chunk == chunk]
                    assert order == sorted(order), (kind, p, v, m, r, op)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_the_simulated_bubble_is_the_formula(kind):
    # Chunk costs are the stage's over v: the formulas are for stages of equal cost.
    costs = [(1, 1, 1), (1, 2, 1), (2, 1.5, 0.5), (1, 1, 0.25)] if kind != "1f1b" else [(1, 1, 1), (1, 2, 1), (3, 1, 2)]
    for _, p, v, m in (c for c in valid_cases() if c[0] == kind):
        if kind == "zero-bubble" and m < p:
            continue   # the paper's regime: at least p microbatches
        for f, b, w in costs:
            sim = simulate(build_schedule(kind, p, v, m), p, v, m, f / v, b / v, w / v)
            expected = formula_bubble(kind, p, v, m, f, b, w)
            assert sim.bubble == pytest.approx(expected, abs=1e-12), (kind, p, v, m, (f, b, w))
            # Stages of equal cost: every rank idles alike.
            assert max(sim.bubbles) - min(sim.bubbles) < 1e-12


def test_the_formulas():
    assert formula_bubble("1f1b", 4, 1, 8) == pytest.approx(3 / 11)
    assert formula_bubble("interleaved", 4, 2, 8) == pytest.approx(3 / (16 + 3))
    # ZB-H1 with F = B = W: idle (p - 1) F instead of 3 (p - 1) F, a third of 1F1B's idle time.
    p, m = 4, 8
    zb, f1b = formula_bubble("zero-bubble", p, 1, m), formula_bubble("1f1b", p, 1, m)
    assert zb == pytest.approx((p - 1) / (3 * m + p - 1))
    idle = lambda bubble: bubble / (1 - bubble)   # idle per unit of busy time
    assert idle(zb) == pytest.approx(idle(f1b) / 3)


def test_peak_activations():
    for p, m in itertools.product(range(1, 9), range(1, 33)):
        one = simulate(build_schedule("1f1b", p, 1, m), p, 1, m)
        assert one.peak_activations == [min(p - r, m) for r in range(p)]
        if m >= p:
            # ZB-H1 keeps the W's inputs longer on the later ranks, never above 1F1B's busiest rank.
            zb = simulate(build_schedule("zero-bubble", p, 1, m), p, 1, m)
            assert max(zb.peak_activations) == max(one.peak_activations) == p
    for p, v in itertools.product(range(2, 9), (2, 4)):
        for m in range(p, 33, p):
            inter = simulate(build_schedule("interleaved", p, v, m), p, v, m)
            # Megatron's warm-up plus the one in flight, in chunks of 1/v of a stage.
            assert inter.peak_activations == [min(2 * (p - r - 1) + (v - 1) * p + 1, v * m) for r in range(p)]


def test_zero_bubble_fuses_each_b_directly_followed_by_its_w():
    for p, m in itertools.product(range(1, 9), range(1, 33)):
        split = zero_bubble_h1_schedule(p, m, fuse=False)
        fused = build_schedule("zero-bubble", p, 1, m)
        assert fused == fuse_adjacent_backwards(split)
        # Rank 0 holds back no W: every backward fused, its list 1F1B's.
        assert fused[0] == build_schedule("1f1b", p, 1, m)[0]
        assert not any(a.op in ("B", "W") for a in fused[0]), (p, m)
        # Elsewhere all stays split: a fused backward would send its input gradient a W later.
        assert fused[1:] == split[1:]
        # The same work in the same order and time, the same live microbatches.
        for costs in ((1, 1, 1), (1, 2, 0.5)):
            a, b = simulate(split, p, 1, m, *costs), simulate(fused, p, 1, m, *costs)
            assert (a.makespan, a.busy, a.peak_activations) == (b.makespan, b.busy, b.peak_activations)
            # Each forward and each input backward (B, or the BW it became) starts when it did.
            when = lambda lists, sim: [{(x.op[0], x.microbatch): t for x, t in zip(l, ts) if x.op != "W"}
                                       for l, ts in zip(lists, sim.starts)]
            assert when(split, a) == when(fused, b)
        # A fused backward frees its W's keep at once; a split one keeps it until W.
        memory = [(1.0, 0.8)] * p
        assert simulate(fused, p, 1, m, memory=memory).peak_memory == simulate(split, p, 1, m, memory=memory).peak_memory


def test_the_memory_model_of_the_simulator():
    for p, m in ((4, 8), (3, 3), (8, 9), (5, 32), (2, 2)):
        # The paper's count by default: a pending W is a whole microbatch.
        zb = simulate(build_schedule("zero-bubble", p, 1, m), p, 1, m)
        assert zb.peak_memory == [float(x) for x in zb.peak_activations] == [float(p)] * p
        one = simulate(build_schedule("1f1b", p, 1, m), p, 1, m, memory=[(3.0, 100.0)] * p)
        assert one.peak_memory == [3.0 * (p - r) for r in range(p)]   # no W ever pending
        for w in (0.5, 1.0, 1.25):
            # Rank r: p - r microbatches live and r W's pending; with w > 1 the peak is
            # right after a B, one more W pending and one microbatch fewer.
            got = simulate(build_schedule("zero-bubble", p, 1, m), p, 1, m, memory=[(1.0, w)] * p).peak_memory
            assert got == pytest.approx([p] + [p - r + r * w + max(w - 1, 0) for r in range(1, p)]), (p, m, w)
    with pytest.raises(ValueError, match=r"memory must give \(activation, pending W\) for each of the 2 ranks, got 1"):
        simulate(build_schedule("1f1b", 2, 1, 2), 2, 1, 2, memory=[(1, 1)])


def test_zero_bubble_holds_within_a_memory_budget():
    for p, m in ((2, 4), (4, 8), (5, 7), (8, 32)):
        # Holding back fewer W's: valid lists, a bubble between ZB-H1's and 1F1B's.
        one, zb = (simulate(build_schedule(k, p, 1, m), p, 1, m).bubble for k in ("1f1b", "zero-bubble"))
        # No W held back: 1F1B's order, rank 0's backwards fused and the others split in place.
        assert [[Action("BW" if a.op == "B" else a.op, a.chunk, a.microbatch) for a in actions if a.op != "W"]
                for actions in zero_bubble_h1_schedule(p, m, [0] * p)] == build_schedule("1f1b", p, 1, m)
        for hold in ([r // 2 for r in range(p)], [max(r - 1, 0) for r in range(p)]):
            assert zb - 1e-12 <= simulate(zero_bubble_h1_schedule(p, m, hold), p, 1, m).bubble <= one + 1e-12
        # The paper's accounting (a pending W keeps a microbatch's worth) fits 1F1B's peak exactly.
        assert zero_bubble_holds(p, m, p, [(1.0, 1.0)] * p) == list(range(p))
        # W keeps more than the forward did: rank r fits h W's while (p - r) + 1.1 h + 0.1 <= p
        # (the 0.1: right after a B, one W more is pending and one microbatch less live).
        assert zero_bubble_holds(p, m, p, [(1.0, 1.1)] * p) == [int((r - 0.1) / 1.1) if r else 0 for r in range(p)]
        # A heavier last stage (the loss's logits): one microbatch of 1.5 and h W's of 0.9 must
        # fit under p, so it alone may hold back fewer (at p = 2, 4 and 5 here; not at 8).
        memory = [(1.0, 0.9)] * (p - 1) + [(1.5, 0.9)]
        holds = zero_bubble_holds(p, m, p, memory)
        assert holds == list(range(p - 1)) + [min(p - 1, int((p - 1.5) / 0.9))], holds
        peaks = simulate(zero_bubble_h1_schedule(p, m, holds), p, 1, m, memory=memory).peak_memory
        assert max(peaks) <= p, peaks
        if holds[-1] < p - 1:   # the most that fits: one more W would not
            more = holds[:-1] + [holds[-1] + 1]
            assert simulate(zero_bubble_h1_schedule(p, m, more), p, 1, m, memory=memory).peak_memory[-1] > p
    with pytest.raises(ValueError, match=r"hold must give each of the 3 ranks r a number of W's to hold back in "
                                         r"\[0, r\], got \[0, 2, 1\]"):
        zero_bubble_h1_schedule(3, 6, [0, 2, 1])
    with pytest.raises(ValueError, match=r"budget must be one number or one for each of the 3 ranks, got 2"):
        zero_bubble_holds(3, 6, [3.0, 3.0], [(1.0, 1.0)] * 3)


def test_bad_arguments_are_named_with_what_would_work():
    with pytest.raises(ValueError, match=r"microbatches \(m = 6\) must be a multiple of the pipeline stages "
                                         r"\(p = 4\); try m = 4 or 8"):
        check_schedule("interleaved", 4, 2, 6)
    with pytest.raises(ValueError, match=r"try m = 4$"):
        check_schedule("interleaved", 4, 2, 3)
    with pytest.raises(ValueError, match=r"virtual stages \(v\) must be 1, got 2"):
        build_schedule("1f1b", 2, 2, 4)
    with pytest.raises(ValueError, match=r"at least 2 virtual stages per rank \(v\), got 1"):
        build_schedule("interleaved", 2, 1, 4)
    with pytest.raises(ValueError, match=r"at least 2 pipeline stages \(p\), got 1"):
        build_schedule("interleaved", 1, 2, 4)
    with pytest.raises(ValueError, match=r"schedule must be one of 1f1b, interleaved, zero-bubble, got 'gpipe'"):
        build_schedule("gpipe", 2, 1, 4)
    with pytest.raises(ValueError, match=r"microbatches \(m\) must be a positive int, got 0"):
        build_schedule("1f1b", 2, 1, 0)


def test_the_simulator_rejects_wrong_schedules():
    F, BW, B, W = (lambda i, c=0: Action("F", c, i)), (lambda i, c=0: Action("BW", c, i)), \
        (lambda i, c=0: Action("B", c, i)), (lambda i, c=0: Action("W", c, i))
    good = [[F(0), F(1), BW(0), BW(1)], [F(0), BW(0), F(1), BW(1)]]
    simulate(good, 2, 1, 2)
    with pytest.raises(ScheduleError, match="rank 1: no forward of microbatch 1 on chunk 0"):
        simulate([good[0], [F(0), BW(0), BW(1)]], 2, 1, 2)
    with pytest.raises(ScheduleError, match=r"rank 0: F1 appears twice"):
        simulate([good[0] + [F(1)], good[1]], 2, 1, 2)
    with pytest.raises(ScheduleError, match=r"expected BW, or B and W"):
        simulate([[F(0), F(1), BW(0), B(1)], good[1]], 2, 1, 2)
    with pytest.raises(ScheduleError, match=r"outside chunks \[0, 1\)"):
        simulate([good[0] + [F(0, 1)], good[1]], 2, 1, 2)
    # Rank 1 runs microbatch 1 first; rank 0 will only forward it after microbatch 0's backward,
    # which needs rank 1's: a cycle.
    with pytest.raises(ScheduleError, match=r"deadlocks: rank 0 at BW0, rank 1 at F1"):
        simulate([[F(0), BW(0), F(1), BW(1)], [F(1), BW(1), F(0), BW(0)]], 2, 1, 2)
    # A W before its own B never starts.
    with pytest.raises(ScheduleError, match=r"deadlocks: rank 0 at W0"):
        simulate([[F(0), W(0), B(0)]], 1, 1, 1)
    # Interleaved: the second chunk's forward of a microbatch needs the other rank's first chunk.
    with pytest.raises(ScheduleError, match="deadlocks"):
        simulate([[F(0, 1), F(0, 0), BW(0, 1), BW(0, 0)], [F(0, 0), F(0, 1), BW(0, 1), BW(0, 0)]], 2, 2, 1)


def test_communication_latency_only_adds_time():
    for kind, p, v, m in (("1f1b", 4, 1, 8), ("interleaved", 4, 2, 8), ("zero-bubble", 4, 1, 8)):
        lists = build_schedule(kind, p, v, m)
        base = simulate(lists, p, v, m)
        slow = simulate(lists, p, v, m, comm=0.3)
        assert slow.makespan > base.makespan
        assert slow.busy == base.busy


def test_chunk_layers_deal_the_model_to_virtual_stages_in_order():
    from hybridpar_ext.parallel.schedules import chunk_layers

    for layers, p, v in ((4, 2, 2), (5, 2, 2), (9, 4, 2), (13, 3, 4), (8, 8, 1)):
        per_rank = [chunk_layers(layers, p, v, r) for r in range(p)]
        by_stage = [per_rank[s % p][s // p] for s in range(p * v)]   # virtual stage s = chunk * p + rank
        assert [i for run in by_stage for i in run] == list(range(layers))
        sizes = [len(run) for run in by_stage]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert chunk_layers(5, 2, 2, 0) == [range(0, 2), range(3, 4)]
    with pytest.raises(ValueError, match=r"layers \(5\) must be at least pipeline stages x virtual stages = "
                                         r"2 x 4 = 8; try v <= 2"):
        chunk_layers(5, 2, 4, 0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        chunk_layers(5, 2, 2, 2)
