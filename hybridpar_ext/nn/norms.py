"""Drop-in LayerNorm and RMSNorm.

They subclass the torch modules, so the constructor arguments, parameters, state_dict
keys and ``reset_parameters`` are torch's own; only ``forward`` changes: it runs the fused
op and optionally takes a ``residual`` to add first (returning ``(out, input + residual)``).
"""

import math

import torch

from .. import ops


def _flatten_trailing(module, x, residual):
    """Views x (and residual) so that the normalised dims are one: the ops normalise the last."""
    shape = tuple(module.normalized_shape)
    if tuple(x.shape[-len(shape):]) != shape:
        raise ValueError(f"{type(module).__name__}: input's trailing dimensions must be "
                         f"{shape}, got input of shape {tuple(x.shape)}")
    if len(shape) == 1:
        return x, residual
    width = math.prod(shape)
    flat = lambda t: None if t is None else t.reshape(*t.shape[:-len(shape)], width)  # noqa: E731
    return flat(x), flat(residual)


def _flat_param(p):
    return None if p is None else p.reshape(-1)


def _restore(out, x, residual):
    if residual is None:
        return out.view(x.shape)
    y, h = out
    return y.view(x.shape), h.view(x.shape)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` on the fused kernel. ``forward(x, residual=None)``."""

    def forward(self, input, residual=None):
        x, res = _flatten_trailing(self, input, residual)
        out = ops.layer_norm(x, _flat_param(self.weight), _flat_param(self.bias), self.eps, res)
        return _restore(out, input, residual)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` on the fused kernel. ``forward(x, residual=None)``.

    Its ``weight`` also loads from Hugging Face's ``LlamaRMSNorm`` (give ``eps`` the
    value of that module's ``variance_epsilon``). ``eps=None`` means
    ``torch.finfo(input.dtype).eps``, as in torch.
    """

    def forward(self, input, residual=None):
        x, res = _flatten_trailing(self, input, residual)
        eps = torch.finfo(input.dtype).eps if self.eps is None else self.eps
        out = ops.rms_norm(x, _flat_param(self.weight), eps, res)
        return _restore(out, input, residual)
