"""Interleaved 1F1B end to end: each pipeline rank holds two chunks of the GPT (layers dealt to
the p v virtual stages, unevenly where they do not divide), and ZB-H1 on one chunk, with data
or tensor parallelism mixed in, trained for 3 steps against the same GPT in one process: the loss of every step
within float32 tolerance and every gradient of the first step elementwise (gathered back to
full shape). As in test_hybrid_parity, gradients are compared before the first update only;
the later losses check the updates."""

import pytest
import torch

from hybridpar_ext.testing import assert_close_to_reference, run_ranks

STEPS, SEQ, GLOBAL_BATCH, LR, WD, SEED = 3, 12, 8, 3e-3, 0.01, 7
MODEL = dict(vocab_size=96, max_seq_len=SEQ, hidden=64, heads=4, ffn=96)
# layout -> (dp, tp, pp), its cases: model variant, microbatches, sp, zero1, virtual stages per
# rank (2: interleaved 1F1B; 1: ZB-H1, whose W actions find nothing deferred in the GPT's
# layers, so this checks the split schedule's order and its DP reduction on a real model).
LAYOUTS = {
    "dp2-pp2": ((2, 1, 2), [(dict(layers=5, kv_heads=2), 2, False, False, 2),
                            (dict(layers=4, kv_heads=4, norm="rmsnorm", mlp="swiglu", tied_embeddings=False),
                             4, False, True, 2),
                            (dict(layers=3, kv_heads=1), 4, False, True, 1)]),
    "tp2-pp2": ((1, 2, 2), [(dict(layers=5, kv_heads=1, mlp="swiglu"), 4, True, False, 2),
                            (dict(layers=6, kv_heads=2, norm="rmsnorm"), 2, False, False, 2),
                            (dict(layers=3, kv_heads=2, tied_embeddings=False), 2, True, False, 1)]),
    "pp4": ((1, 1, 4), [(dict(layers=9, kv_heads=2, tied_embeddings=False), 4, False, False, 2),
                        (dict(layers=8, kv_heads=4), 8, False, False, 2),
                        (dict(layers=5, kv_heads=2), 4, False, False, 1)]),
}


def batch(step: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED * 1000 + step)
    return torch.randint(0, vocab, (GLOBAL_BATCH, SEQ + 1), generator=gen)


def reference(config):
    """The same training in one process: the whole batch, the plain GPT, torch AdamW."""
    from hybridpar_ext.models import GPT

    torch.manual_seed(SEED)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    losses, grads = [], None
    for step in range(1, STEPS + 1):
        tokens = batch(step, config.vocab_size)
        opt.zero_grad()
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)}
        opt.step()
        losses.append(loss.item())
    return losses, grads


def train_interleaved(rank, world, layout):
    import torch.distributed as dist

    from hybridpar_ext.models import GPT, GPTConfig
    from hybridpar_ext.parallel import GradientSync, ZeroAdamW, build_stage, gather_state_dict, init_mesh
    from hybridpar_ext.parallel.pipeline import PipelineSchedule, build_chunks

    (dp, tp, pp), cases = LAYOUTS[layout]
    mesh = init_mesh(dp=dp, tp=tp, pp=pp)
    report = []
    for variant, m, sp, zero, v in cases:
        config = GPTConfig(**MODEL, **variant)
        schedule = "interleaved" if v > 1 else "zero-bubble"
        label = f"{layout} {schedule} v{v} {variant} m{m}" + (" sp" if sp else "") + (" zero1" if zero else "")
        torch.manual_seed(SEED)
        full = GPT(config)
        chunks = build_chunks(lambda ids, first, last: build_stage(full, mesh, ids, first, last, sequence_parallel=sp),
                              config.layers, pp, v, mesh.pp_rank)
        del full
        sync = GradientSync(chunks, mesh.dp_group, zero=zero)
        opt = ZeroAdamW(sync, lr=LR, weight_decay=WD) if zero else \
            torch.optim.AdamW(chunks.parameters(), lr=LR, weight_decay=WD)
        pipe = PipelineSchedule(chunks, mesh.pp_group, m, no_sync=sync.no_sync, schedule=schedule)
        losses, grads = [], None
        share = GLOBAL_BATCH // dp
        for step in range(1, STEPS + 1):
            rows = batch(step, config.vocab_size)[mesh.dp_rank * share:(mesh.dp_rank + 1) * share]
            opt.zero_grad()
            stats = pipe.step(list(rows[:, :-1].chunk(m)), list(rows[:, 1:].chunk(m)))
            sync.finish()
            chunks.finish_grads()
            if grads is None:
                averaged = sync.averaged_grads()
                grads = {}
                for chunk in chunks:   # every rank gathers its chunk k, k = 0, 1, ...
                    named = dict(chunk.named_parameters(remove_duplicate=False))
                    grads.update(gather_state_dict(chunk, mesh, config,
                                                   {n: averaged[p].detach().clone() for n, p in named.items()}))
            opt.step()
            counts = chunks.is_last and mesh.tp_rank == 0
            total = torch.tensor([stats.loss if counts else 0.0], dtype=torch.float64)
            dist.all_reduce(total)
            losses.append(total.item() / dp)
        if rank == 0:
            ref_losses, ref_grads = reference(config)
            for step, (a, e) in enumerate(zip(losses, ref_losses), 1):
                assert_close_to_reference(torch.tensor(a), torch.tensor(e, dtype=torch.float64), torch.float32,
                                          f"[{label}] loss of step {step}")
            assert set(grads) == set(ref_grads), f"[{label}] {sorted(set(grads) ^ set(ref_grads))}"
            for name, g in ref_grads.items():
                assert_close_to_reference(grads[name], g.double(), torch.float32, f"[{label}] grad {name}")
            report.append({"case": label, "losses": losses, "reference": ref_losses})
        del pipe, opt, sync, chunks
        dist.barrier()
    return report


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_interleaved_and_zero_bubble_match_one_process(layout):
    (dp, tp, pp), cases = LAYOUTS[layout]
    report = run_ranks(train_interleaved, dp * tp * pp, timeout=180, layout=layout)[0]
    assert len(report) == len(cases)
