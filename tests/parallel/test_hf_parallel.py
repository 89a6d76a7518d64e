"""Hugging Face LLaMA, Qwen2 and Mistral through the decoder plan (parallel/plans/llama.py):
trained under DP x TP x PP layouts against the plain Hugging Face model trained in one process
with torch.optim.AdamW on the same batches. Each case checks that the stages start from the
plain model's weights (their gathered state_dict loads strictly into a fresh plain model and
gives its logits), the loss of each of 3 steps, and every gathered gradient of the first step
elementwise (only the first: see test_hybrid_parity.py on why later gradients are not
compared elementwise).

The cases cover, rather than cross, the dimensions: every layout of the issue; each of the
three families in several layouts; kv heads fewer than TP (replicated), equal to it and more;
tied embeddings on one stage and across stages; sequence parallelism; ZeRO-1; one and several
microbatches; an odd vocabulary (padded under TP); an embedding padding_idx (Qwen2 cases); 3
layers, split unevenly over 2 stages; interleaved 1F1B (5 layers in 2 chunks per rank).
"""

import pytest
import torch

from hybridpar_ext.testing import assert_close_to_reference, run_ranks, train_reference

transformers = pytest.importorskip("transformers")

STEPS, SEQ, BATCH, LR, WD = 3, 12, 8, 3e-3, 0.01
LOAD_FROM_DIRECTORY = (1, 2, 2)   # where the stages are also read from a save_pretrained directory
PAD = 3   # Qwen2's pad_token_id here: every batch holds it, in both halves of the sequence (SP)

# (family, kv heads, tied, sp, zero, microbatches[, virtual stages]) per layout (dp, tp, pp).
CASES = {
    (2, 1, 1): [("llama", 2, True, False, True, 1), ("mistral", 4, False, False, False, 2)],
    (1, 2, 1): [("llama", 1, False, True, False, 1), ("qwen2", 2, True, False, False, 2)],
    (1, 1, 2): [("qwen2", 2, True, False, False, 2), ("mistral", 1, False, False, False, 4),
                ("llama", 2, True, False, False, 4, 2)],   # interleaved: 2 chunks per rank
    (2, 2, 1): [("mistral", 1, True, True, True, 1)],
    (1, 2, 2): [("llama", 1, True, True, False, 2)],
    (2, 2, 2): [("qwen2", 1, True, True, True, 2)],
}


def tiny_config(family, kv_heads, tied, layers=3):
    """head_dim 16 (4 heads), an FFN of 96 and a vocabulary of 101 (odd: padded under TP)."""
    common = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                  tie_word_embeddings=tied, rms_norm_eps=1e-5)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":   # q/k/v biases; a padding token, whose embedding row gets no gradient
        return transformers.Qwen2Config(**common, pad_token_id=PAD)
    return transformers.MistralConfig(**common, sliding_window=5)   # shorter than SEQ


def plain_model(config, seed):
    """The plain Hugging Face model (its own eager attention and norms), the same on every rank;
    norm weights and biases moved off their init so that a wrong split of them would show."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batches(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]
    for tokens in out:
        tokens[::2, 4] = PAD
        tokens[1::2, 9] = PAD
    return out


def reference_run(config, seed):
    def loss_fn(model, inputs, targets):
        logits = model(inputs).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    return train_reference(plain_model(config, seed), batches(config.vocab_size, seed), LR, WD, loss_fn=loss_fn)


def parallel_run(config, seed, mesh, sp, zero, m, v=1):
    """3 steps of this rank's stage (or its `v` interleaved chunks); returns (losses, gathered
    first-step grads, gathered initial state)."""
    import torch.distributed as dist

    from hybridpar_ext.parallel import GradientSync, PipelineSchedule, ZeroAdamW, gather_state_dict
    from hybridpar_ext.parallel.pipeline import build_chunks
    from hybridpar_ext.parallel.plans.llama import build_decoder_stage, parallelize_decoder

    model = plain_model(config, seed)
    if v == 1:
        stage = parallelize_decoder(model, mesh, sequence_parallel=sp)
        parts = [stage]
    else:
        stage = build_chunks(lambda ids, first, last: build_decoder_stage(model, mesh, ids, first, last, sp),
                             config.num_hidden_layers, mesh.pp, v, mesh.pp_rank)
        parts = list(stage)

    def gathered(tensors_of):   # chunk k of every rank, gathered; then all chunks together
        out = {}
        for part in parts:
            out.update(gather_state_dict(part, mesh, tensors=tensors_of(part)))
        return out

    initial = gathered(lambda part: None)
    sync = GradientSync(stage, mesh.dp_group, zero=zero)
    opt = ZeroAdamW(sync, lr=LR, weight_decay=WD) if zero else torch.optim.AdamW(
        stage.parameters(), lr=LR, weight_decay=WD)
    schedule = PipelineSchedule(stage, mesh.pp_group, m, no_sync=sync.no_sync,
                                schedule="interleaved" if v > 1 else "1f1b")
    share = BATCH // mesh.dp
    losses, grads = [], None
    for tokens in batches(config.vocab_size, seed):
        rows = tokens[mesh.dp_rank * share:(mesh.dp_rank + 1) * share]
        opt.zero_grad()
        stats = schedule.step(list(rows[:, :-1].chunk(m)), list(rows[:, 1:].chunk(m)))
        sync.finish()
        stage.finish_grads()
        if grads is None:
            averaged = sync.averaged_grads()
            grads = gathered(lambda part: {n: averaged[p].detach().clone()
                                           for n, p in part.named_parameters(remove_duplicate=False)})
        opt.step()
        counts = stage.is_last and mesh.tp_rank == 0
        loss = torch.tensor([stats.loss if counts else 0.0], dtype=torch.float64)
        dist.all_reduce(loss)
        losses.append(loss.item() / mesh.dp)
    return losses, grads, initial


def check_loading_from_directory(config, seed, mesh, sp, tmp, label):
    """The stage read slice by slice from a save_pretrained directory (sharded files) holds
    exactly what the stage split from the plain model holds."""
    import torch.distributed as dist

    from hybridpar_ext.parallel.plans.llama import load_decoder_stage, parallelize_decoder

    model = plain_model(config, seed)
    if dist.get_rank() == 0:
        model.save_pretrained(tmp, max_shard_size="30KB")
    dist.barrier()
    loaded = load_decoder_stage(tmp, mesh, sequence_parallel=sp).state_dict()
    split = parallelize_decoder(model, mesh, sequence_parallel=sp).state_dict()
    assert loaded.keys() == split.keys(), f"[{label}] {sorted(set(loaded) ^ set(split))}"
    for name, value in split.items():
        assert torch.equal(loaded[name], value), f"[{label}] {name} loaded from the directory differs"


def train_and_compare(rank, world, dp, tp, pp, tmp):
    import torch.distributed as dist

    from hybridpar_ext.parallel import init_mesh

    mesh = init_mesh(dp=dp, tp=tp, pp=pp, device_type="cpu")
    report = []
    for i, (family, kv, tied, sp, zero, m, *v) in enumerate(CASES[(dp, tp, pp)]):
        v = v[0] if v else 1
        label = (f"dp{dp}-tp{tp}-pp{pp}: {family} kv{kv}{' tied' if tied else ''}{' sp' if sp else ''}"
                 f"{' zero' if zero else ''} m{m}" + (f" v{v}" if v > 1 else ""))
        config, seed = tiny_config(family, kv, tied, layers=3 if v == 1 else 5), 11 + i
        losses, grads, initial = parallel_run(config, seed, mesh, sp, zero, m, v)
        if (dp, tp, pp) == LOAD_FROM_DIRECTORY:
            check_loading_from_directory(config, seed, mesh, sp, tmp, label)
        if rank == 0:
            # The stages' gathered weights are the plain model's, under its own names.
            plain = plain_model(config, seed)
            fresh = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
            fresh.load_state_dict(initial, strict=True)
            tokens = batches(config.vocab_size, seed)[0][:, :-1]
            assert torch.equal(fresh(tokens).logits, plain(tokens).logits), f"[{label}] logits of the gathered weights"
            ref_losses, ref_grads, _ = reference_run(config, seed)
            for step, (a, e) in enumerate(zip(losses, ref_losses), 1):
                assert_close_to_reference(torch.tensor(a), torch.tensor(e, dtype=torch.float64),
                                          torch.float32, f"[{label}] loss of step {step}")
            assert set(grads) == set(ref_grads), f"[{label}] {sorted(set(grads) ^ set(ref_grads))}"
            for name, g in ref_grads.items():
                assert_close_to_reference(grads[name], g.double(), torch.float32, f"[{label}] grad {name}")
            report.append({"case": label, "losses": losses, "reference": ref_losses})
        dist.barrier()
    return report


def check_layouts(rank, world, layouts, tmp):
    """The layouts of one world size one after another in the same processes, each on its
    own mesh."""
    return {f"dp{dp}-tp{tp}-pp{pp}": train_and_compare(rank, world, dp, tp, pp, tmp) for dp, tp, pp in layouts}


# The layouts by world size: starting processes that import torch and transformers is most of
# the cost here, so each world size is one launch.
WORLDS = {w: [lay for lay in CASES if lay[0] * lay[1] * lay[2] == w] for w in (2, 4, 8)}


@pytest.mark.parametrize("world", list(WORLDS), ids=[
    "+".join(f"dp{d}-tp{t}-pp{p}" for d, t, p in layouts) for layouts in WORLDS.values()])
def test_hf_layouts_match_one_process(world, tmp_path):
    layouts = WORLDS[world]
    report = run_ranks(check_layouts, world, timeout=240 * len(layouts), layouts=layouts, tmp=str(tmp_path))[0]
    assert list(report) == [f"dp{d}-tp{t}-pp{p}" for d, t, p in layouts]
    for (dp, tp, pp), cases in zip(layouts, report.values()):
        assert len(cases) == len(CASES[(dp, tp, pp)]), f"dp{dp}-tp{tp}-pp{pp}: cases missing"


def test_configs_the_layout_cannot_split_are_refused():
    from hybridpar_ext.parallel.plans.llama import check_decoder_config

    check_decoder_config(tiny_config("llama", 2, False), 1, 4, 3, True, 12)   # kv heads replicated
    gemma = transformers.GemmaConfig(vocab_size=101, hidden_size=64, intermediate_size=96,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                     head_dim=16)
    cases = [
        (gemma, {}, r"no parallel plan for GemmaConfig \(model_type 'gemma'\); plans exist for "
                    r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
        (tiny_config("llama", 2, False), dict(tp=3),
         r"heads \(4\) must be divisible by the tensor-parallel size \(3\)"),
        (transformers.Qwen2Config(hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                                  intermediate_size=96), dict(tp=2),
         r"kv_heads \(3\) must be divisible by the tensor-parallel size \(2\), or divide it"),
        (transformers.MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                    intermediate_size=90), dict(tp=4),
         r"intermediate_size \(90\) must be divisible by the tensor-parallel size \(4\)"),
        (tiny_config("qwen2", 2, True), dict(pp=4), r"num_hidden_layers \(3\) must be at least .* \(4\)"),
        (transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, intermediate_size=64, head_dim=272),
         {}, r"attention kernel takes head_dim \d+\.\.256, the model's is 272"),
        (transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, intermediate_size=64,
                                  attention_dropout=0.1), {}, r"attention_dropout \(0.1\) is not supported"),
        (tiny_config("llama", 2, False), dict(tp=2, sp=True, seq=13),
         r"seq \(13\) must be divisible by the tensor-parallel size \(2\)"),
        (tiny_config("llama", 2, False), dict(seq=65), r"seq \(65\) is longer than .* \(64\)"),
        (tiny_config("llama", 2, False), dict(dp=0), r"dp must be a positive int, got 0"),
    ]
    for config, layout, message in cases:
        layout = {"dp": 1, "tp": 1, "pp": 1, "sp": False, "seq": None, **layout}
        with pytest.raises(ValueError, match=message):
            check_decoder_config(config, layout["dp"], layout["tp"], layout["pp"], layout["sp"], layout["seq"])


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_gpt2_sized_vocabulary_splits_and_merges_invisibly(tp):
    """50257 rows padded to a multiple of tp: every rank's embedding and head slices, merged,
    are the plain tensors (the padding dropped), from the plan's specs on Hugging Face names."""
    from hybridpar_ext.parallel import merge_tensors_by_specs, plan_specs, shard_tensor
    from hybridpar_ext.parallel.plans.llama import decoder_plan

    config = transformers.LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    weights = {"model.embed_tokens.weight": torch.randn(50257, 32), "lm_head.weight": torch.randn(50257, 32)}
    shapes = {n: tuple(t.shape) for n, t in weights.items()}
    specs = [plan_specs(decoder_plan(config), shapes, tp, r) for r in range(tp)]
    for name, full in weights.items():
        parts = [shard_tensor(full, s[name]) for s in specs]
        assert {p.shape[0] for p in parts} == {-(-50257 // tp)}
        assert sum(s[name].padding for s in specs) == -(-50257 // tp) * tp - 50257
        assert torch.equal(merge_tensors_by_specs(parts, [s[name] for s in specs]), full)
