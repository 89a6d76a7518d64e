"""The trainer in bf16 on CPU processes: float32 master weights and gradients (the DP buckets,
ZeRO-1's slices, the reduction in bf16 on request), the losses of every step against one
process training the plain GPT in float64 within bf16's tolerance; and the gradients stay views
of the DP buckets from step to step (zeroed in place, never copied in again)."""

import torch

from hybridpar_ext.testing import assert_close_to_reference, run_ranks

STEPS = 3
BASE = ["--layers", "3", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--ffn", "96", "--seq", "12",
        "--global-batch", "8", "--steps", str(STEPS), "--lr", "3e-3", "--seed", "11", "--dtype", "bfloat16"]
CASES = [["--dp", "2", "--pp", "2", "--microbatches", "4"],
         ["--dp", "2", "--tp", "2", "--sp", "--zero", "--mlp", "swiglu"],
         ["--dp", "2", "--pp", "2", "--grad-reduce-dtype", "bfloat16", "--untied"]]


def _reference(args, config):
    from hybridpar_ext.models import GPT
    from hybridpar_ext.train import Batches

    torch.manual_seed(args.seed)
    model = GPT(config).double()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    batches = Batches(args.data, config.vocab_size, args.seq, args.global_batch, args.seed)
    losses = []
    for step in range(1, args.steps + 1):
        tokens = batches(step)
        opt.zero_grad()
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_bf16(rank, world):
    import torch.distributed as dist

    from hybridpar_ext.train import Trainer, check_args, parse_args

    out = []
    for case in CASES:
        args = parse_args(BASE + case)
        config = check_args(args, world)
        trainer = Trainer(args, config, torch.device("cpu"))
        assert {p.dtype for p in trainer.stage.parameters()} == {torch.float32}
        losses, pointers = [], []
        for step in range(1, STEPS + 1):
            losses.append(trainer.step(step)["loss"])
            assert all(p.grad.dtype == torch.float32 for p in trainer.stage.parameters())
            pointers.append([p.grad.data_ptr() for p in trainer.stage.parameters()])
        label = " ".join(case)
        if trainer.sync.reducers:
            # Every gradient a view of its bucket, the same memory every step.
            buckets = [(r.buffers[b].data_ptr(), r.buffers[b].numel() * r.buffers[b].element_size())
                       for r in trainer.sync.reducers for b in range(r.num_buckets)]
            for ptr in pointers[-1]:
                assert any(start <= ptr < start + size for start, size in buckets), f"[{label}] grad not in a bucket"
            assert pointers[1] == pointers[2], f"[{label}] gradients moved between steps"
        if rank == 0:
            for step, (a, e) in enumerate(zip(losses, _reference(args, config)), 1):
                assert_close_to_reference(torch.tensor(a), torch.tensor(e, dtype=torch.float64), torch.bfloat16,
                                          f"[{label}] loss of step {step}")
            out.append(label)
        del trainer
        dist.barrier()
    return out


def test_bf16_training_with_master_weights_matches_float64():
    results = run_ranks(train_bf16, 4, timeout=240)
    assert len(results[0]) == len(CASES)
