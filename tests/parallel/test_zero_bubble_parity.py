"""Zero bubble deferring every weight gradient we own, end to end: our GPT and a Hugging Face
LLaMA under ZB-H1 with data and tensor parallelism mixed in, the norms' dW/dB deferred too
(``defer_norm_weight_grads``), trained for 3 steps against the plain model in one process: the
loss of every step within float32 tolerance and every gradient of the first step elementwise.

The schedule is ZB-H1's lists with every backward split (a ``BW`` the schedule fused back into
``B`` then ``W``), so that every rank, the first stage with the embedding included, runs its
weight gradients at W. Cases:

- dp2 x pp2, the embedding tied to the head across stages, ZeRO-1 on the GPT: the embedding's
  deferred gradient, the DP buckets started at the last W, the tied sum after the reduction;
- dp2 x tp2 at pp = 1 (sequence parallelism on the LLaMA): the embedding and the head are one
  tensor on one stage, so neither defers (the re-tie turns both off), the rest does.
"""

import pytest
import torch

from hybridpar_ext.testing import assert_matches_reference, causal_lm_loss, run_ranks, train_reference

STEPS, SEQ, GLOBAL_BATCH, LR, WD, SEED = 3, 12, 8, 3e-3, 0.01, 13
GPT_MODEL = dict(vocab_size=91, max_seq_len=SEQ, hidden=64, heads=4, ffn=72)
# layout -> (dp, tp, pp), its cases: (family, model variant, microbatches, sp, zero1)
LAYOUTS = {
    "dp2-pp2": ((2, 1, 2), [("gpt", dict(layers=3, kv_heads=1, tied_embeddings=True), 4, False, True),
                            ("llama", dict(layers=3, kv_heads=2, tied=True), 2, False, False)]),
    "dp2-tp2": ((2, 2, 1), [("gpt", dict(layers=2, kv_heads=2, tied_embeddings=True, norm="rmsnorm"), 2, True,
                             False),
                            ("llama", dict(layers=2, kv_heads=1, tied=True), 2, True, False)]),
}


def batch(step, vocab):
    gen = torch.Generator().manual_seed(SEED * 1000 + step)
    return torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=gen)


def split_zero_bubble(p, m):
    """ZB-H1's lists with every fused ``BW`` split back into its ``B`` and ``W``."""
    from hybridpar_ext.parallel.schedules import Action, build_schedule

    return [[x for a in actions
             for x in ((Action("B", a.chunk, a.microbatch), Action("W", a.chunk, a.microbatch)) if a.op == "BW"
                       else (a,))]
            for actions in build_schedule("zero-bubble", p, 1, m)]


def llama(variant, seed):
    import transformers

    config = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=80,
                                      num_hidden_layers=variant["layers"], num_attention_heads=4,
                                      num_key_value_heads=variant["kv_heads"], max_position_embeddings=64,
                                      tie_word_embeddings=variant["tied"], rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():   # norms off their init, so that a wrong dW would show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def plain_run(family, variant, seed):
    """The plain model trained in one process on the whole batch (:func:`train_reference`)."""
    from hybridpar_ext.models import GPT, GPTConfig

    if family == "gpt":
        torch.manual_seed(seed)
        model, vocab = GPT(GPTConfig(**GPT_MODEL, **variant)), GPT_MODEL["vocab_size"]
    else:
        model, vocab = llama(variant, seed), 101
    loss_fn = None if family == "gpt" else causal_lm_loss
    return train_reference(model, [batch(step, vocab) for step in range(1, STEPS + 1)], LR, WD, loss_fn=loss_fn)


def train_zero_bubble(rank, world, layout):
    import torch.distributed as dist

    from hybridpar_ext.models import GPT, GPTConfig
    from hybridpar_ext.parallel import GradientSync, ZeroAdamW, build_stage, gather_state_dict, init_mesh
    from hybridpar_ext.parallel.layers import defer_norm_weight_grads
    from hybridpar_ext.parallel.pipeline import PipelineSchedule, build_chunks
    from hybridpar_ext.parallel.plans.llama import build_decoder_stage

    (dp, tp, pp), cases = LAYOUTS[layout]
    mesh = init_mesh(dp=dp, tp=tp, pp=pp)
    report = []
    for i, (family, variant, m, sp, zero) in enumerate(cases):
        seed = SEED + i
        label = f"{layout} {family} {variant} m{m}" + (" sp" if sp else "") + (" zero1" if zero else "")
        if family == "gpt":
            config, vocab = GPTConfig(**GPT_MODEL, **variant), GPT_MODEL["vocab_size"]
            torch.manual_seed(seed)
            full = GPT(config)
            build = lambda ids, first, last: build_stage(full, mesh, ids, first, last, sequence_parallel=sp)  # noqa: E731
        else:
            config, vocab = None, 101
            full = llama(variant, seed)
            build = lambda ids, first, last: build_decoder_stage(full, mesh, ids, first, last,  # noqa: E731
                                                                 sequence_parallel=sp)
        chunks = build_chunks(build, variant["layers"], pp, 1, mesh.pp_rank)
        del full
        assert defer_norm_weight_grads(chunks) > 0
        sync = GradientSync(chunks, mesh.dp_group, zero=zero)
        opt = ZeroAdamW(sync, lr=LR, weight_decay=WD) if zero else \
            torch.optim.AdamW(chunks.parameters(), lr=LR, weight_decay=WD)
        pipe = PipelineSchedule(chunks, mesh.pp_group, m, no_sync=sync.no_sync, schedule=split_zero_bubble(pp, m))
        deferred = set()
        add = pipe.store.add

        def recording_add(key, work, holds=(), add=add):
            deferred.add(key)
            add(key, work, holds)

        pipe.store.add = recording_add
        losses, grads = [], None
        share = GLOBAL_BATCH // dp
        for step in range(1, STEPS + 1):
            rows = batch(step, vocab)[mesh.dp_rank * share:(mesh.dp_rank + 1) * share]
            opt.zero_grad()
            stats = pipe.step(list(rows[:, :-1].chunk(m)), list(rows[:, 1:].chunk(m)))
            assert len(pipe.store) == 0, f"[{label}] W work left after the step"
            sync.finish()
            chunks.finish_grads()
            if grads is None:
                averaged = sync.averaged_grads()
                grads = {}
                for chunk in chunks:
                    named = dict(chunk.named_parameters(remove_duplicate=False))
                    grads.update(gather_state_dict(chunk, mesh, config,
                                                   {n: averaged[p].detach().clone() for n, p in named.items()}))
            opt.step()
            total = torch.tensor([stats.loss if chunks.is_last and mesh.tp_rank == 0 else 0.0], dtype=torch.float64)
            dist.all_reduce(total)
            losses.append(total.item() / dp)
        assert len(deferred) == m, f"[{label}] W work from {sorted(deferred)}, expected every microbatch"
        if rank == 0:
            assert_matches_reference(label, losses, grads, plain_run(family, variant, seed))
            report.append(label)
        del pipe, opt, sync, chunks
        dist.barrier()
    return report


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_zero_bubble_deferring_everything_matches_one_process(layout):
    pytest.importorskip("transformers")
    (dp, tp, pp), cases = LAYOUTS[layout]
    report = run_ranks(train_zero_bubble, dp * tp * pp, timeout=240, layout=layout)[0]
    assert len(report) == len(cases)
