"""The plan mechanism on a model it has never seen: a few Linear layers in a ModuleDict, a
plan written here, on real gloo process groups (TP 2 and 3, with and without sequence
parallelism, embedding tied to the head or not). The parallel model runs the dense model's own
forward code; its loss, every gathered gradient and the gathered state_dict match the dense
model's (float64 reference), the padded vocabulary invisible."""

import pytest
import torch
import torch.nn.functional as F

from hybridpar_ext.testing import assert_close_to_reference, run_ranks

VOCAB, HIDDEN, FFN, SEQ = 37, 12, 18, 6   # the vocabulary divides neither 2 nor 3


class Toy(torch.nn.Module):
    """Embedding, a SwiGLU MLP with a fused ``[gate; up]`` projection, LayerNorm, a head."""

    def __init__(self, tied: bool):
        super().__init__()
        self.blocks = torch.nn.ModuleDict({
            "embed": torch.nn.Embedding(VOCAB, HIDDEN),
            "gate_up": torch.nn.Linear(HIDDEN, 2 * FFN, bias=True),
            "down": torch.nn.Linear(FFN, HIDDEN, bias=True),
            "norm": torch.nn.LayerNorm(HIDDEN),
            "head": torch.nn.Linear(HIDDEN, VOCAB, bias=False),
        })
        if tied:
            self.blocks["head"].weight = self.blocks["embed"].weight

    def forward(self, tokens):
        b = self.blocks
        x = b["embed"](tokens)
        gate, up = b["gate_up"](x).chunk(2, dim=-1)
        x = x + b["down"](F.silu(gate) * up)
        return b["head"](b["norm"](x))


def toy_plan():
    from hybridpar_ext import parallel

    return {"blocks.embed": parallel.VocabEmbedding(), "blocks.gate_up": parallel.ColumnParallel(blocks=2),
            "blocks.down": parallel.RowParallel(), "blocks.norm": parallel.SequenceParallelNorm(),
            "blocks.head": parallel.LMHead()}


def check_toy(rank, world):
    import torch.distributed as dist

    from hybridpar_ext import parallel

    mesh = parallel.init_mesh(tp=world)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    targets[0, 0] = VOCAB - 1   # a target in the last (padded) shard
    for tied in (False, True):
        for sp in (False, True):
            tag = f"tied={tied} sp={sp}"
            torch.manual_seed(0)
            dense = Toy(tied)
            with torch.no_grad():
                for p in dense.parameters():
                    p.add_(torch.randn_like(p) * 0.1)   # biases and norm weights not at their init
            reference = Toy(tied).double()
            reference.load_state_dict(dense.state_dict())
            loss_ref = F.cross_entropy(reference(tokens).flatten(0, 1), targets.flatten())
            loss_ref.backward()

            shapes = {n: tuple(p.shape) for n, p in dense.named_parameters(remove_duplicate=False)}
            model = parallel.parallelize_module(dense, mesh, toy_plan(), sequence_parallel=sp)
            # The specs the built layers carry are the ones the plan gives offline.
            assert parallel.shard_specs(model) == parallel.plan_specs(toy_plan(), shapes, world, rank, sp), tag
            assert isinstance(model.blocks["gate_up"], parallel.ColumnParallelLinear)
            assert (model.blocks["head"].weight is model.blocks["embed"].weight) == tied
            # Under SP the embedding scatters the sequence and the head gathers it back.
            logits = model(tokens)
            loss = model.blocks["head"].loss(logits, targets).mean()
            loss.backward()
            parallel.sync_tensor_parallel_grads(model, mesh.tp_group)
            assert_close_to_reference(loss, loss_ref, torch.float32, f"{tag} loss")

            state = parallel.gather_state_dict(model, mesh)
            assert set(state) == set(reference.state_dict()), tag
            for name, t in reference.state_dict().items():
                assert torch.equal(state[name].double(), t), f"{tag} weight {name}"
            named = dict(model.named_parameters(remove_duplicate=False))
            grads = parallel.gather_state_dict(model, mesh, tensors={n: p.grad for n, p in named.items()})
            ref_grads = dict(reference.named_parameters(remove_duplicate=False))
            for name, p in ref_grads.items():
                assert_close_to_reference(grads[name], p.grad, torch.float32, f"{tag} grad {name}")
            dist.barrier()
    # A module its style does not fit: a clear error before any collective.
    with pytest.raises(TypeError, match="ColumnParallel: expected a Linear, got LayerNorm"):
        parallel.parallelize_module(Toy(False), mesh, {"blocks.norm": parallel.ColumnParallel()})
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_a_plan_parallelizes_a_model_it_was_written_for(world):
    assert run_ranks(check_toy, world, timeout=180) == [True] * world
