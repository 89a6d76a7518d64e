"""GPT-2's vocabulary (50257, prime to every tp) trained with tp 2, 4 and 8: padded to a
multiple of tp, the padding out of the softmax and the loss, and invisible in the gathered
state_dict. Through the trainer's own path (flags, checks, Trainer), against the plain GPT
in one process: the loss of each step, every first-step gradient, the starting weights."""

import pytest
import torch

from hybridpar_ext.testing import assert_close_to_reference, run_ranks, train_reference

VOCAB = 50257
# 8 heads of 16 (so tp 8 splits them), 2 kv heads (split at tp 2, replicated at tp 4 and 8).
FLAGS = ["--layers", "1", "--hidden", "128", "--heads", "8", "--kv-heads", "2", "--ffn", "40", "--seq", "8",
         "--global-batch", "2", "--steps", "2", "--lr", "3e-3", "--seed", "3", "--data", "synthetic",
         "--vocab", str(VOCAB)]


def _reference(args, config):
    from hybridpar_ext.models import GPT
    from hybridpar_ext.train import Batches

    torch.manual_seed(args.seed)
    model = GPT(config)
    batches = Batches(args.data, config.vocab_size, args.seq, args.global_batch, args.seed)
    return train_reference(model, [batches(s) for s in range(1, args.steps + 1)], args.lr, args.weight_decay)


def train_padded(rank, world, extra):
    import torch.distributed as dist

    from hybridpar_ext.models import GPT
    from hybridpar_ext.parallel import gather_state_dict
    from hybridpar_ext.train import Trainer, check_args, parse_args

    args = parse_args(FLAGS + ["--tp", str(world)] + extra)
    config = check_args(args, world)
    args.dtype = "float32"
    trainer = Trainer(args, config, torch.device("cpu"))
    local = -(-VOCAB // world)
    assert tuple(trainer.stage.embed.weight.shape) == (local, 128)
    initial = gather_state_dict(trainer.stage, trainer.mesh)
    losses, grads = [], None
    for step in range(1, args.steps + 1):
        losses.append(trainer.step(step)["loss"])
        if grads is None:
            named = dict(trainer.stage.named_parameters(remove_duplicate=False))
            grads = gather_state_dict(trainer.stage, trainer.mesh,
                                      tensors={n: p.grad.clone() for n, p in named.items()})
    # The padding rows never move: no gradient reaches them.
    padding = local * world - VOCAB
    if rank == world - 1:
        assert not trainer.stage.embed.weight[local - padding:].any()
    if rank == 0:
        torch.manual_seed(args.seed)
        plain = GPT(config).state_dict()
        assert {n: tuple(t.shape) for n, t in initial.items()} == {n: tuple(t.shape) for n, t in plain.items()}
        for name, w in plain.items():
            assert torch.equal(initial[name], w), f"initial weight {name} differs"
        ref_losses, ref_grads, _ = _reference(args, config)
        for step, (a, e) in enumerate(zip(losses, ref_losses), 1):
            assert_close_to_reference(torch.tensor(a), torch.tensor(e, dtype=torch.float64), torch.float32,
                                      f"tp={world} loss of step {step}")
        for name, g in ref_grads.items():
            assert_close_to_reference(grads[name], g.double(), torch.float32, f"tp={world} grad {name}")
    dist.barrier()
    return losses


@pytest.mark.parametrize("tp,extra", [(2, []), (4, ["--sp"]), (8, ["--untied", "--steps", "1"])],
                         ids=["tp2", "tp4-sp", "tp8-untied"])
def test_gpt2_vocabulary_trains_with_any_tp(tp, extra):
    losses = run_ranks(train_padded, tp, timeout=300, extra=extra)
    assert all(r == losses[0] for r in losses)
