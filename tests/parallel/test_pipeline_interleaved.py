"""Interleaved 1F1B end to end: each pipeline rank holds two chunks of the GPT (layers dealt to
the p v virtual stages, unevenly where they do not divide), and ZB-H1 on one chunk, with data
or tensor parallelism mixed in (and a Hugging Face LLaMA and Qwen2 under tensor parallelism), trained for 3 steps against the same GPT in one process: the loss of every step
within float32 tolerance and every gradient of the first step elementwise (gathered back to
full shape). As in test_hybrid_parity, gradients are compared before the first update only;
the later losses check the updates."""

import pytest
import torch

from hybridpar_ext.testing import (assert_close_to_reference, assert_matches_reference, causal_lm_loss, run_ranks,
                                   train_reference)

STEPS, SEQ, GLOBAL_BATCH, LR, WD, SEED = 3, 12, 8, 3e-3, 0.01, 7
MODEL = dict(vocab_size=96, max_seq_len=SEQ, hidden=64, heads=4, ffn=96)
# layout -> (dp, tp, pp), its cases: model variant, microbatches, sp, zero1, virtual stages per
# rank (2: interleaved 1F1B; 1: ZB-H1, whose W actions run the weight gradients the GPT's
# parallel linears, LM head and embedding deferred, with the DP reduction and ZeRO-1 on a real
# model; every backward split and the norms deferred too: test_zero_bubble_parity).
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
    return train_reference(GPT(config), [batch(step, config.vocab_size) for step in range(1, STEPS + 1)], LR, WD)


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
            ref = reference(config)
            assert_matches_reference(label, losses, grads, ref)
            report.append({"case": label, "losses": losses, "reference": ref.losses})
        del pipe, opt, sync, chunks
        dist.barrier()
    return report


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_interleaved_and_zero_bubble_match_one_process(layout):
    (dp, tp, pp), cases = LAYOUTS[layout]
    report = run_ranks(train_interleaved, dp * tp * pp, timeout=180, layout=layout)[0]
    assert len(report) == len(cases)


# ------------------------------------------------------------------ through the trainer's flags
TRAINER = ["--layers", "5", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--ffn", "96", "--seq", "12",
           "--global-batch", "8", "--steps", str(STEPS), "--lr", "3e-3", "--seed", "7", "--data", "synthetic",
           "--vocab", "96"]
TRAINER_CASES = [["--dp", "2", "--pp", "2", "--virtual-stages", "2", "--microbatches", "2", "--zero"],
                 ["--tp", "2", "--pp", "2", "--schedule", "zero-bubble", "--microbatches", "2", "--sp"]]


def train_with_flags(rank, world):
    import torch.distributed as dist

    from hybridpar_ext.models import GPT
    from hybridpar_ext.train import Batches, Trainer, check_args, parse_args

    out = []
    for extra in TRAINER_CASES:
        args = parse_args(TRAINER + extra)
        config = check_args(args, world)
        args.dtype = "float32"
        trainer = Trainer(args, config, torch.device("cpu"))
        losses = [trainer.step(step)["loss"] for step in range(1, STEPS + 1)]
        if rank == 0:   # the same run in one process
            torch.manual_seed(args.seed)
            model = GPT(config)
            opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
            batches = Batches(args.data, config.vocab_size, args.seq, args.global_batch, args.seed)
            for step, got in enumerate(losses, 1):
                tokens = batches(step)
                opt.zero_grad()
                loss = model(tokens[:, :-1], tokens[:, 1:])
                loss.backward()
                opt.step()
                assert_close_to_reference(torch.tensor(got), torch.tensor(loss.item(), dtype=torch.float64),
                                          torch.float32, f"[{' '.join(extra)}] loss of step {step}")
            out.append(losses)
        del trainer
        dist.barrier()
    return out


def test_the_trainer_runs_interleaved_and_zero_bubble_from_its_flags():
    assert len(run_ranks(train_with_flags, 4, timeout=180)[0]) == len(TRAINER_CASES)


@pytest.mark.parametrize("extra,message", [
    (["--pp", "2", "--virtual-stages", "2", "--microbatches", "3", "--global-batch", "6"],
     r"--schedule interleaved --virtual-stages 2: .*microbatches \(m = 3\) must be a multiple of the pipeline "
     r"stages \(p = 2\); try m = 2 or 4"),
    (["--pp", "2", "--virtual-stages", "3", "--microbatches", "2"],
     r"layers \(5\) must be at least pipeline stages x virtual stages = 2 x 3 = 6; try v <= 2"),
    (["--virtual-stages", "2"], r"needs at least 2 pipeline stages \(p\), got 1"),
    (["--pp", "2", "--schedule", "zero-bubble", "--virtual-stages", "2", "--microbatches", "2"],
     r"schedule 'zero-bubble' runs one model chunk per rank"),
])
def test_the_trainer_refuses_schedules_that_cannot_run(extra, message):
    from hybridpar_ext.train import check_args, parse_args

    args = parse_args(TRAINER + extra)
    world = int(extra[extra.index("--pp") + 1]) if "--pp" in extra else 1
    with pytest.raises(ValueError, match=message):
        check_args(args, world)


# ------------------------------------------------------------------ a Hugging Face decoder
# (family, kv heads, tied, layers, microbatches, sp, virtual stages) on tp2 x pp2: LLaMA with its
# embedding tied across the first and last chunks, interleaved; Qwen2 (qkv biases) under ZB-H1.
HF_CASES = [("llama", 1, True, 5, 2, True, 2), ("qwen2", 2, False, 3, 4, False, 1)]


def hf_model(family, kv_heads, tied, layers, seed):
    import transformers

    config_class = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
    config = config_class(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                          tie_word_embeddings=tied, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():   # norms off their init, so that a wrong split of them would show
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def train_hf(rank, world):
    import torch.distributed as dist

    from hybridpar_ext.parallel import GradientSync, gather_state_dict, init_mesh
    from hybridpar_ext.parallel.pipeline import PipelineSchedule, build_chunks
    from hybridpar_ext.parallel.plans.llama import build_decoder_stage

    mesh = init_mesh(dp=1, tp=2, pp=2)
    out = []
    for i, (family, kv, tied, layers, m, sp, v) in enumerate(HF_CASES):
        label, seed = f"{family} v{v} m{m}" + (" sp" if sp else ""), 21 + i
        model = hf_model(family, kv, tied, layers, seed)
        chunks = build_chunks(lambda ids, first, last: build_decoder_stage(model, mesh, ids, first, last,
                                                                           sequence_parallel=sp),
                              layers, 2, v, mesh.pp_rank)
        sync = GradientSync(chunks, mesh.dp_group)
        opt = torch.optim.AdamW(chunks.parameters(), lr=LR, weight_decay=WD)
        pipe = PipelineSchedule(chunks, mesh.pp_group, m, no_sync=sync.no_sync,
                                schedule="interleaved" if v > 1 else "zero-bubble")
        losses, grads = [], None
        for step in range(1, STEPS + 1):
            tokens = batch(step, 101)
            opt.zero_grad()
            stats = pipe.step(list(tokens[:, :-1].chunk(m)), list(tokens[:, 1:].chunk(m)))
            sync.finish()
            chunks.finish_grads()
            if grads is None:
                grads = {}
                for chunk in chunks:
                    grads.update(gather_state_dict(chunk, mesh, tensors={
                        n: p.grad.detach().clone() for n, p in chunk.named_parameters(remove_duplicate=False)}))
            opt.step()
            total = torch.tensor([stats.loss if chunks.is_last and mesh.tp_rank == 0 else 0.0], dtype=torch.float64)
            dist.all_reduce(total)
            losses.append(total.item())
        if rank == 0:   # the plain model in one process
            ref = train_reference(hf_model(family, kv, tied, layers, seed),
                                  [batch(step, 101) for step in range(1, STEPS + 1)], LR, WD, loss_fn=causal_lm_loss)
            assert_matches_reference(label, losses, grads, ref)
            out.append(label)
        del pipe, opt, sync, chunks
        dist.barrier()
    return out


def test_a_hugging_face_decoder_interleaved_and_zero_bubble_matches_one_process():
    pytest.importorskip("transformers")
    assert len(run_ranks(train_hf, 4, timeout=180)[0]) == len(HF_CASES)
