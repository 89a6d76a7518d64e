"""Zero bubble's split backward through our tensor-parallel layers: inside a WeightGradStore's
recording, a column- and row-parallel MLP (with biases; every combination of sequence
parallelism and the overlapped ops) leaves its weights untouched by the input backward (B),
whose input gradient already matches the plain MLP's in one process, and gets its weight and
bias gradients, equal to the plain MLP's, only when the store runs (W). Then the GPT under
ZB-H1 with tensor parallelism (tp2, with and without sequence parallelism) and pp2: its
layers defer work to the store, and the first step's gradients and loss match one process."""

import pytest
import torch
import torch.nn.functional as F

from hybridpar_ext.testing import assert_close_to_reference, run_ranks

B, S, H, FFN = 3, 6, 10, 14   # odd widths; batch 3; the sequence splits over tp = 2


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _close(actual, expected, name):
    assert_close_to_reference(actual, expected, torch.float64, name)


def check_deferred_mlp(rank, world):
    import torch.distributed as dist

    from hybridpar_ext import parallel
    from hybridpar_ext.parallel.weight_grad import WeightGradStore

    group = dist.group.WORLD
    dense1, dense2 = torch.nn.Linear(H, FFN, dtype=torch.float64), torch.nn.Linear(FFN, H, dtype=torch.float64)
    with torch.no_grad():
        for i, p in enumerate(list(dense1.parameters()) + list(dense2.parameters())):
            p.copy_(_randn(p.shape, 10 + i))
    x_full, dy_full = _randn((B, S, H), 1), _randn((B, S, H), 2)
    x_ref = x_full.clone().requires_grad_()
    dense2(F.gelu(dense1(x_ref))).backward(dy_full)
    rows = slice(rank * FFN // world, (rank + 1) * FFN // world)
    seq = slice(rank * S // world, (rank + 1) * S // world)
    cases = 0
    for sp in (False, True):
        for overlap in (False, True):
            tag = f"sp={sp} overlap={overlap}"
            col = parallel.ColumnParallelLinear.from_dense(dense1, group, sequence_parallel=sp, chunks=2,
                                                           overlap=overlap)
            row = parallel.RowParallelLinear.from_dense(dense2, group, sequence_parallel=sp, chunks=2,
                                                        overlap=overlap)
            store = WeightGradStore()
            x = (x_full[:, seq] if sp else x_full).clone().requires_grad_()
            with store.recording("mb0"):
                y = row(F.gelu(col(x)))
            y.backward(dy_full[:, seq] if sp else dy_full)   # B
            for name, p in [("column", col.weight), ("column bias", col.bias), ("row", row.weight),
                            ("row bias", row.bias)]:
                assert p.grad is None, f"{tag}: {name} has a gradient after B"
            assert len(store) == 2, f"{tag}: expected the two layers' W work in the store, got {len(store)}"
            _close(x.grad, x_ref.grad[:, seq] if sp else x_ref.grad, f"{tag} grad_x after B")
            store.run("mb0")   # W
            assert len(store) == 0
            _close(col.weight.grad, dense1.weight.grad[rows], f"{tag} column weight grad")
            _close(col.bias.grad, dense1.bias.grad[rows], f"{tag} column bias grad")
            _close(row.weight.grad, dense2.weight.grad[:, rows], f"{tag} row weight grad")
            bias_grad = row.bias.grad.clone()
            if sp:   # each rank holds its sequence slice's part of the replicated bias's gradient
                dist.all_reduce(bias_grad, group=group)
            _close(bias_grad, dense2.bias.grad, f"{tag} row bias grad")

            # Outside a recording the same layers take the fused path: nothing deferred.
            col.zero_grad(), row.zero_grad()
            row(F.gelu(col(x.detach()))).sum().backward()
            assert len(store) == 0 and col.weight.grad is not None, f"{tag}: deferred outside a recording"
            cases += 1
    return cases


def test_parallel_linears_defer_weight_grads_to_w():
    assert run_ranks(check_deferred_mlp, 2, timeout=60) == [4, 4]


SEQ, GLOBAL_BATCH, SEED, M = 12, 4, 11, 2
MODEL = dict(vocab_size=90, max_seq_len=SEQ, hidden=64, heads=4, kv_heads=2, ffn=72, layers=3,
             tied_embeddings=False)


def gpt_zero_bubble_tp(rank, world, sp):
    import torch.distributed as dist

    from hybridpar_ext.models import GPT, GPTConfig
    from hybridpar_ext.parallel import build_stage, gather_state_dict, init_mesh
    from hybridpar_ext.parallel.pipeline import PipelineSchedule

    mesh = init_mesh(dp=1, tp=2, pp=2)
    config = GPTConfig(**MODEL)
    torch.manual_seed(SEED)
    full = GPT(config)
    ids = [range(0, 2), range(2, 3)][mesh.pp_rank]
    stage = build_stage(full, mesh, ids, mesh.pp_rank == 0, mesh.pp_rank == 1, sequence_parallel=sp)
    pipe = PipelineSchedule(stage, mesh.pp_group, M, schedule="zero-bubble")
    deferred = []
    add = pipe.store.add
    pipe.store.add = lambda key, work, holds=(): (deferred.append(key), add(key, work, holds))[1]
    tokens = torch.randint(0, config.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))
    stats = pipe.step(list(tokens[:, :-1].chunk(M)), list(tokens[:, 1:].chunk(M)))
    stage.finish_grads()
    assert len(pipe.store) == 0, "W work left in the store after the step"
    named = dict(stage.named_parameters(remove_duplicate=False))
    grads = gather_state_dict(stage, mesh, config, {n: p.grad.detach().clone() for n, p in named.items()})
    total = torch.tensor([stats.loss if stage.is_last and mesh.tp_rank == 0 else 0.0], dtype=torch.float64)
    dist.all_reduce(total)
    gathered = [None] * world
    dist.all_gather_object(gathered, grads)
    if rank != 0:
        return len(deferred)
    merged = {k: v for g in gathered for k, v in g.items()}
    torch.manual_seed(SEED)
    model = GPT(config)
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert_close_to_reference(total[0], torch.tensor(loss.item(), dtype=torch.float64), torch.float32, "loss")
    ref = dict(model.named_parameters(remove_duplicate=False))
    assert set(merged) == set(ref), sorted(set(merged) ^ set(ref))
    for name, p in ref.items():
        assert_close_to_reference(merged[name], p.grad.double(), torch.float32, f"sp={sp} grad {name}")
    return len(deferred)


@pytest.mark.parametrize("sp", [False, True], ids=["tp2-pp2", "tp2-sp-pp2"])
def test_gpt_zero_bubble_defers_through_tensor_parallel_layers(sp):
    counts = run_ranks(gpt_zero_bubble_tp, 4, timeout=120, sp=sp)
    # Per microbatch: 4 linears a layer (qkv, out, fc1, fc2), plus the head on the last stage.
    assert sorted(counts) == sorted([2 * 4 * M] * 2 + [(1 * 4 + 1) * M] * 2), counts
