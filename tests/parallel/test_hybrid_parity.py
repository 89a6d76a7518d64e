"""The GPT trained on every DP x TP x PP layout (with and without sequence parallelism, with
one and several microbatches, with and without ZeRO-1) against the same GPT trained in one
process: the loss of every step; every gradient of the first step, gathered back to full shape; and
the weights each layout starts from, gathered back, are exactly the plain model's.

Gradients and weights are compared elementwise only before the first update: AdamW divides
by the root of the second moment, so an element whose gradient is near zero turns a rounding
difference (the two runs sum in different orders) into a large relative difference in its
update, and every later gradient inherits it. The losses of the later steps check that the
updates themselves are right. Several model variants ride along (LayerNorm/RMSNorm,
GELU/SwiGLU, tied/untied embeddings, kv heads split, replicated or equal to the heads).

Each layout also checks the global gradient norm and clipping against one process's
``torch.nn.utils.clip_grad_norm_`` on the plain GPT: the norm the trainer logs, and every
clipped gradient (gathered back to full shape) of the first step. That case is picked so that
each element-sharing rule is exercised: replicated kv heads (kv_heads 1 on tp 2),
sequence-parallel norms, the tied embedding on two stages, ZeRO-1 slices mixing norms with
sharded weights, and several microbatches.

The layouts of one world size run one after another in the same processes (starting them is
most of the cost on a small machine); every check names its layout and case."""

import pytest
import torch

from hybridpar_ext.testing import assert_close_to_reference, run_ranks, train_reference

STEPS = 3
# heads 4 of head_dim 16; ffn and seq not powers of two; 3 layers split unevenly over 2 stages.
BASE = ["--layers", "3", "--hidden", "64", "--heads", "4", "--ffn", "96", "--seq", "12",
        "--global-batch", "8", "--steps", str(STEPS), "--lr", "3e-3", "--weight-decay", "0.01",
        "--seed", "7"]
VARIANTS = [
    ["--kv-heads", "4"],
    ["--kv-heads", "1", "--norm", "rmsnorm", "--mlp", "swiglu", "--untied"],
    ["--kv-heads", "2", "--mlp", "swiglu", "--data", "synthetic", "--vocab", "96"],
    ["--kv-heads", "2", "--norm", "rmsnorm", "--untied", "--data", "synthetic", "--vocab", "96"],
]
LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (1, 2, 2), (2, 1, 2), (2, 2, 2)]
# The layouts by world size: each group shares one launch of its processes.
WORLDS = {w: [lay for lay in LAYOUTS if lay[0] * lay[1] * lay[2] == w] for w in (2, 4, 8)}

# The clipping case: one step of the parity model with a kv head replicated over tp 2, the
# [gate; up] weight and RMSNorm, 4 microbatches accumulated.
CLIP_BASE = ["--layers", "3", "--hidden", "64", "--heads", "4", "--ffn", "96", "--seq", "12",
             "--global-batch", "8", "--steps", "1", "--lr", "3e-3", "--seed", "7"]
MAX_NORM = 0.05   # well below the first step's norm, so every case really clips


def layout_name(dp, tp, pp):
    return f"dp{dp}-tp{tp}-pp{pp}"


def cases(dp, tp, pp):
    """(flags, label) of every case one layout runs: SP on/off where tp > 1, the fewest and
    several microbatches, ZeRO-1 on every other case where dp > 1."""
    out = []
    for sp in ((False, True) if tp > 1 else (False,)):
        for m in (pp, 4):
            i = len(out)
            flags = BASE + VARIANTS[(i + dp + pp) % len(VARIANTS)] + [
                "--dp", str(dp), "--tp", str(tp), "--pp", str(pp), "--microbatches", str(m)]
            flags += ["--sp"] if sp else []
            flags += ["--zero"] if dp > 1 and i % 2 == 0 else []
            out.append(flags)
    return out


def clip_cases(dp, tp, pp):
    zero = ["--zero"] if dp > 1 else []
    sp = ["--sp"] if tp > 1 else []
    # One case per layout, every sharing rule at once: a kv head replicated over tp 2, the tied
    # embedding on two stages, SP norms, ZeRO-1 slices, and 4 microbatches accumulated.
    return [["--kv-heads", "1", "--norm", "rmsnorm", "--mlp", "swiglu", "--microbatches", "4"] + zero + sp]


_REFERENCES = {}


def _reference(args, config, clip_grad=None):
    """The same training in one process: whole batch, plain GPT, torch AdamW. The layouts
    of a launch share the model variants, so each variant is trained once per process."""
    from hybridpar_ext.models import GPT
    from hybridpar_ext.train import Batches

    key = (repr(config), args.seed, args.data, args.seq, args.global_batch, args.steps, args.lr,
           args.weight_decay, clip_grad)
    if key not in _REFERENCES:
        torch.manual_seed(args.seed)
        model = GPT(config)
        batches = Batches(args.data, config.vocab_size, args.seq, args.global_batch, args.seed)
        _REFERENCES[key] = train_reference(model, [batches(s) for s in range(1, args.steps + 1)],
                                           args.lr, args.weight_decay, clip_grad=clip_grad)
    return _REFERENCES[key]


def _train_and_compare(rank, world, dp, tp, pp):
    import torch.distributed as dist

    from hybridpar_ext.models import GPT
    from hybridpar_ext.parallel import gather_state_dict
    from hybridpar_ext.train import Trainer, check_args, parse_args

    report = []
    for flags in cases(dp, tp, pp):
        args = parse_args(flags)
        config = check_args(args, world)
        args.dtype = "float32"
        trainer = Trainer(args, config, torch.device("cpu"))
        initial = gather_state_dict(trainer.stage, trainer.mesh, config)
        losses, grads = [], None
        for step in range(1, args.steps + 1):
            losses.append(trainer.step(step)["loss"])
            if grads is None:
                averaged = trainer.sync.averaged_grads()
                named = dict(trainer.stage.named_parameters(remove_duplicate=False))
                grads = gather_state_dict(trainer.stage, trainer.mesh, config,
                                          {n: averaged[p].detach().clone() for n, p in named.items()})
        label = f"{layout_name(dp, tp, pp)}: " + " ".join(flags[len(BASE):])
        if rank == 0:
            torch.manual_seed(args.seed)
            plain = GPT(config).state_dict()
            assert set(initial) == set(plain), f"[{label}] {sorted(set(initial) ^ set(plain))}"
            for name, w in plain.items():
                assert torch.equal(initial[name], w), f"[{label}] initial weight {name} differs"
            ref_losses, ref_grads, _ = _reference(args, config)
            for step, (a, e) in enumerate(zip(losses, ref_losses), 1):
                assert_close_to_reference(torch.tensor(a), torch.tensor(e, dtype=torch.float64),
                                          torch.float32, f"[{label}] loss of step {step}")
            assert set(grads) == set(ref_grads), f"[{label}] {sorted(set(grads) ^ set(ref_grads))}"
            for name, g in ref_grads.items():
                assert_close_to_reference(grads[name], g.double(), torch.float32, f"[{label}] grad {name}")
            report.append({"case": label, "losses": losses, "reference": ref_losses})
        del trainer
        dist.barrier()
    return report


def _clip_and_compare(rank, world, dp, tp, pp):
    import torch.distributed as dist

    from hybridpar_ext.parallel import gather_state_dict
    from hybridpar_ext.train import Trainer, check_args, parse_args

    checked = []
    for extra in clip_cases(dp, tp, pp):
        flags = CLIP_BASE + extra + ["--dp", str(dp), "--tp", str(tp), "--pp", str(pp), "--clip-grad", str(MAX_NORM)]
        args = parse_args(flags)
        config = check_args(args, world)
        args.dtype = "float32"
        trainer = Trainer(args, config, torch.device("cpu"))
        record = trainer.step(1)
        averaged = trainer.sync.averaged_grads()
        named = dict(trainer.stage.named_parameters(remove_duplicate=False))
        grads = gather_state_dict(trainer.stage, trainer.mesh, config,
                                  {n: averaged[p].detach().clone() for n, p in named.items()})
        label = f"{layout_name(dp, tp, pp)}: " + " ".join(extra)
        if rank == 0:
            _, ref_grads, (ref_norm,) = _reference(args, config, clip_grad=args.clip_grad)
            assert ref_norm > 2 * MAX_NORM, f"[{label}] the case does not clip (norm {ref_norm})"
            assert_close_to_reference(torch.tensor(record["grad_norm"]), torch.tensor(ref_norm, dtype=torch.float64),
                                      torch.float32, f"[{label}] grad norm")
            assert set(grads) == set(ref_grads), f"[{label}] {sorted(set(grads) ^ set(ref_grads))}"
            for name, g in ref_grads.items():
                assert_close_to_reference(grads[name], g.double(), torch.float32, f"[{label}] clipped grad {name}")
            checked.append(label)
        del trainer
        dist.barrier()
    return checked


def check_layouts(rank, world, layouts):
    """Parity, then clipping, on each layout in turn; each Trainer builds its own mesh."""
    return {layout_name(*lay): {"parity": _train_and_compare(rank, world, *lay),
                                "clip": _clip_and_compare(rank, world, *lay)}
            for lay in map(tuple, layouts)}


@pytest.mark.parametrize("world", list(WORLDS), ids=[
    "+".join(layout_name(*lay) for lay in layouts) for layouts in WORLDS.values()])
def test_layouts_match_one_process(world):
    layouts = WORLDS[world]
    report = run_ranks(check_layouts, world, timeout=240 * len(layouts), layouts=layouts)[0]
    assert list(report) == [layout_name(*lay) for lay in layouts]
    for lay in layouts:
        name = layout_name(*lay)
        assert len(report[name]["parity"]) == len(cases(*lay)), f"{name}: parity cases missing"
        assert len(report[name]["clip"]) == len(clip_cases(*lay)), f"{name}: clipping cases missing"
        for case in report[name]["parity"]:
            if "synthetic" not in case["case"]:   # uniform random tokens leave nothing to learn
                assert case["losses"][-1] < case["losses"][0], f"{case['case']}: the loss did not go down"
