"""Drop-in LayerNorm and RMSNorm.

They subclass the torch modules, so the constructor arguments, parameters, state_dict
keys and ``reset_parameters`` are torch's own; only ``forward`` changes: it runs the fused
op (over the module's ``normalized_shape``, one or more trailing dims) and optionally takes
a ``residual`` to add first (returning ``(out, input + residual)``).
"""

import torch

from .. import ops


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` on the fused kernel. ``forward(x, residual=None)``."""

    def forward(self, input, residual=None):
        return ops.layer_norm(input, self.weight, self.bias, self.eps, residual,
                              normalized_shape=self.normalized_shape)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` on the fused kernel. ``forward(x, residual=None)``.

    Its ``weight`` also loads from Hugging Face's ``LlamaRMSNorm`` (give ``eps`` the
    value of that module's ``variance_epsilon``). ``eps=None`` means
    ``torch.finfo(input.dtype).eps``, as in torch.
    """

    def forward(self, input, residual=None):
        return ops.rms_norm(input, self.weight, self.eps, residual,
                            normalized_shape=self.normalized_shape)
