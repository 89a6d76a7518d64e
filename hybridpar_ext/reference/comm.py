"""The communication ops as their plain compositions: collective, then matmul (or matmul,
then collective), with nothing overlapped. They are the fallback under
``HYBRIDPAR_BACKEND=reference``, the baseline of ``python -m bench comm`` and the oracle of
the tests. Autograd goes through ``torch.distributed.nn.functional``."""

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def all_gather_matmul(x: Tensor, weight: Tensor, group, gather_dim: int = 0):
    """``(all_gather(x, gather_dim) @ weight.T, all_gather(x, gather_dim))``."""
    gathered = torch.cat(dist_fn.all_gather(x.contiguous(), group=group), dim=gather_dim)
    return gathered @ weight.t(), gathered


def matmul_reduce_scatter(x: Tensor, weight: Tensor, group, scatter_dim: int = 0) -> Tensor:
    """``reduce_scatter(x @ weight.T)`` along ``scatter_dim``."""
    y = x @ weight.t()
    pieces = [p.contiguous() for p in y.chunk(dist.get_world_size(group), dim=scatter_dim)]
    out = torch.empty_like(pieces[0])
    return dist_fn.reduce_scatter(out, pieces, group=group)


def all_reduce_gradients(params, group) -> None:
    """Average every ``param.grad`` over the group after backward, one collective per
    gradient (a parameter without a gradient contributes zeros)."""
    world = dist.get_world_size(group)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=group)
        p.grad.div_(world)
