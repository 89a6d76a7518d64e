"""Checkpoints through the trainer's command line, as a user runs them: a run killed while
saving resumes (under another layout, saving asynchronously, keeping the newest 2) from the
previous complete checkpoint with the uninterrupted run's losses; ``export`` gives the trained
model's logits in a plain GPT; ``--init-from`` starts another layout from the export."""

import json
import os
import subprocess
import sys

import torch

from hybridpar_ext.testing import assert_close_to_reference

FLAGS = ["--layers", "3", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--ffn", "96", "--seq", "12",
         "--global-batch", "4", "--lr", "3e-3", "--seed", "9", "--timeout", "60", "--quiet"]


def _train(tmp_path, flags, env=None, check=True):
    cmd = [sys.executable, "-m", "hybridpar_ext", "train", *FLAGS, *flags]
    env = dict({k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}, **(env or {}))
    # Outside the source tree, so the installed package is what runs.
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, open(path).read().splitlines())}


def _config():
    from hybridpar_ext.models import GPTConfig
    from hybridpar_ext.train import model_config, parse_args

    config = model_config(parse_args(FLAGS))
    assert isinstance(config, GPTConfig)
    return config


def _reference_model(steps):
    """The same training in one process: plain GPT, whole batches, torch AdamW."""
    from hybridpar_ext.models import GPT
    from hybridpar_ext.train import Batches, parse_args

    args = parse_args(FLAGS)
    torch.manual_seed(args.seed)
    model = GPT(_config())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    batches = Batches(args.data, model.config.vocab_size, args.seq, args.global_batch, args.seed)
    for step in range(1, steps + 1):
        tokens = batches(step)
        opt.zero_grad()
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()
    return model, batches


def test_killed_mid_save_resumes_and_export_gives_the_trained_model(tmp_path):
    from safetensors.torch import load_file

    from hybridpar_ext.checkpoint import complete_checkpoints
    from hybridpar_ext.checkpoint.manager import CRASH_ENV
    from hybridpar_ext.models import GPT

    full, crashed = tmp_path / "full", tmp_path / "crashed"
    _train(tmp_path, ["--dp", "2", "--steps", "6", "--checkpoint-dir", str(full), "--save-every", "3",
                      "--metrics-file", str(tmp_path / "full.jsonl")])
    assert [s for s, _ in complete_checkpoints(full)] == [3, 6]

    # Rank 1 dies in the save of step 4, after writing its files: step 4 never commits.
    done = _train(tmp_path, ["--dp", "2", "--steps", "6", "--checkpoint-dir", str(crashed), "--save-every", "2"],
                  env={CRASH_ENV: "4:1"}, check=False)
    assert done.returncode != 0
    assert [s for s, _ in complete_checkpoints(crashed)] == [2]
    assert (crashed / "step_00000004.tmp").is_dir() and any((crashed / "step_00000004.tmp").iterdir())

    # Resumed from step 2 under tp 2, saving every step asynchronously, keeping 2.
    _train(tmp_path, ["--tp", "2", "--steps", "6", "--checkpoint-dir", str(crashed), "--resume", "--save-every", "1",
                      "--keep", "2", "--async-save", "--metrics-file", str(tmp_path / "resumed.jsonl")])
    assert [s for s, _ in complete_checkpoints(crashed)] == [5, 6]
    assert not list(crashed.glob("*.tmp"))
    reference, resumed = _losses(tmp_path / "full.jsonl"), _losses(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == [3, 4, 5, 6]
    for step, loss in resumed.items():
        assert_close_to_reference(torch.tensor(loss), torch.tensor(reference[step], dtype=torch.float64),
                                  torch.float32, f"resumed loss of step {step}")

    # export: a plain GPT loads it strictly and gives the trained model's logits.
    out = tmp_path / "export"
    done = subprocess.run([sys.executable, "-m", "hybridpar_ext", "export", str(full), str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    model = GPT(_config())
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    trained, batches = _reference_model(6)
    tokens = batches(7)[:, :-1]
    with torch.no_grad():
        assert_close_to_reference(model(tokens), trained(tokens).double(), torch.float32, "exported logits")

    # --init-from: tp 2 starts from the export; its first loss is the exported model's.
    _train(tmp_path, ["--tp", "2", "--steps", "1", "--init-from", str(out),
                      "--metrics-file", str(tmp_path / "init.jsonl")])
    first = batches(1)
    with torch.no_grad():
        expected = model(first[:, :-1], first[:, 1:])
    assert_close_to_reference(torch.tensor(_losses(tmp_path / "init.jsonl")[1]), expected.double(), torch.float32,
                              "first loss after --init-from")


def test_bad_checkpoint_flags_are_refused_before_launch(tmp_path):
    from hybridpar_ext.train import check_args, parse_args

    cases = [(["--save-every", "2"], "--save-every needs --checkpoint-dir"),
             (["--checkpoint-dir", str(tmp_path), "--keep", "1"], "--keep must be at least 2"),
             (["--checkpoint-dir", str(tmp_path / "empty"), "--resume"], "--resume: no complete checkpoint"),
             (["--init-from", str(tmp_path)], "is not an export")]
    for flags, message in cases:
        try:
            check_args(parse_args(FLAGS + flags), 1)
        except ValueError as err:
            assert message in str(err), (flags, str(err))
        else:
            raise AssertionError(f"{flags} was accepted")
