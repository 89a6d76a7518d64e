"""Training from a token file and evaluating on its held-out tail, through a pipeline (forward
only; one stage per rank, or two interleaved chunks) and over data-parallel ranks, against the plain GPT in one process reading the same
batches: the loss of every step and the eval loss after the last."""

import numpy as np
import pytest
import torch

from hybridpar_ext.testing import assert_close_to_reference, run_ranks

BASE = ["--layers", "4", "--hidden", "48", "--heads", "2", "--kv-heads", "1", "--ffn", "80", "--seq", "10",
        "--vocab", "300", "--global-batch", "4", "--steps", "2", "--lr", "3e-3", "--seed", "5",
        "--eval-every", "2", "--eval-batches", "3", "--eval-fraction", "0.2"]
LAYOUTS = [["--dp", "2", "--pp", "2"], ["--tp", "2", "--sp", "--pp", "2", "--microbatches", "4"],
           ["--dp", "2", "--pp", "2", "--virtual-stages", "2", "--microbatches", "2"]]


def _reference(args, config):
    from hybridpar_ext.models import GPT
    from hybridpar_ext.train.token_data import train_and_eval_batches

    torch.manual_seed(args.seed)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    train, held = train_and_eval_batches(args, config.vocab_size)
    losses = []
    for step in range(1, args.steps + 1):
        tokens = train(step)
        opt.zero_grad()
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        evals = [model(held(j)[:, :-1], held(j)[:, 1:]).item() for j in range(args.eval_batches)]
    return losses, sum(evals) / len(evals)


def train_and_evaluate(rank, world, path):
    import torch.distributed as dist

    from hybridpar_ext.train import Trainer, check_args, parse_args

    out = []
    for layout in LAYOUTS:
        args = parse_args(BASE + layout + ["--data", path])
        config = check_args(args, world)
        args.dtype = "float32"
        trainer = Trainer(args, config, torch.device("cpu"))
        losses = [trainer.step(step)["loss"] for step in range(1, args.steps + 1)]
        eval_loss = trainer.evaluate()
        if rank == 0:
            ref_losses, ref_eval = _reference(args, config)
            label = " ".join(layout)
            for step, (a, e) in enumerate(zip(losses, ref_losses), 1):
                assert_close_to_reference(torch.tensor(a), torch.tensor(e, dtype=torch.float64), torch.float32,
                                          f"[{label}] loss of step {step}")
            assert_close_to_reference(torch.tensor(eval_loss), torch.tensor(ref_eval, dtype=torch.float64),
                                      torch.float32, f"[{label}] eval loss")
            assert abs(eval_loss - losses[-1]) > 1e-6, "the eval loss is not a training batch's"
            out.append(eval_loss)
        del trainer
        dist.barrier()
    return out


def test_token_file_training_and_pipeline_eval_match_one_process(tmp_path):
    path = tmp_path / "tokens.bin"
    np.random.default_rng(1).integers(0, 300, 3_000, dtype=np.uint16).tofile(path)
    results = run_ranks(train_and_evaluate, 4, timeout=180, path=str(path))
    assert len(results[0]) == len(LAYOUTS)
