"""Zero bubble's split backward through our tensor-parallel layers: inside a WeightGradStore's
recording, a column- and row-parallel MLP (with biases; every combination of sequence
parallelism and the overlapped ops) leaves its weights untouched by the input backward (B),
whose input gradient already matches the plain MLP's in one process, and gets its weight and
bias gradients, equal to the plain MLP's, only when the store runs (W). Then the GPT under
ZB-H1 with tensor parallelism (tp2, with and without sequence parallelism) and pp2: its
layers defer work to the store, and the first step's gradients and loss match one process."""

import pytest
import torch
import torch.nn.functional as F

from hybridpar_ext.testing import assert_close_to_reference, run_ranks

B, S, H, FFN = 3, 6, 10, 14   # odd widths; batch 3; the sequence splits over tp = 2


def _randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _close(actual, expected, name):
    assert_close_to_reference(actual, expected, torch.float64, name)


def check_deferred_mlp(rank, world):
    import torch.distributed as dist

    from hybridpar_ext import parallel
    from hybridpar_ext.parallel.weight_grad import WeightGradStore

    group = dist.group.WORLD
    dense1, dense2 = torch.nn.Linear(H, FFN, dtype=torch.float64), torch.nn.Linear(FFN, H, dtype=torch.float64)
    with torch.no_grad():
        for i, p in enumerate(list(dense1.parameters()) + list(dense2.parameters())):
            p.copy_(_randn(p.shape, 10 + i))
    x_full, dy_full = _randn((B, S, H), 1), _randn((B, S, H), 2)
    x_ref = x_full.clone().requires_grad_()
    dense2(F.gelu(dense1(x_ref))).backward(dy_full)
    rows = slice(rank * FFN // world, (rank + 1) * FFN // world)
    seq = slice(rank * S // world, (rank + 1) * S // world)
    cases = 0
    for sp in (False, True):
        for overlap in (False, True):
            tag = f"sp={sp} overlap={overlap}"
            col = parallel.ColumnParallelLinear.from_dense(dense1, group, sequence_parallel=sp, chunks=2,
                                                           overlap=overlap)
            row = parallel.RowParallelLinear.from_dense(dense2, group, sequence_parallel=sp, chunks=2,
                                                        overlap=overlap)
            store = WeightGradStore()
            x = (x_full[:, seq] if sp else x_full).clone().requires_grad_()
            with store.recording("mb0"):
                y = row(F.gelu(col(x)))
            y.backward(dy_full[:, seq] if sp else dy_full)   # B
            for name, p in [("column", col.weight), ("column bias", col.bias), ("row", row.weight),
                            ("row bias", row.bias)]:
                assert p.grad is None, f"{tag}: {name} has a gradient after B"
            assert len(store) == 2, f"{tag}: expected the two layers' W work in the store, got {len(store)}"
            _close(x.grad, x_ref.grad[:, seq] if sp else x_ref.grad, f"{tag} grad_x after B")
            store.run("mb0")   # W
            assert len(store) == 0
            _close(col.weight.grad, dense1.weight.grad[rows], f"{tag} column weight grad")
            _close(col.bias.grad, dense1.bias.grad[rows], f"{tag} column bias grad")
            _close(row.weight.grad, dense2.weight.grad[:, rows], f"{tag} row weight grad")
            bias_grad = row.bias.grad.clone()
            if sp:   # each rank holds its sequence slice's part of the replicated bias's gradient
                dist.all_reduce(bias_grad, group=group)
            _close(bias_grad, dense2.bias.grad, f"{tag} row bias grad")

            # Outside a recording the same layers take the fused path: nothing deferred.
            col.zero_grad(), row.zero_grad()
            row(F.gelu(col(x.detach()))).sum().backward()
            assert len(store) == 0 and col.weight.grad is not None, f"{tag}: deferred outside a recording"
            cases += 1
    return cases


def test_parallel_linears_defer_weight_grads_to_w():
    assert run_ranks(check_deferred_mlp, 2, timeout=60) == [4, 4]


SEQ, GLOBAL_BATCH, SEED, M = 12, 4, 11, 2
MODEL = dict(vocab_size=90, max_seq_len=SEQ, hidden=64, heads=4, kv_heads=2, ffn=72, layers=3,
             tied_embeddings=False)


def gpt_zero_bubble_tp(rank, world, sp):
    import torch.distributed as dist

    from hybridpar_ext.models import GPT, GPTConfig
    from hybridpar_ext.parallel import build_stage, gather_state_dict, init_mesh
    from hybridpar_ext.parallel.pipeline import PipelineSchedule

    mesh = init_mesh(dp=1, tp=2, pp=2)
    config = GPTConfig(**MODEL)
    torch.manual_seed(SEED)
    full = GPT(config)
    ids = [range(0, 2), range(2, 3)][mesh.pp_rank]
    stage = build_stage(full, mesh, ids, mesh.pp_rank == 0, mesh.pp_rank == 1, sequence_parallel=sp)
    pipe = PipelineSchedule(stage, mesh.pp_group, M, schedule="zero-bubble")
    deferred = []
    if pipe.store is not None:   # None where the schedule splits no backward of this rank
        add = pipe.store.add
        pipe.store.add = lambda key, work, holds=(): (deferred.append(key), add(key, work, holds))[1]
    tokens = torch.randint(0, config.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))
    stats = pipe.step(list(tokens[:, :-1].chunk(M)), list(tokens[:, 1:].chunk(M)))
    stage.finish_grads()
    assert pipe.store is None or len(pipe.store) == 0, "W work left in the store after the step"
    splits = sum(a.op == "B" for a in pipe.actions)   # the microbatches whose backward is split
    named = dict(stage.named_parameters(remove_duplicate=False))
    grads = gather_state_dict(stage, mesh, config, {n: p.grad.detach().clone() for n, p in named.items()})
    total = torch.tensor([stats.loss if stage.is_last and mesh.tp_rank == 0 else 0.0], dtype=torch.float64)
    dist.all_reduce(total)
    gathered = [None] * world
    dist.all_gather_object(gathered, grads)
    if rank != 0:
        return len(deferred), splits
    merged = {k: v for g in gathered for k, v in g.items()}
    torch.manual_seed(SEED)
    model = GPT(config)
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert_close_to_reference(total[0], torch.tensor(loss.item(), dtype=torch.float64), torch.float32, "loss")
    ref = dict(model.named_parameters(remove_duplicate=False))
    assert set(merged) == set(ref), sorted(set(merged) ^ set(ref))
    for name, p in ref.items():
        assert_close_to_reference(merged[name], p.grad.double(), torch.float32, f"sp={sp} grad {name}")
    return len(deferred), splits


@pytest.mark.parametrize("sp", [False, True], ids=["tp2-pp2", "tp2-sp-pp2"])
def test_gpt_zero_bubble_defers_through_tensor_parallel_layers(sp):
    counts = run_ranks(gpt_zero_bubble_tp, 4, timeout=120, sp=sp)
    # Per split microbatch: 4 linears a layer (qkv, out, fc1, fc2), plus the embedding on the
    # first stage (2 layers) and the head on the last (1); the norms' deferral is off by default.
    per_microbatch = {0: 2 * 4 + 1, 1: 1 * 4 + 1}   # by pipeline rank: global ranks (pp, tp) = (r // 2, r % 2)
    assert any(splits for _, splits in counts), "the schedule split no backward"
    for rank, (deferred, splits) in enumerate(counts):
        assert deferred == per_microbatch[rank // 2] * splits, (rank, counts)


# ------------------------------------------------------------------ the norms' dW/dB
# Odd widths: 33 fits a row in registers (the kernels' single pass); 16385 float32 columns do
# not, so the Triton path takes its chunked backward.
NORM_CASES = [(torch.float64, 33), (torch.float32, 33), (torch.float32, 16385)]


def _norm_modules(kind, width, dtype):
    """(our fused norm, its deferrable twin sharing nothing, the float64 reference function)."""
    from hybridpar_ext import nn as hnn
    from hybridpar_ext.parallel.layers import DeferrableLayerNorm, DeferrableRMSNorm
    from hybridpar_ext.reference import norms as ref

    if kind == "layer_norm":
        fused = hnn.LayerNorm(width, eps=1e-5, dtype=dtype)
        twin = DeferrableLayerNorm.from_dense(hnn.LayerNorm(width, eps=1e-5, dtype=dtype))
        reference = lambda x, w, b, r: ref.layer_norm(x, w, b, 1e-5, r)   # noqa: E731
    else:
        fused = hnn.RMSNorm(width, eps=1e-5, dtype=dtype)
        twin = DeferrableRMSNorm.from_dense(hnn.RMSNorm(width, eps=1e-5, dtype=dtype))
        reference = lambda x, w, b, r: ref.rms_norm(x, w, 1e-5, r)   # noqa: E731
    twin.defer_weight_grad = True
    with torch.no_grad():   # the same weights, off their init
        for i, (a, b) in enumerate(zip(fused.parameters(), twin.parameters())):
            a.copy_(_randn(a.shape, 40 + i))
            b.copy_(a)
    return fused, twin, reference


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_norms_defer_weight_grads_to_w(backend, kind):
    """The deferrable norm (with and without the fused residual, batch 1 and 3-D input) leaves
    dW/dB alone in B, whose dx is the fused norm's, and computes them at W: both against the
    float64 reference, and equal to the fused norm's own."""
    from hybridpar_ext.parallel.weight_grad import WeightGradStore

    for dtype, width in NORM_CASES:
        for residual in (False, True):
            tag = f"{backend} {kind} {dtype} width={width} residual={residual}"
            fused, twin, reference = _norm_modules(kind, width, dtype)
            shape = (1, 3, width) if width > 1000 else (3, 5, width)
            x0, r0, dy = (_randn(shape, s).to(dtype) for s in (1, 2, 3))
            dh = _randn(shape, 4).to(dtype)

            def run(module, x, r):
                out = module(x, r) if residual else module(x)
                outs, grads = ((out[0], out[1]), (dy, dh)) if residual else ((out,), (dy,))
                torch.autograd.backward(outs, grads)
                return outs

            # The float64 reference, differentiated by autograd.
            x_ref, r_ref = (t.to(torch.float64, copy=True).requires_grad_() for t in (x0, r0))
            params_ref = [p.detach().to(torch.float64, copy=True).requires_grad_() for p in fused.parameters()]
            out = reference(x_ref, params_ref[0], params_ref[1] if len(params_ref) > 1 else None,
                            r_ref if residual else None)
            torch.autograd.backward(out if residual else (out,), (dy.double(), dh.double()) if residual
                                    else (dy.double(),))
            # The fused norm, and the deferrable one inside a recording: B, then W.
            x_f, r_f = x0.clone().requires_grad_(), r0.clone().requires_grad_()
            y_f = run(fused, x_f, r_f)
            store = WeightGradStore()
            x_d, r_d = x0.clone().requires_grad_(), r0.clone().requires_grad_()
            with store.recording("mb"):
                y_d = run(twin, x_d, r_d)
            for name, p in twin.named_parameters():
                assert p.grad is None, f"{tag}: {name} has a gradient after B"
            assert len(store) == 1, f"{tag}: expected the norm's W work in the store"
            for a, b in zip(y_d, y_f):
                assert torch.equal(a, b), f"{tag}: the deferrable norm's forward differs from the fused one"
            assert torch.equal(x_d.grad, x_f.grad), f"{tag}: dx after B differs from the fused backward's"
            if residual:
                assert torch.equal(r_d.grad, r_f.grad), f"{tag}: the residual's gradient differs"
            assert_close_to_reference(x_d.grad, x_ref.grad, dtype, f"{tag} dx")
            store.run("mb")
            assert len(store) == 0
            for (name, p), fused_p, ref_p in zip(twin.named_parameters(), fused.parameters(), params_ref):
                assert p.grad is not None and p.grad.dtype == p.dtype, f"{tag}: no {name} gradient after W"
                assert_close_to_reference(p.grad, ref_p.grad, dtype, f"{tag} d{name} deferred")
                assert_close_to_reference(p.grad, fused_p.grad.double(), dtype, f"{tag} d{name} against fused")

            # Outside a recording, or with deferral off, the twin is the fused norm.
            twin.zero_grad()
            run(twin, x0.clone().requires_grad_(), r0.clone().requires_grad_())
            assert twin.weight.grad is not None and torch.equal(twin.weight.grad, fused.weight.grad), tag


def test_norm_deferral_is_off_by_default_and_refuses_bad_input():
    from hybridpar_ext import nn as hnn
    from hybridpar_ext.parallel.layers import DeferrableLayerNorm, defer_norm_weight_grads
    from hybridpar_ext.parallel.weight_grad import WeightGradStore, deferrable_norm

    stage = torch.nn.Sequential(DeferrableLayerNorm.from_dense(hnn.LayerNorm(7)), torch.nn.Linear(7, 7))
    store = WeightGradStore()
    with store.recording("mb"):
        stage(torch.randn(2, 7)).sum().backward()
    assert len(store) == 0 and stage[0].weight.grad is not None, "deferred while off"
    assert defer_norm_weight_grads(stage) == 1 and stage[0].defer_weight_grad
    with pytest.raises(RuntimeError, match="deferrable_norm: no WeightGradStore is recording"):
        deferrable_norm(torch.randn(2, 7), stage[0].weight, stage[0].bias, 1e-5)
    with store.recording("mb"), pytest.raises(ValueError, match=r"normalized_shape \(3, 7\)"):
        deferrable_norm(torch.randn(2, 7), torch.ones(3, 7, requires_grad=True), None, 1e-5,
                        normalized_shape=(3, 7))
    with pytest.raises(ValueError, match="from_dense: a norm without weight"):
        DeferrableLayerNorm.from_dense(hnn.LayerNorm(7, elementwise_affine=False))


# ------------------------------------------------------------------ every parameter of a stage
def whole_stage_defers_everything(rank, world, family):
    """A whole model on tp2 with sequence parallelism (one stage holding the embedding, every
    layer, the final norm and an untied head), the norms' deferral on: after B no parameter has
    a gradient and none of their post-accumulate hooks fired (a data-parallel reducer would take
    it for done); after W every one has its gradient, the plain model's in one process."""
    import torch.distributed as dist

    from hybridpar_ext.models import GPT, GPTConfig
    from hybridpar_ext.parallel import build_stage, gather_state_dict, init_mesh
    from hybridpar_ext.parallel.layers import defer_norm_weight_grads
    from hybridpar_ext.parallel.plans.llama import build_decoder_stage
    from hybridpar_ext.parallel.weight_grad import WeightGradStore

    mesh = init_mesh(dp=1, tp=2, pp=1)
    tokens = torch.randint(0, 90, (2, SEQ + 1), generator=torch.Generator().manual_seed(5))
    if family == "gpt":
        config = GPTConfig(**MODEL)
        torch.manual_seed(SEED)
        plain = GPT(config)
        stage = build_stage(plain, mesh, range(MODEL["layers"]), True, True, sequence_parallel=True)
        loss_plain = plain(tokens[:, :-1], tokens[:, 1:])
    else:
        import transformers

        config = None
        hf = transformers.LlamaConfig(vocab_size=90, hidden_size=64, intermediate_size=72, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False, rms_norm_eps=1e-5, attention_bias=True)
        torch.manual_seed(SEED)
        plain = transformers.AutoModelForCausalLM.from_config(hf, attn_implementation="eager")
        stage = build_decoder_stage(plain, mesh, range(2), True, True, sequence_parallel=True)
        logits = plain(tokens[:, :-1]).logits
        loss_plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss_plain.backward()
    assert defer_norm_weight_grads(stage) > 0
    params = dict(stage.named_parameters())
    fired = []
    for name, p in params.items():
        p.register_post_accumulate_grad_hook(lambda _p, name=name: fired.append(name))
    store = WeightGradStore()
    with store.recording("mb"):
        logits = stage(tokens[:, :-1])
    stage.loss(logits, tokens[:, 1:]).backward()   # B
    early = sorted(n for n, p in params.items() if p.grad is not None)
    assert not early and not fired, f"{family}: gradients or hooks in B: {early} {sorted(set(fired))}"
    store.run("mb")   # W
    missing = sorted(n for n, p in params.items() if p.grad is None)
    assert not missing, f"{family}: no gradient after W: {missing}"
    stage.finish_grads()
    grads = gather_state_dict(stage, mesh, config, {n: p.grad.detach().clone() for n, p in params.items()})
    reference = dict(plain.named_parameters())
    assert set(grads) == set(reference), sorted(set(grads) ^ set(reference))
    for name, p in reference.items():
        assert_close_to_reference(grads[name], p.grad.double(), torch.float32, f"{family} grad {name}")
    dist.barrier()
    return len(params)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_every_parameter_of_a_stage_waits_for_w(family):
    if family == "llama":
        pytest.importorskip("transformers")
    counts = run_ranks(whole_stage_defers_everything, 2, timeout=120, family=family)
    assert counts[0] == counts[1] > 0


def test_opcheck_split_norm_backward_ops(backend, device):
    x, dy = torch.randn(6, 40, device=device), torch.randn(6, 40, device=device)
    w = torch.randn(40, device=device)
    mean, rstd = torch.randn(6, device=device), torch.rand(6, device=device) + 0.5
    for m in (mean, None):   # LayerNorm, RMSNorm
        torch.library.opcheck(torch.ops.hybridpar.norm_input_backward.default, (dy, None, x, w, m, rstd))
        torch.library.opcheck(torch.ops.hybridpar.norm_input_backward.default, (dy, dy.clone(), x, None, m, rstd))
        torch.library.opcheck(torch.ops.hybridpar.norm_weight_backward.default, (dy, x, m, rstd, True, m is not None))
        torch.library.opcheck(torch.ops.hybridpar.norm_weight_backward.default, (dy, x, m, rstd, False, False))


def recomputed_stage_defers(rank, world):
    """Activation recomputation reruns a layer's forward during B, where no store records: the
    rerun takes the deferring path again (saving what the forward saved), and W still gets the
    gradients of the plain model."""
    from hybridpar_ext.models import GPT, GPTConfig
    from hybridpar_ext.parallel import build_stage, init_mesh
    from hybridpar_ext.parallel.layers import defer_norm_weight_grads
    from hybridpar_ext.parallel.weight_grad import WeightGradStore
    from hybridpar_ext.train.recompute import apply_recompute

    mesh = init_mesh(dp=1, tp=1, pp=1)
    config = GPTConfig(**{**MODEL, "layers": 2})
    tokens = torch.randint(0, config.vocab_size, (3, SEQ + 1), generator=torch.Generator().manual_seed(2))
    done = []
    for mode in ("full", "selective"):
        torch.manual_seed(SEED)
        plain = GPT(config)
        plain(tokens[:, :-1], tokens[:, 1:]).backward()
        stage = build_stage(plain, mesh, range(2), True, True)
        defer_norm_weight_grads(stage)
        apply_recompute(stage, mode)
        store = WeightGradStore()
        with store.recording("mb"):
            logits = stage(tokens[:, :-1])
        stage.loss(logits, tokens[:, 1:]).backward()
        early = sorted(n for n, p in stage.named_parameters() if p.grad is not None)
        assert not early, f"{mode}: gradients in B: {early}"
        store.run("mb")
        reference = dict(plain.named_parameters())
        for name, p in stage.named_parameters():
            assert_close_to_reference(p.grad, reference[name].grad.double(), torch.float32, f"{mode} grad {name}")
        done.append(mode)
    return done


def test_recomputed_layers_still_defer():
    assert run_ranks(recomputed_stage_defers, 1, timeout=60) == [["full", "selective"]]
