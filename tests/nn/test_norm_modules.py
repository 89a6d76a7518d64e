"""The drop-in modules against their torch (and Hugging Face) twins."""

import pytest
import torch

import hybridpar_ext.nn as hnn


def _same_outputs_and_grads(theirs, ours, x, atol=1e-5, rtol=1e-5):
    ours.load_state_dict(theirs.state_dict())
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().clone().requires_grad_()
    ya, yb = theirs(xa), ours(xb)
    torch.testing.assert_close(yb, ya, atol=atol, rtol=rtol)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xb.grad, xa.grad, atol=atol, rtol=rtol)
    for (name, pa), (_, pb) in zip(theirs.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("kwargs", [
    dict(normalized_shape=33),
    dict(normalized_shape=1000, elementwise_affine=False),
    dict(normalized_shape=96, bias=False),
    dict(normalized_shape=(3, 20), eps=1e-3),
], ids=["affine", "no_affine", "no_bias", "2d_shape"])
def test_layer_norm_is_drop_in(backend, device, kwargs):
    torch.manual_seed(0)
    theirs = torch.nn.LayerNorm(**kwargs, device=device)
    ours = hnn.LayerNorm(**kwargs, device=device)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    with torch.no_grad():  # non-trivial affine parameters
        for p in theirs.parameters():
            p.normal_()
    shape = theirs.normalized_shape
    _same_outputs_and_grads(theirs, ours, torch.randn(4, 5, *shape, device=device) * 3 + 1)


@pytest.mark.parametrize("kwargs", [
    dict(normalized_shape=33),
    dict(normalized_shape=257, eps=1e-6),
    dict(normalized_shape=64, elementwise_affine=False),
    dict(normalized_shape=(2, 24), eps=1e-5),
], ids=["default_eps", "eps", "no_affine", "2d_shape"])
def test_rms_norm_is_drop_in(backend, device, kwargs):
    torch.manual_seed(0)
    theirs = torch.nn.RMSNorm(**kwargs, device=device)
    ours = hnn.RMSNorm(**kwargs, device=device)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    _same_outputs_and_grads(theirs, ours, torch.randn(3, 7, *theirs.normalized_shape, device=device))


def test_rms_norm_loads_llama_rms_norm(backend, device):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    torch.manual_seed(0)
    theirs = llama.LlamaRMSNorm(96, eps=1e-6).to(device)
    with torch.no_grad():
        theirs.weight.normal_()
    ours = hnn.RMSNorm(96, eps=theirs.variance_epsilon, device=device)
    _same_outputs_and_grads(theirs, ours, torch.randn(2, 9, 96, device=device))


@pytest.mark.parametrize("cls", [hnn.LayerNorm, hnn.RMSNorm])
def test_residual_forward(backend, device, cls):
    norm = cls(40, device=device)
    x, r = torch.randn(3, 40, device=device), torch.randn(3, 40, device=device)
    y, h = norm(x, residual=r)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, norm(x + r))


@pytest.mark.parametrize("cls", [hnn.LayerNorm, hnn.RMSNorm])
def test_wrong_trailing_shape(cls):
    with pytest.raises(ValueError, match=r"trailing dimensions must be normalized_shape \(16,\)"):
        cls(16)(torch.randn(2, 15))


class _PreNormBlock(torch.nn.Module):
    """The pattern the fused residual serves: h = x + f(x) then norm(h), twice."""

    def __init__(self, width, norm_cls):
        super().__init__()
        self.norm1 = norm_cls(width)
        self.fc = torch.nn.Linear(width, width)
        self.norm2 = norm_cls(width)

    def forward(self, x):
        y = self.norm1(x)
        y, h = self.norm2(self.fc(y), residual=x)
        return y * h


@pytest.mark.parametrize("cls", [hnn.LayerNorm, hnn.RMSNorm])
def test_torch_compile_fullgraph(backend, device, cls):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = _PreNormBlock(48, cls).to(device)
    compiled = torch.compile(block, fullgraph=True)
    x = torch.randn(2, 5, 48, device=device, requires_grad=True)
    xc = x.detach().clone().requires_grad_()
    y, yc = block(x), compiled(xc)
    torch.testing.assert_close(yc, y)
    y.sum().backward()
    yc.sum().backward()
    torch.testing.assert_close(xc.grad, x.grad)
