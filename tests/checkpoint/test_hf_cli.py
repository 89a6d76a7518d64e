"""Checkpoints and recomputation of ``train --model PATH`` through the command line: a tiny
LLaMA (GQA 4:1 heads, a vocabulary of 101, padded at tp 2; random init from config.json)
trained 4 steps under dp 2 saving at step 2, resumed from that checkpoint under tp 2, gives
the uninterrupted run's losses for steps 3-4; ``export`` writes a directory
``from_pretrained`` loads with the logits of the same training done in one process;
``--init-from`` starts tp 2 from it; ``--recompute full`` leaves the losses as they were
(selective is refused under tp > 1)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from hybridpar_ext.testing import assert_close_to_reference

transformers = pytest.importorskip("transformers")

SEQ, BATCH, STEPS, LR, SEED = 12, 4, 4, 3e-3, 7


def _config():
    return transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64)


def _cli(tmp_path, *args, timeout=240):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    # Outside the source tree, so the installed package is what runs.
    done = subprocess.run([sys.executable, "-m", "hybridpar_ext", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _train(tmp_path, model, metrics, *flags):
    return _cli(tmp_path, "train", "--model", str(model), "--data", "synthetic", "--seq", str(SEQ),
                "--global-batch", str(BATCH), "--lr", str(LR), "--seed", str(SEED), "--timeout", "60", "--quiet",
                "--metrics-file", str(metrics), *flags)


def _losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())}


def _reference():
    """The plain model trained in one process (torch AdamW, whole batches), the trainer's batches."""
    from hybridpar_ext.train import Batches

    torch.manual_seed(SEED)   # the trainer's --seed: the model's random init on every rank
    model = transformers.AutoModelForCausalLM.from_config(_config(), attn_implementation="eager")
    batches = Batches("synthetic", 101, SEQ, BATCH, SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    for step in range(1, STEPS + 1):
        tokens = batches(step)
        opt.zero_grad()
        logits = model(tokens[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
    return model, batches


def _close(actual, expected, what):
    assert_close_to_reference(torch.as_tensor(actual), torch.as_tensor(expected).double(), torch.float32, what)


def test_hf_model_saves_resumes_under_tp2_exports_and_recomputes(tmp_path):
    from hybridpar_ext.checkpoint import complete_checkpoints

    model_dir = tmp_path / "llama"
    _config().save_pretrained(model_dir)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _train(tmp_path, model_dir, tmp_path / "full.jsonl", "--dp", "2", "--steps", str(STEPS),
           "--checkpoint-dir", str(full), "--save-every", "2")
    saved = complete_checkpoints(full)
    assert [s for s, _ in saved] == [2, 4]

    # Only step 2's checkpoint, resumed under tp 2 up to step 4.
    resumed.mkdir()
    shutil.copytree(saved[0][1], resumed / os.path.basename(saved[0][1]))
    _train(tmp_path, model_dir, tmp_path / "resumed.jsonl", "--tp", "2", "--steps", str(STEPS),
           "--checkpoint-dir", str(resumed), "--resume")
    uninterrupted, after = _losses(tmp_path / "full.jsonl"), _losses(tmp_path / "resumed.jsonl")
    assert sorted(after) == [3, 4]
    for step, loss in after.items():
        _close(loss, uninterrupted[step], f"resumed loss of step {step}")

    # export: from_pretrained loads it and gives the one-process training's logits.
    out = tmp_path / "export"
    _cli(tmp_path, "export", str(full), str(out), timeout=120)
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager")
    trained, batches = _reference()
    tokens = batches(STEPS + 1)
    with torch.no_grad():
        _close(exported(tokens[:, :-1]).logits, trained(tokens[:, :-1]).logits, "exported logits")

    # --init-from under tp 2: its first loss is the exported model's on batch 1; and
    # --recompute selective on the decoder layers: the losses of the run without it.
    _train(tmp_path, model_dir, tmp_path / "init.jsonl", "--tp", "2", "--steps", "1", "--init-from", str(out))
    first = batches(1)
    with torch.no_grad():
        logits = exported(first[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), first[:, 1:].flatten())
    _close(_losses(tmp_path / "init.jsonl")[1], expected, "first loss after --init-from")

    _train(tmp_path, model_dir, tmp_path / "recompute.jsonl", "--tp", "2", "--steps", "2", "--recompute", "full")
    recomputed = _losses(tmp_path / "recompute.jsonl")
    assert sorted(recomputed) == [1, 2]
    for step, loss in recomputed.items():
        _close(loss, uninterrupted[step], f"loss of step {step} under --recompute full")


def test_selective_recompute_under_tp_is_refused_for_hf_models(tmp_path):
    """Its gradients differ from the run without it there: refused by name before launch;
    at tp 1 it is taken."""
    from hybridpar_ext.train import check_args, parse_args

    _config().save_pretrained(tmp_path)
    flags = ["--model", str(tmp_path), "--data", "synthetic", "--seq", str(SEQ), "--recompute", "selective"]
    with pytest.raises(ValueError, match="--recompute selective does not take --model PATH with --tp > 1"):
        check_args(parse_args(flags + ["--tp", "2"]), 2)
    check_args(parse_args(flags + ["--dp", "2"]), 2)
