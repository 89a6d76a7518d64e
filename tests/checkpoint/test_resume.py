"""Resume under another layout: 6 steps under dp2 x tp2 saving at step 3; resumed from that
checkpoint under tp2 (SP) x pp2 with ZeRO-1, dp2 x pp2 with ZeRO-1 over 4 microbatches, and
dp1 tp1 pp2 (also interleaved, two chunks per rank), steps 4-6 have the uninterrupted run's losses within fp32 tolerance. The
optimizer's moments and step, the LR schedule (warm-up then cosine) and the data position all
have to come back for that: a resume that lost any of them drifts at step 4."""

import shutil

import torch

from hybridpar_ext.testing import assert_close_to_reference, run_ranks

# kv heads 1 < tp 2 (replicated), [gate; up], a vocabulary padded at tp 2, 5 layers on 2 stages
# (3 + 2), or on 4 interleaved chunks.
MODEL = ["--layers", "5", "--hidden", "64", "--heads", "4", "--kv-heads", "1", "--ffn", "80", "--seq", "12",
         "--vocab", "97", "--data", "synthetic", "--norm", "rmsnorm", "--mlp", "swiglu"]
RUN = ["--global-batch", "8", "--steps", "6", "--lr", "3e-3", "--weight-decay", "0.01", "--seed", "5",
       "--warmup-steps", "2", "--lr-decay", "cosine", "--min-lr", "1e-4"]


def _train(flags, world):
    import torch.distributed as dist

    from hybridpar_ext.train import Trainer, check_args, parse_args

    args = parse_args(MODEL + RUN + flags)
    config = check_args(args, world)
    args.dtype = "float32"
    trainer = Trainer(args, config, torch.device("cpu"))
    losses = {}
    for step in range(trainer.checkpoints.start, args.steps + 1):
        losses[step] = trainer.step(step)["loss"]
        trainer.checkpoints.after_step(step)
    trainer.checkpoints.close()
    del trainer
    dist.barrier()
    return losses


def train_save_and_resume(rank, world, directory):
    import torch.distributed as dist

    out = {"uninterrupted": _train(["--dp", "2", "--tp", "2", "--checkpoint-dir", directory, "--save-every", "3"],
                                   world)}
    if rank == 0:   # resume from step 3: the run's last checkpoint (step 6) goes
        shutil.rmtree(f"{directory}/step_00000006")
    dist.barrier()
    for label, flags in (("tp2 sp pp2 zero", ["--tp", "2", "--sp", "--pp", "2", "--zero"]),
                         ("dp2 pp2 zero m4", ["--dp", "2", "--pp", "2", "--zero", "--microbatches", "4"])):
        out[label] = _train(flags + ["--checkpoint-dir", directory, "--resume"], world)
    return out


def resume_on_two(rank, world, directory):
    out = {"pp2": _train(["--pp", "2", "--checkpoint-dir", directory, "--resume"], world)}
    out["pp2 interleaved v2"] = _train(["--pp", "2", "--virtual-stages", "2", "--microbatches", "2",
                                        "--checkpoint-dir", directory, "--resume"], world)
    return out


def test_resume_under_other_layouts_matches_the_uninterrupted_run(tmp_path):
    directory = str(tmp_path / "ckpt")
    results = run_ranks(train_save_and_resume, 4, timeout=300, directory=directory)[0]
    results.update(run_ranks(resume_on_two, 2, timeout=180, directory=directory)[0])
    reference = {int(k): v for k, v in results.pop("uninterrupted").items()}
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    for label, losses in results.items():
        losses = {int(k): v for k, v in losses.items()}
        assert sorted(losses) == [4, 5, 6], f"{label}: resumed at the wrong step: {sorted(losses)}"
        for step, loss in losses.items():
            assert_close_to_reference(torch.tensor(loss), torch.tensor(reference[step], dtype=torch.float64),
                                      torch.float32, f"{label}: loss of step {step}")
