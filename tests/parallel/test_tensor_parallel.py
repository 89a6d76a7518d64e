"""Tensor- and sequence-parallel layers on real gloo process groups against their plain
twins (torch Linear/Embedding/cross-entropy on the full weights), forward and backward; the
mesh's layout and its errors."""

import re

import pytest
import torch
import torch.nn.functional as F

from hybridpar_ext.testing import assert_close_to_reference, run_ranks

B, S, H, FFN, V = 2, 8, 10, 12, 12


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _close(actual, expected, name):
    assert_close_to_reference(actual, expected.double(), torch.float32, name)


def check_layers(rank, world):
    import torch.distributed as dist

    from hybridpar_ext import parallel

    group = dist.group.WORLD
    w1, w2 = _randn((FFN, H), 1), _randn((H, FFN), 2)
    x_full, dy_full = _randn((B, S, H), 3), _randn((B, S, H), 4)
    emb, tokens = _randn((V, H), 5), torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(6))
    logits_full, targets = _randn((B, S, V), 7), torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(8))

    # The plain twin: an MLP, an embedding, a cross-entropy.
    x_ref = x_full.clone().requires_grad_()
    w1_ref, w2_ref = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    y_ref = F.gelu(x_ref @ w1_ref.t()) @ w2_ref.t()
    y_ref.backward(dy_full)
    rows = slice(rank * FFN // world, (rank + 1) * FFN // world)
    seq = slice(rank * S // world, (rank + 1) * S // world)

    for sp in (False, True):
        col = parallel.ColumnParallelLinear(H, FFN, group, sequence_parallel=sp, chunks=2)
        row = parallel.RowParallelLinear(FFN, H, group, sequence_parallel=sp, chunks=2)
        with torch.no_grad():
            col.weight.copy_(w1[rows])
            row.weight.copy_(w2[:, rows])
        x = (x_full[:, seq] if sp else x_full).clone().requires_grad_()
        y = row(F.gelu(col(x)))
        y.backward(dy_full[:, seq] if sp else dy_full)
        tag = f"mlp sp={sp}"
        _close(y, y_ref[:, seq] if sp else y_ref, f"{tag} out")
        _close(x.grad, x_ref.grad[:, seq] if sp else x_ref.grad, f"{tag} grad_x")
        _close(col.weight.grad, w1_ref.grad[rows], f"{tag} grad column weight")
        _close(row.weight.grad, w2_ref.grad[:, rows], f"{tag} grad row weight")

        embed = parallel.VocabParallelEmbedding(V, H, group, sequence_parallel=sp)
        with torch.no_grad():
            embed.weight.copy_(emb[embed.vocab_start:embed.vocab_end])
        emb_ref = emb.clone().requires_grad_()
        out_ref = F.embedding(tokens, emb_ref)
        out_ref.backward(dy_full)
        out = embed(tokens)
        out.backward(dy_full[:, seq] if sp else dy_full)
        _close(out, out_ref[:, seq] if sp else out_ref, f"embedding sp={sp}")
        _close(embed.weight.grad, emb_ref.grad[embed.vocab_start:embed.vocab_end], f"embedding grad sp={sp}")

    vocab = slice(rank * V // world, (rank + 1) * V // world)
    logits_ref = logits_full.clone().requires_grad_()
    loss_ref = F.cross_entropy(logits_ref.view(-1, V), targets.view(-1), reduction="none").view(B, S)
    loss_ref.backward(dy_full[..., 0])
    logits = logits_full[..., vocab].clone().requires_grad_()
    loss = parallel.vocab_parallel_cross_entropy(logits, targets, group)
    loss.backward(dy_full[..., 0])
    _close(loss, loss_ref, "vocab parallel cross-entropy")
    _close(logits.grad, logits_ref.grad[..., vocab], "vocab parallel cross-entropy grad")

    odd = 2 * world + 1
    with pytest.raises(ValueError, match=f"out_features \\({odd}\\) must be divisible by the tensor-parallel size \\({world}\\)"):
        parallel.ColumnParallelLinear(H, odd, group)
    with pytest.raises(ValueError, match=f"num_embeddings \\({odd}\\) must be divisible"):
        parallel.VocabParallelEmbedding(odd, H, group)
    return True


def check_layers_and_blocks(rank, world):
    return {"layers": check_layers(rank, world), "blocks": check_blocks(rank, world)}


@pytest.fixture(scope="module")
def twins():
    """check_layers and check_blocks of each world size, in one launch of its processes
    (starting them costs more than the checks); launched when a test first asks."""
    results = {}

    def of(world):
        if world not in results:
            results[world] = run_ranks(check_layers_and_blocks, world, timeout=300)
        return results[world]
    return of


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_layers_match_their_plain_twins(twins, world):
    assert [r["layers"] for r in twins(world)] == [True] * world


def check_mesh(rank, world):
    import torch.distributed as dist

    from hybridpar_ext.parallel import init_mesh

    mesh = init_mesh(dp=2, tp=2, pp=2)
    assert (mesh.dp, mesh.pp, mesh.tp) == (2, 2, 2)
    # TP innermost: neighbours share a TP group; PP next; DP outermost.
    assert dist.get_process_group_ranks(mesh.tp_group) == [rank - rank % 2, rank - rank % 2 + 1]
    assert dist.get_process_group_ranks(mesh.pp_group) == [rank % 2 + 4 * (rank // 4), rank % 2 + 4 * (rank // 4) + 2]
    assert dist.get_process_group_ranks(mesh.dp_group) == [rank % 4, rank % 4 + 4]
    assert (mesh.dp_rank, mesh.pp_rank, mesh.tp_rank) == (rank // 4, rank // 2 % 2, rank % 2)
    inferred = init_mesh(tp=2, pp=2)
    assert inferred.dp == 2
    for kwargs, message in ((dict(dp=3, tp=2, pp=2), "dp=3 * tp=2 * pp=2 = 12, but the world size is 8"),
                            (dict(tp=3), "world size 8 is not divisible by tp=3 * pp=1 = 3, so dp cannot be inferred"),
                            (dict(tp=0), "tp must be a positive int"),
                            (dict(tp=2, pp=2, timeout=0), "timeout must be a positive number of seconds")):
        with pytest.raises(ValueError, match=re.escape(message)):
            init_mesh(**kwargs)
    return True


def test_mesh_layout_and_errors():
    assert run_ranks(check_mesh, 8, timeout=240) == [True] * 8


def wait_for_a_stalled_peer(rank, world, stall):
    """Rank 1 stalls outside any collective; rank 0 waits for it in their TP group, rank 3 in
    their DP group. Each gets an error after the world's timeout, not c10d's 30 minutes."""
    import time

    import torch
    import torch.distributed as dist

    from hybridpar_ext.parallel import init_mesh

    mesh = init_mesh(dp=2, tp=2)
    if rank == 1:
        time.sleep(stall)
        return None
    group = {0: mesh.tp_group, 3: mesh.dp_group}.get(rank)
    if group is None:
        return None
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(3), group=group)
    except RuntimeError as err:
        return [time.monotonic() - start, str(err)]
    return [time.monotonic() - start, None]


def test_mesh_groups_time_out_like_the_world():
    timeout, stall = 2, 12
    results = run_ranks(wait_for_a_stalled_peer, 4, timeout=120, stall=stall,
                        env={"HYBRIDPAR_RANKS_TIMEOUT": str(timeout)})
    for rank in (0, 3):
        waited, error = results[rank]
        assert error is not None and "Timed out" in error, (rank, error)
        assert waited < stall / 2, (rank, waited)


def check_blocks(rank, world):
    """ParallelTransformerLayer against the plain TransformerLayer it was split from: kv heads
    replicated (1 < tp) and split, LayerNorm/GELU and RMSNorm/SwiGLU, with and without SP."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from hybridpar_ext import nn as hnn
    from hybridpar_ext import parallel

    group = dist.group.WORLD
    hidden, heads, ffn, seq = 64, 4, 40, 8
    for kv, norm, act in ((1, "layernorm", "gelu"), (world, "rmsnorm", "swiglu"), (heads, "layernorm", "swiglu")):
        config = SimpleNamespace(hidden=hidden, heads=heads, kv_heads=kv, mlp=act)
        torch.manual_seed(0)
        plain = hnn.TransformerLayer(hidden, heads, kv, ffn, norm, act)
        x_full, r_full, dy_full = (_randn((1, seq, hidden), s) for s in (10, 11, 12))
        x_ref, r_ref = x_full.clone().requires_grad_(), r_full.clone().requires_grad_()
        out_ref, res_ref = plain(x_ref, r_ref)
        (out_ref * dy_full + res_ref * dy_full.flip(-1)).sum().backward()
        for sp in (False, True):
            block = parallel.ParallelTransformerLayer(hidden, heads, kv, ffn, group, norm, act,
                                                      sequence_parallel=sp, chunks=2)
            block.load_state_dict({n: parallel.split_tensor(n, t, config, world, rank)
                                   for n, t in plain.state_dict().items()})
            seq_slice = slice(rank * seq // world, (rank + 1) * seq // world) if sp else slice(None)
            x = x_full[:, seq_slice].clone().requires_grad_()
            r = r_full[:, seq_slice].clone().requires_grad_()
            out, res = block(x, r)
            dy = dy_full[:, seq_slice]
            (out * dy + res * dy.flip(-1)).sum().backward()
            parallel.sync_tensor_parallel_grads(block, group)
            tag = f"kv={kv} {norm} {act} sp={sp}"
            _close(out, out_ref[:, seq_slice], f"{tag} out")
            _close(x.grad, x_ref.grad[:, seq_slice], f"{tag} grad x")
            _close(r.grad, r_ref.grad[:, seq_slice], f"{tag} grad residual")
            for name, p in block.named_parameters():
                parts = [torch.empty_like(p.grad) for _ in range(world)]
                dist.all_gather(parts, p.grad, group=group)
                full = parallel.merge_tensors(name, parts, config)
                _close(full, dict(plain.named_parameters())[name].grad, f"{tag} grad {name}")
    return True


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_transformer_layer_matches_its_plain_twin(twins, world):
    assert [r["blocks"] for r in twins(world)] == [True] * world
