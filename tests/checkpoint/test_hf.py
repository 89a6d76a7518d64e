"""Checkpoints of a Hugging Face model (Qwen2: q/k/v biases; one kv head, replicated at tp 2;
a vocabulary of 101, padded at tp 2; tied embeddings): saved with tp 2, every weight comes
back bitwise under pp 2 (the tied head then a copy on the last stage) and dp 2; ``export`` writes
a directory ``from_pretrained`` loads, with the model's weights and logits."""

import pytest
import torch

from hybridpar_ext.testing import assert_close_to_reference, run_ranks

transformers = pytest.importorskip("transformers")


def _config():
    return transformers.Qwen2Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                    tie_word_embeddings=True, rms_norm_eps=1e-5)


def _plain_model():
    """The plain model with every weight moved off its initialisation."""
    torch.manual_seed(4)
    model = transformers.AutoModelForCausalLM.from_config(_config(), attn_implementation="eager")
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def save_tp2(rank, world, directory):
    from hybridpar_ext.checkpoint import Checkpointer
    from hybridpar_ext.checkpoint.export import hf_config_dict, model_description
    from hybridpar_ext.parallel import init_mesh
    from hybridpar_ext.parallel.plans.llama import parallelize_decoder

    mesh = init_mesh(dp=1, tp=2, pp=1)
    model = _plain_model()
    stage = parallelize_decoder(model, mesh)
    optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-3)
    info = {"model": model_description(model.config), "hf_config": hf_config_dict(model.config)}
    Checkpointer(directory).save(1, stage, optimizer, mesh, {"step": 1}, info)
    return True


def load_and_compare(rank, world, directory, layouts):
    from hybridpar_ext.checkpoint import Checkpointer, latest_checkpoint
    from hybridpar_ext.parallel import gather_state_dict, init_mesh
    from hybridpar_ext.parallel.plans.llama import parallelize_decoder

    expected = _plain_model().state_dict()
    checkpoints = Checkpointer(directory)
    for dp, tp, pp in layouts:
        mesh = init_mesh(dp=dp, tp=tp, pp=pp)
        torch.manual_seed(123)
        stage = parallelize_decoder(transformers.AutoModelForCausalLM.from_config(_config()), mesh)
        optimizer = torch.optim.AdamW(stage.parameters(), lr=1e-3)
        checkpoints.load(latest_checkpoint(directory)[1], stage, optimizer, mesh)
        full = gather_state_dict(stage, mesh)
        assert set(full) <= set(expected) and len(full) >= len(expected) - 1, sorted(set(full) ^ set(expected))
        different = [n for n, w in full.items() if not torch.equal(w, expected[n])]
        assert not different, f"dp{dp} tp{tp} pp{pp}: not bitwise equal after the load: {different}"
    return True


def save_and_reload(rank, world, directory, layouts):
    """save_tp2, then load_and_compare, in one launch (starting the processes costs more than
    either)."""
    import torch.distributed as dist

    saved = save_tp2(rank, world, directory)
    dist.barrier()
    return saved and load_and_compare(rank, world, directory, layouts)


def test_hf_checkpoint_reshards_and_exports_for_from_pretrained(tmp_path):
    from hybridpar_ext.checkpoint import export_checkpoint

    directory, out = str(tmp_path / "ckpt"), tmp_path / "export"
    assert run_ranks(save_and_reload, 2, timeout=300, directory=directory,
                     layouts=[(1, 1, 2), (2, 1, 1)]) == [True, True]

    export_checkpoint(directory, out)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager")
    plain = _plain_model()
    for name, w in plain.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], w), name
    tokens = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_to_reference(loaded(tokens).logits, plain(tokens).logits.double(), torch.float32,
                                  "logits of the exported model")
