"""Activation recomputation under tensor (with and without sequence) and pipeline parallelism:
selective and full give the losses and the first step's gradients of the same run without
recomputation. The collectives inside the layers (tensor-parallel all-reduces and the
overlapped all-gather/reduce-scatter matmuls) are kept by selective recomputation and rerun
by full recomputation in the same order on every rank, so neither may hang or differ."""

import torch

from hybridpar_ext.testing import assert_close_to_reference, run_ranks

BASE = ["--layers", "3", "--hidden", "64", "--heads", "4", "--kv-heads", "1", "--ffn", "96", "--seq", "12",
        "--global-batch", "4", "--steps", "2", "--lr", "3e-3", "--seed", "3", "--data", "synthetic",
        "--vocab", "96"]
LAYOUTS = [["--tp", "2", "--sp", "--pp", "2", "--microbatches", "2", "--mlp", "swiglu", "--norm", "rmsnorm"],
           ["--dp", "2", "--tp", "2", "--no-overlap", "--untied"]]


def run_modes(rank, world):
    import torch.distributed as dist

    from hybridpar_ext.train import Trainer, check_args, parse_args
    from hybridpar_ext.train.recompute import transformer_layers

    checked = []
    for layout in LAYOUTS:
        runs = {}
        for mode in ("none", "selective", "full"):
            args = parse_args(BASE + layout + ["--recompute", mode])
            config = check_args(args, world)
            args.dtype = "float32"
            trainer = Trainer(args, config, torch.device("cpu"))
            layers = transformer_layers(trainer.stage)
            assert layers and all(getattr(layer, "_recompute", None) == (None if mode == "none" else mode)
                                  for layer in layers)
            losses = [trainer.step(1)["loss"]]
            grads = {n: p.grad.detach().clone() for n, p in trainer.stage.named_parameters()}
            losses.append(trainer.step(2)["loss"])
            runs[mode] = losses, grads
            del trainer
            dist.barrier()
        label = " ".join(layout)
        for mode in ("selective", "full"):
            for step, (a, e) in enumerate(zip(runs[mode][0], runs["none"][0]), 1):
                assert_close_to_reference(torch.tensor(a), torch.tensor(e, dtype=torch.float64), torch.float32,
                                          f"[{label}] {mode}: loss of step {step}")
            for name, g in runs["none"][1].items():
                assert_close_to_reference(runs[mode][1][name], g.double(), torch.float32,
                                          f"[{label}] {mode}: grad {name}")
        checked.append(label)
    return checked


def test_recomputation_gives_the_same_losses_and_gradients():
    results = run_ranks(run_modes, 4, timeout=240)
    assert all(len(r) == len(LAYOUTS) for r in results)
