"""``python -m hybridpar_ext train --model PATH``: a local Hugging Face model trained by the CLI
under a layout, against the plain model trained in one process on the same batches; and the
launcher refusing a bad --model with one message before any torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hybridpar_ext.testing import assert_close_to_reference, train_reference

transformers = pytest.importorskip("transformers")

SEQ, BATCH, STEPS, LR = 12, 4, 3, 1e-3


def _cli(args, tmp_path, timeout=240):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return subprocess.run([sys.executable, "-m", "hybridpar_ext", "train", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout, env=env)


def _config(family, **overrides):
    common = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64)
    common.update(overrides)
    return {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family](**common)


def _reference_losses(model, vocab, seed=0):
    """The plain model trained in one process with torch AdamW on the trainer's batches."""
    from hybridpar_ext.train import Batches

    def loss_fn(model, inputs, targets):
        logits = model(inputs).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    batches = Batches("synthetic", vocab, SEQ, BATCH, seed)
    return train_reference(model, [batches(s) for s in range(1, STEPS + 1)], LR, loss_fn=loss_fn).losses


@pytest.mark.parametrize("family,weights,layout", [
    ("qwen2", True, ["--tp", "2", "--pp", "2", "--sp"]),          # weights read slice by slice, tied
    ("llama", False, ["--dp", "2", "--tp", "2", "--zero"]),       # random init from config.json
], ids=["qwen2-weights-tp2-pp2-sp", "llama-config-dp2-tp2-zero"])
def test_train_model_path_matches_one_process(tmp_path, family, weights, layout):
    config = _config(family, tie_word_embeddings=weights)
    torch.manual_seed(5)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    path = tmp_path / "model"
    if weights:
        model.save_pretrained(path, max_shard_size="40KB")
    else:
        config.save_pretrained(path)
        torch.manual_seed(0)   # the trainer's --seed: the model's random init on every rank
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    metrics = tmp_path / "metrics.jsonl"
    out = _cli(["--model", str(path), *layout, "--steps", str(STEPS), "--data", "synthetic", "--seq", str(SEQ),
                "--global-batch", str(BATCH), "--lr", str(LR), "--metrics-file", str(metrics)], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert len(losses) == STEPS
    for step, (a, e) in enumerate(zip(losses, _reference_losses(model, config.vocab_size)), 1):
        assert_close_to_reference(torch.tensor(a), torch.tensor(e, dtype=torch.float64), torch.float32,
                                  f"{family} loss of step {step}")


def test_launcher_refuses_a_bad_model_before_torchrun(tmp_path, monkeypatch, capsys):
    """One message and exit status 2 from the launching process's main (called here, in this
    process: a Python start-up per case cost more than the checks): a missing directory, an
    architecture with no plan, a layout it cannot split. The rest of the messages:
    test_hf_parallel.py's config checks."""
    from hybridpar_ext.cli import main

    _config("llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=3).save_pretrained(tmp_path / "kv3")
    transformers.GemmaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1, head_dim=16).save_pretrained(tmp_path / "gemma")
    cases = [
        (["--model", "absent"], "--model: 'absent' is neither 'gpt' nor a directory"),
        (["--model", "gemma"], "--model: no parallel plan for"),
        (["--model", "kv3", "--tp", "2"], "kv_heads (3) must be divisible by the tensor-parallel size (2)"),
    ]
    monkeypatch.chdir(tmp_path)
    for var in ("RANK", "WORLD_SIZE"):   # as a user's shell: not a torchrun rank
        monkeypatch.delenv(var, raising=False)
    for flags, message in cases:
        code = main(["train", *flags, "--steps", "1", "--data", "synthetic"])
        out = capsys.readouterr()
        assert code == 2, (flags, out.out[-2000:], out.err[-2000:])
        assert message in out.err, (flags, out.err[-2000:])
