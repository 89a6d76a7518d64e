"""Loading weights from a save_pretrained directory slice by slice (parallel.loading)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hybridpar_ext.parallel import loading
from hybridpar_ext.parallel.plan import materialize
from hybridpar_ext.parallel.spec import (Segment, ShardSpec, block_segments, padded_segments,
                                         replicated_spec, set_shard_specs)
from hybridpar_ext.parallel.state_dict import shard_tensor

transformers = pytest.importorskip("transformers")


def _llama(tie, **overrides):
    config = dict(vocab_size=101, hidden_size=96, intermediate_size=136, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=tie)
    config.update(overrides)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()


@pytest.fixture(scope="module", params=["single", "sharded"])
def saved(request, tmp_path_factory):
    """A tiny LLaMA (untied head) saved as one file or as several with an index."""
    model = _llama(tie=False)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, max_shard_size="40KB" if request.param == "sharded" else "1GB")
    has_index = os.path.exists(path / loading.INDEX_FILE)
    assert has_index == (request.param == "sharded")
    return path, model


def _specs(shape, tp, rank):
    """Specs of every kind, over a weight of `shape`: rows, columns, a fused [q; k; v] with
    replicated kv heads, padding, replication."""
    rows, cols = shape
    pad_segments, padding = padded_segments(rows, tp, rank)
    return {
        "rows": ShardSpec(shape, 0, (Segment(rank * rows // tp, rows // tp),)),
        "columns": ShardSpec(shape, 1, (Segment(rank * cols // tp, cols // tp),)),
        "fused": ShardSpec(shape, 0, block_segments([64, 16, 16], 16, tp, rank, "qkv", (1, 2))),
        "padded": ShardSpec(shape, 0, pad_segments, padding=padding),
        "replicated": replicated_spec(shape, tp, rank),
    }


@pytest.mark.parametrize("tp,rank", [(2, 1), (4, 3)])
def test_read_shard_equals_the_slice_of_the_whole(saved, tp, rank):
    path, model = saved
    full = model.model.layers[1].self_attn.q_proj.weight.detach()
    assert full.shape == (96, 96)
    for kind, spec in _specs((96, 96), tp, rank).items():
        got = loading.read_shard(path, "model.layers.1.self_attn.q_proj.weight", spec)
        assert got.shape == spec.local_shape, kind
        torch.testing.assert_close(got, shard_tensor(full, spec), atol=0, rtol=0, msg=kind)
        assert got.untyped_storage().nbytes() == got.numel() * got.element_size(), \
            f"{kind}: the local tensor must own its memory, not view the mapped file"
    # A vocabulary of 101 over 4 ranks: the last rank holds 23 rows and 3 padding rows.
    spec = ShardSpec((101, 96), 0, *padded_segments(101, 4, 3))
    got = loading.read_shard(path, "lm_head.weight", spec, dtype=torch.float64)
    assert got.dtype == torch.float64 and got.shape == (26, 96)
    torch.testing.assert_close(got, shard_tensor(model.lm_head.weight.detach().double(), spec))
    assert not got[23:].any()


def test_read_shard_errors(saved, tmp_path):
    path, _ = saved
    with pytest.raises(KeyError, match="no tensor named 'model.nope'"):
        loading.read_shard(path, "model.nope")
    with pytest.raises(ValueError, match=r"has shape \(96, 96\), the model expects \(96, 48\)"):
        loading.read_shard(path, "model.layers.0.self_attn.q_proj.weight",
                           ShardSpec((96, 48), 0, (Segment(0, 48),)))
    with pytest.raises(FileNotFoundError, match="holds neither model.safetensors nor"):
        loading.read_shard(tmp_path, "x")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        loading.read_shard(tmp_path / "absent", "x")
    (tmp_path / loading.INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors, which is missing"):
        loading.read_shard(tmp_path, "a")


@pytest.mark.parametrize("tie", [False, True])
def test_loading_a_meta_model_gives_the_saved_model(tmp_path, tie):
    model = _llama(tie)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    with loading.meta_parameters():
        empty = transformers.LlamaForCausalLM(model.config).eval()
    assert all(p.is_meta for p in empty.parameters())
    assert not any(b.is_meta for b in empty.buffers())  # rotary inv_freq computed as usual
    loaded = loading.load_safetensors(empty, tmp_path)
    if tie:
        assert loaded["lm_head.weight"] == "model.embed_tokens.weight"
        assert empty.lm_head.weight is empty.model.embed_tokens.weight
    expected = model.state_dict()
    assert empty.state_dict().keys() == expected.keys()
    for name, value in empty.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=0, rtol=0, msg=name)
    ids = torch.randint(0, 101, (2, 13))
    torch.testing.assert_close(empty(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("allocated", [False, True], ids=["meta", "allocated"])
def test_loading_fills_local_shards_from_their_specs(saved, allocated):
    path, model = saved
    tp, rank = 4, 2
    with loading.meta_parameters():
        empty = transformers.LlamaForCausalLM(model.config)
    # What a parallel plan would leave: local-shaped meta parameters carrying their specs.
    attn = empty.model.layers[2].self_attn
    specs = _specs((96, 96), tp, rank)
    attn.q_proj.weight = torch.nn.Parameter(torch.empty(specs["rows"].local_shape, device="meta"))
    set_shard_specs(attn.q_proj, {"weight": specs["rows"]})
    attn.o_proj.weight = torch.nn.Parameter(torch.empty(specs["columns"].local_shape, device="meta"))
    set_shard_specs(attn.o_proj, {"weight": specs["columns"]})
    vocab = ShardSpec((101, 96), 0, *padded_segments(101, tp, rank))
    empty.lm_head.weight = torch.nn.Parameter(torch.empty(vocab.local_shape, device="meta"))
    set_shard_specs(empty.lm_head, {"weight": vocab})
    if allocated:   # what parallelize_module + plan.materialize leave: empty local tensors, filled in place
        materialize(empty, dtype=torch.float64)
        before = dict(empty.named_parameters())
    loading.load_safetensors(empty, path, dtype=torch.float64)
    if allocated:
        assert all(p is before[n] for n, p in empty.named_parameters())
    plain = model.state_dict()
    for name, spec in [("model.layers.2.self_attn.q_proj.weight", specs["rows"]),
                       ("model.layers.2.self_attn.o_proj.weight", specs["columns"]),
                       ("lm_head.weight", vocab)]:
        got = empty.get_parameter(name)
        assert got.dtype == torch.float64 and got.requires_grad
        torch.testing.assert_close(got, shard_tensor(plain[name].double(), spec), atol=0, rtol=0)
    torch.testing.assert_close(empty.model.norm.weight, plain["model.norm.weight"].double())


def test_loading_refuses_missing_and_misshapen_tensors(saved):
    path, model = saved
    config = transformers.LlamaConfig(**{**model.config.to_dict(), "num_hidden_layers": 4})
    with loading.meta_parameters():
        deeper = transformers.LlamaForCausalLM(config)
    with pytest.raises(KeyError, match="no tensor for the param 'model.layers.3.self_attn.q_proj.weight'"):
        loading.load_safetensors(deeper, path)
    assert all(p.is_meta for p in deeper.parameters()), "nothing is allocated before the checks"
    config = transformers.LlamaConfig(**{**model.config.to_dict(), "intermediate_size": 140})
    with loading.meta_parameters():
        wider = transformers.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match=r"gate_proj.weight' of shape \(136, 96\), .* expects \(140, 96\)"):
        loading.load_safetensors(wider, path)


# A fresh process loads a model of ~90 MB as tensor-parallel rank 1 of 4 (or whole), and reports
# how far its resident set's high-water mark (VmHWM, reset just before loading: getrusage's
# ru_maxrss would carry the forking parent's) rose while loading, in bytes.
_MEASURE = textwrap.dedent("""
    import ctypes, json, sys
    import torch, transformers
    from hybridpar_ext.parallel import loading
    from hybridpar_ext.parallel.spec import ShardSpec, Segment, set_shard_specs

    path, tp = sys.argv[1], int(sys.argv[2])
    with loading.meta_parameters():
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(path))
    if tp > 1:
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                shape = tuple(module.weight.shape)
                dim = 1 if name.endswith(("o_proj", "down_proj")) else 0  # row-parallel: columns
                spec = ShardSpec(shape, dim, (Segment(shape[dim] // tp, shape[dim] // tp),))
                module.weight = torch.nn.Parameter(torch.empty(spec.local_shape, device="meta"))
                set_shard_specs(module, {"weight": spec})
    def status(field):  # kB in /proc/self/status
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS: RSS is what is held
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark starts again from the current RSS
    before = status("VmRSS")
    loading.load_safetensors(model, path)
    peak = status("VmHWM")
    local = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"growth": peak - before, "local": local}))
""")


def _load_growth(path, tp):
    # Outside the source tree (python -c puts the working directory on sys.path), so the
    # installed package is what runs, as in a CUDA build installed beside the checkout.
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(tp)], capture_output=True,
                         text=True, timeout=120, cwd=path)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's malloc_trim")
def test_a_rank_loading_its_shard_holds_about_its_shard(tmp_path):
    # Layers outweigh the embeddings, so that no single tensor is a large part of the model.
    model = _llama(False, vocab_size=4000, hidden_size=512, intermediate_size=1536,
                   num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(tmp_path, max_shard_size="30MB")
    del model
    shard = _load_growth(tmp_path, 4)
    whole = _load_growth(tmp_path, 1)
    assert shard["local"] == pytest.approx(model_bytes / 4, rel=0.01)
    assert whole["local"] == model_bytes
    # A rank holds its quarter, plus while reading at most one tensor's mapped pages (a
    # row-parallel weight's column slice touches all of that tensor's pages) and its copy.
    assert shard["growth"] < shard["local"] + 2 * largest, (shard, model_bytes)
    assert shard["growth"] < 0.5 * model_bytes, (shard, model_bytes)
    # The same accounting sees the whole model when the whole model is loaded.
    assert whole["growth"] >= model_bytes, (whole, model_bytes)
