"""The global gradient norm and clipping on every DP x TP x PP layout of the parity matrix
against one process's ``torch.nn.utils.clip_grad_norm_`` on the plain GPT: the norm the
trainer logs, and every clipped gradient (gathered back to full shape) of the first step.

The cases are picked so that each element-sharing rule is exercised: replicated kv heads
(kv_heads 1 on tp 2), sequence-parallel norms, the tied embedding on two stages, ZeRO-1
slices mixing norms with sharded weights, and several microbatches."""

import pytest
import torch

from hybridpar_ext.testing import assert_close_to_reference, run_ranks

# The parity matrix's model and layouts (tests/parallel/test_hybrid_parity.py).
BASE = ["--layers", "3", "--hidden", "64", "--heads", "4", "--ffn", "96", "--seq", "12",
        "--global-batch", "8", "--steps", "1", "--lr", "3e-3", "--seed", "7"]
LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (1, 2, 2), (2, 1, 2), (2, 2, 2)]
MAX_NORM = 0.05   # well below the first step's norm, so every case really clips


def cases(dp, tp, pp):
    zero = ["--zero"] if dp > 1 else []
    sp = ["--sp"] if tp > 1 else []
    # One case per layout, every sharing rule at once: a kv head replicated over tp 2, the tied
    # embedding on two stages, SP norms, ZeRO-1 slices, and 4 microbatches accumulated.
    return [["--kv-heads", "1", "--norm", "rmsnorm", "--mlp", "swiglu", "--microbatches", "4"] + zero + sp]


def _reference_clipped(args, config):
    from hybridpar_ext.models import GPT
    from hybridpar_ext.train import Batches

    torch.manual_seed(args.seed)
    model = GPT(config)
    tokens = Batches(args.data, config.vocab_size, args.seq, args.global_batch, args.seed)(1)
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
    return norm.item(), {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)}


def clip_and_compare(rank, world, dp, tp, pp):
    import torch.distributed as dist

    from hybridpar_ext.parallel import gather_state_dict
    from hybridpar_ext.train import Trainer, check_args, parse_args

    checked = []
    for extra in cases(dp, tp, pp):
        flags = BASE + extra + ["--dp", str(dp), "--tp", str(tp), "--pp", str(pp), "--clip-grad", str(MAX_NORM)]
        args = parse_args(flags)
        config = check_args(args, world)
        args.dtype = "float32"
        trainer = Trainer(args, config, torch.device("cpu"))
        record = trainer.step(1)
        averaged = trainer.sync.averaged_grads()
        named = dict(trainer.stage.named_parameters(remove_duplicate=False))
        grads = gather_state_dict(trainer.stage, trainer.mesh, config,
                                  {n: averaged[p].detach().clone() for n, p in named.items()})
        label = " ".join(extra)
        if rank == 0:
            ref_norm, ref_grads = _reference_clipped(args, config)
            assert ref_norm > 2 * MAX_NORM, f"[{label}] the case does not clip (norm {ref_norm})"
            assert_close_to_reference(torch.tensor(record["grad_norm"]), torch.tensor(ref_norm, dtype=torch.float64),
                                      torch.float32, f"[{label}] grad norm")
            assert set(grads) == set(ref_grads)
            for name, g in ref_grads.items():
                assert_close_to_reference(grads[name], g.double(), torch.float32, f"[{label}] clipped grad {name}")
            checked.append(label)
        del trainer
        dist.barrier()
    return checked


@pytest.mark.parametrize("dp,tp,pp", LAYOUTS, ids=[f"dp{d}-tp{t}-pp{p}" for d, t, p in LAYOUTS])
def test_clipping_matches_one_process(dp, tp, pp):
    results = run_ranks(clip_and_compare, dp * tp * pp, timeout=180, dp=dp, tp=tp, pp=pp)
    assert len(results[0]) == len(cases(dp, tp, pp))
