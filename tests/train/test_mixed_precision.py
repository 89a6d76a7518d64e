"""Mixed precision on the CPU with bf16: the failure master weights prevent (an AdamW update
below bf16's resolution, kept with float32 master weights and lost with bf16 parameters),
bf16 compute with float32 gradients accumulated across microbatches, and the GPT's loss and
gradients against float64 within bf16's tolerance."""

import copy

import torch

from hybridpar_ext.models import GPT, GPTConfig
from hybridpar_ext.testing import assert_close_to_reference
from hybridpar_ext.train.precision import apply_mixed_precision


def _adamw_steps(model, steps, lr):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    x = torch.ones(4, 6)
    for _ in range(steps):
        opt.zero_grad()
        model(x.to(next(model.parameters()).dtype)).sum().backward()
        opt.step()


def test_update_below_bf16_resolution_is_kept_with_master_weights_and_lost_without():
    # Weights at 1.0, where bf16's spacing is 2**-7: AdamW's first steps move them by about lr
    # each (the normalised step is ~1), and lr = 1e-3 is below half that spacing.
    steps, lr = 12, 1e-3
    master = torch.nn.Linear(6, 5, bias=False)
    torch.nn.init.ones_(master.weight)
    plain_bf16 = copy.deepcopy(master).to(torch.bfloat16)
    apply_mixed_precision(master, torch.bfloat16)
    _adamw_steps(master, steps, lr)
    _adamw_steps(plain_bf16, steps, lr)
    # Without master weights every update rounded back to 1.0: training did nothing.
    assert torch.equal(plain_bf16.weight, torch.ones_like(plain_bf16.weight))
    # With them the updates added up in float32 ...
    torch.testing.assert_close(master.weight, torch.full_like(master.weight, 1 - steps * lr), rtol=0, atol=2e-4)
    # ... and the bf16 weights the forward computes with have moved too.
    assert (master.weight.to(torch.bfloat16) < 1).all()


def _gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=96, max_seq_len=20, layers=2, hidden=48, heads=3, kv_heads=1, ffn=80,
                         norm="rmsnorm", mlp="swiglu"))


def test_bf16_compute_float32_gradients_accumulated_over_microbatches():
    model = _gpt()
    apply_mixed_precision(model, torch.bfloat16)
    seen = []
    model.layers[0].register_forward_hook(lambda m, a, out: seen.extend(t.dtype for t in out))
    tokens = torch.randint(0, 96, (4, 21), generator=torch.Generator().manual_seed(2))
    per_microbatch = []
    for half in tokens.chunk(2):
        model.zero_grad()
        model(half[:, :-1], half[:, 1:]).backward()
        per_microbatch.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert set(seen) == {torch.bfloat16}                                   # activations in bf16
    assert {p.dtype for p in model.parameters()} == {torch.float32}        # master weights
    model.zero_grad()
    for half in tokens.chunk(2):
        model(half[:, :-1], half[:, 1:]).backward()                       # accumulate
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        # The float32 sum of the two bf16-computed gradients, not a bf16 sum.
        torch.testing.assert_close(p.grad, per_microbatch[0][name] + per_microbatch[1][name], rtol=1e-6, atol=1e-7)


def test_gpt_loss_and_gradients_against_float64():
    reference, model = _gpt().double(), _gpt()
    apply_mixed_precision(model, torch.bfloat16)
    tokens = torch.randint(0, 96, (3, 21), generator=torch.Generator().manual_seed(3))
    expected = reference(tokens[:, :-1], tokens[:, 1:])
    expected.backward()
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert_close_to_reference(loss.detach(), expected.detach(), torch.bfloat16, "loss")
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert_close_to_reference(p.grad, grads[name].grad, torch.bfloat16, f"grad {name}")
