"""Zero-bubble's split backward: a store of deferred weight-gradient work, and a linear layer
that fills it.

A forward run inside :meth:`WeightGradStore.recording` builds :func:`deferrable_linear` without
an autograd edge to its weight and bias: its backward returns only the input gradient and
leaves in the store, under the recording's key, a closure that computes the weight (and bias)
gradient from the input and output gradient it keeps; :meth:`WeightGradStore.run` runs them
later (the pipeline's ``W`` action). Without the edge, nothing touches the parameters during
the input backward; with one and a gradient of None, autograd would still call the
parameter's post-accumulate hooks and a data-parallel reducer would take the parameter for
done. The closures hand their gradients to autograd
(``torch.autograd.backward`` on the parameters), so they accumulate into ``param.grad`` the
usual way and fire its post-accumulate hooks: a data-parallel bucket reducer starts a bucket
as soon as the W work of its parameters is done, as it would after a fused backward. Outside
``deferring`` the layer is an ordinary linear. This is the approach of Megatron's zero-bubble
branch and DualPipe (the layer defers its own work), not torch's ``stage_backward_weight``,
which rebuilds the weight gradient from the autograd graph, skipping gradient hooks and
custom autograd functions.

Only layers that call one of the deferrable functions here (:func:`deferrable_linear`,
:func:`deferrable_matmul`, :func:`deferrable_embedding`, :func:`deferrable_norm`) defer; any
other parameter gets its gradient during the input backward, as before, so a stage with nothing
deferrable runs a split schedule correctly with W doing nothing. Each hands its parameters to
its autograd node inside a list, never as tensor inputs: an input parameter would get its
post-accumulate hooks called in B (with no gradient) and a data-parallel reducer would take it
for done before W.
"""

import contextlib
from typing import Callable, Dict, Hashable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..ops import norms as norm_ops

_active: Optional["WeightGradStore"] = None
_active_key: Hashable = None
# An input that always requires grad, so that a deferred layer whose input does not (the first
# stage's) stays in the graph and its backward runs (its gradient is always None).
_ANCHOR = torch.empty(0, requires_grad=True)


class WeightGradStore:
    """Deferred weight-gradient work, by key (the pipeline uses (chunk, microbatch))."""

    def __init__(self):
        self.pending: Dict[Hashable, List[Callable[[], None]]] = {}
        # The tensors each pending closure keeps alive (for measuring activation memory).
        self.held: Dict[Hashable, List[torch.Tensor]] = {}
        # Called after every add and run (a memory meter's probe), or None.
        self.on_change: Optional[Callable[[], None]] = None

    @contextlib.contextmanager
    def recording(self, key: Hashable):
        """Deferrable layers run inside (a forward) leave their weight gradients, when their
        backward comes, under `key`."""
        global _active, _active_key
        if _active is not None:
            raise RuntimeError("WeightGradStore.recording: already recording")
        _active, _active_key = self, key
        try:
            yield
        finally:
            _active, _active_key = None, None

    def add(self, key: Hashable, work: Callable[[], None], holds=()) -> None:
        """Defer `work` (a closure that accumulates weight gradients) under `key`; `holds`:
        the tensors it keeps alive until it runs."""
        self.pending.setdefault(key, []).append(work)
        self.held.setdefault(key, []).extend(holds)
        if self.on_change is not None:
            self.on_change()

    def run(self, key: Hashable) -> None:
        """Compute and accumulate the weight gradients deferred under `key` (nothing if none)."""
        works = self.pending.pop(key, [])
        self.held.pop(key, None)
        for work in works:
            work()
        del works   # the closures, and what they hold, go now
        if self.on_change is not None:
            self.on_change()

    def held_tensors(self) -> List[torch.Tensor]:
        """Every tensor the pending work keeps alive."""
        return [t for ts in self.held.values() for t in ts]

    def __len__(self) -> int:
        return sum(len(v) for v in self.pending.values())


def recording() -> Optional[Tuple["WeightGradStore", Hashable]]:
    """The store and key a forward is recording into, or None: what a deferrable op of one's
    own reads in its forward, to :meth:`WeightGradStore.add` its weight-gradient work there
    in its backward."""
    return (_active, _active_key) if _active is not None else None


def replay_recording(forward: Callable, recording: Tuple["WeightGradStore", Hashable], *args, **kwargs):
    """``forward(*args, **kwargs)`` inside `recording` (what :func:`recording` returned when it
    first ran), unless a store is recording already: activation recomputation reruns a forward
    during B, and the deferrable layers must take the path they took the first time."""
    if _active is not None:
        return forward(*args, **kwargs)
    store, key = recording
    with store.recording(key):
        return forward(*args, **kwargs)



def _check_params(op: str, *tensors) -> None:
    """The tensors whose gradients a deferred layer hands to W: parameters, or a parameter's
    cast to the compute dtype (mixed precision casts each module's parameters as its forward
    begins, :mod:`hybridpar_ext.train.precision`). W gives their gradients to autograd, which
    carries a cast's back into the float32 parameter; anything computed otherwise may share
    its graph with the activations, which B has already freed."""
    for t in tensors:
        if t is None or t.grad_fn is None:
            continue
        fn = t.grad_fn
        nxt = fn.next_functions
        if type(fn).__name__ == "ToCopyBackward0" and len(nxt) == 1 and type(nxt[0][0]).__name__ == "AccumulateGrad":
            continue
        raise ValueError(f"{op}: weight and bias must be parameters or their dtype casts, got a tensor "
                         f"computed by {type(fn).__name__}")


class _DeferredLinear(torch.autograd.Function):
    """``F.linear`` on detached weight and bias; the backward defers their gradients to the store."""

    @staticmethod
    def forward(ctx, x, weight, bias, anchor, store, key, params):
        ctx.save_for_backward(x, weight)
        ctx.store, ctx.key, ctx.params = store, key, params
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        params = ctx.params

        def work():
            g = grad_out.reshape(-1, grad_out.shape[-1])
            grads = [g.t() @ x.reshape(-1, x.shape[-1])] + ([g.sum(0)] if len(params) > 1 else [])
            # Through autograd, so the gradients accumulate and the hooks fire as usual.
            torch.autograd.backward(params, grads)

        ctx.store.add(ctx.key, work, holds=(grad_out, x))
        return grad_x, None, None, None, None, None, None


def deferrable_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; inside :meth:`WeightGradStore.recording`, with the gradients
    of `weight` and `bias` (parameters, or their casts under mixed precision) deferred to the store."""
    if _active is None or not (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return F.linear(x, weight, bias)
    _check_params("deferrable_linear", weight, bias)
    params = [weight] + ([bias] if bias is not None else [])
    return _DeferredLinear.apply(x, weight.detach(), None if bias is None else bias.detach(), _ANCHOR, _active,
                                 _active_key, params)


class _DeferredMatmul(torch.autograd.Function):
    """``rule.forward(x, weight) (+ bias)`` on detached weight and bias; the backward computes
    the input gradient by ``rule.input_grad`` and defers the weight's, ``a^T b`` of the pair it
    returns (and the bias's, the output gradient summed over rows), to the store."""

    @staticmethod
    def forward(ctx, x, weight, bias, anchor, store, key, params, rule):
        y, saved = rule.forward(x, weight)
        # Saved the usual way (not as attributes), so saved-tensor hooks see what B and W keep.
        ctx.save_for_backward(weight, *saved)
        ctx.store, ctx.key, ctx.params, ctx.rule, ctx.has_bias = store, key, params, rule, bias is not None
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, grad_out):
        weight, *saved = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x, (a, b) = ctx.rule.input_grad(grad_out, weight, saved, ctx.needs_input_grad[0])
        params, has_bias = ctx.params, ctx.has_bias

        def work():
            rows = a.reshape(-1, a.shape[-1])
            grads = [rows.t() @ b.reshape(-1, b.shape[-1])]
            if has_bias:
                grads.append(grad_out.reshape(-1, grad_out.shape[-1]).sum(0))
            keep = [(p, g) for p, g in zip(params, grads) if p.requires_grad]
            torch.autograd.backward([p for p, _ in keep], [g for _, g in keep])

        ctx.store.add(ctx.key, work, holds=(grad_out, a, b))
        return grad_x, None, None, None, None, None, None, None


def deferrable_matmul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], rule) -> torch.Tensor:
    """A linear layer's matmul with its own communication, described by `rule`:
    ``rule.forward(x, weight) -> (y, saved tensors)`` and ``rule.input_grad(grad_y, weight,
    saved, needs_grad_x) -> (grad_x or None, (a, b))`` with the weight's gradient ``a^T b``
    (rows flattened). Returns ``y + bias``. Inside :meth:`WeightGradStore.recording` the
    gradients of `weight` and `bias` (parameters) are deferred to the store; outside, the
    caller should use its fused op (this raises)."""
    if _active is None:
        raise RuntimeError("deferrable_matmul: no WeightGradStore is recording")
    _check_params("deferrable_matmul", weight, bias)
    params = [weight] + ([bias] if bias is not None else [])
    return _DeferredMatmul.apply(x, weight.detach(), None if bias is None else bias.detach(), _ANCHOR, _active,
                                 _active_key, params, rule)


class _DeferredEmbedding(torch.autograd.Function):
    """A vocabulary shard's lookup (rows of `outside` tokens zero) on a detached table; the
    backward defers the table's gradient, the scatter-add of the output gradient's rows, to
    the store (the input, token ids, has none)."""

    @staticmethod
    def forward(ctx, local, outside, weight, anchor, store, key, params):
        ctx.save_for_backward(local, outside)
        ctx.store, ctx.key, ctx.params, ctx.rows = store, key, params, weight.shape[0]
        return F.embedding(local, weight).masked_fill(outside.unsqueeze(-1), 0.0)

    @staticmethod
    def backward(ctx, grad_out):
        local, outside = ctx.saved_tensors
        params, rows = ctx.params, ctx.rows

        def work():
            # What F.embedding's backward computes after masked_fill's: the same kernel.
            grad = torch.ops.aten.embedding_dense_backward(grad_out.masked_fill(outside.unsqueeze(-1), 0.0),
                                                           local, rows, -1, False)
            torch.autograd.backward(params, [grad])

        ctx.store.add(ctx.key, work, holds=(grad_out, local, outside))
        return None, None, None, None, None, None, None


def deferrable_embedding(local: torch.Tensor, outside: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.embedding(local, weight)`` with the rows of `outside` positions zeroed (a
    vocabulary-parallel shard's lookup), the gradient of `weight` (a parameter) deferred to the
    store that is recording. Call it only under :func:`deferring`."""
    if _active is None:
        raise RuntimeError("deferrable_embedding: no WeightGradStore is recording")
    _check_params("deferrable_embedding", weight)
    # The parameter goes in a list: a tensor argument would be an input of the node, and its
    # post-accumulate hooks would fire in B with no gradient, telling a data-parallel reducer
    # the table is done before W has accumulated into it (a bucket then reduced without the
    # last microbatch's rows while W wrote into it: the drift once seen at dp2 x pp2).
    return _DeferredEmbedding.apply(local, outside, weight.detach(), _ANCHOR, _active, _active_key, [weight])


class _DeferredNorm(torch.autograd.Function):
    """Our fused LayerNorm/RMSNorm (and residual add) on detached weight and bias: the backward
    computes dx only (the norm kernel with its dW/dB partial sums compiled out) and defers
    dW/dB, recomputed from the normalised input, the statistics and dy, to the store."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, anchor, store, key, params, eps, is_rms):
        y, h, mean, rstd = norm_ops.norm_forward(x, weight, bias, eps, residual, is_rms)
        ctx.has_residual = residual is not None
        ctx.save_for_backward(h if ctx.has_residual else x, weight, rstd, *(() if mean is None else (mean,)))
        ctx.store, ctx.key, ctx.params = store, key, params
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.set_materialize_grads(False)
        if ctx.has_residual:
            return y, h
        return y

    @staticmethod
    def backward(ctx, dy, dh=None):
        src, weight, rstd, *rest = ctx.saved_tensors
        mean = rest[0] if rest else None
        if dy is None:
            dy = torch.zeros_like(src)
        dx = norm_ops.norm_input_grad(dy, dh, src, weight, mean, rstd)
        params, has_weight, has_bias = ctx.params, ctx.has_weight, ctx.has_bias

        def work():
            dw, db = norm_ops.norm_weight_grads(dy, src, mean, rstd, has_weight, has_bias)
            grads = [g for g in (dw, db) if g is not None]
            keep = [(p, g.to(p.dtype).view(p.shape)) for p, g in zip(params, grads) if p.requires_grad]
            torch.autograd.backward([p for p, _ in keep], [g for _, g in keep])

        ctx.store.add(ctx.key, work, holds=(dy, src, rstd) + (() if mean is None else (mean,)))
        # h = x + residual: both receive h's gradient.
        return dx, (dx if ctx.has_residual else None), None, None, None, None, None, None, None, None


def deferrable_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                    residual: Optional[torch.Tensor] = None, is_rms: bool = False, normalized_shape=None):
    """Our fused LayerNorm (``is_rms=False``: :func:`hybridpar_ext.ops.layer_norm`) or RMSNorm
    over the trailing `normalized_shape` dims (default: the last), returning ``y`` or, with
    `residual`, ``(y, x + residual)``, with the gradients of `weight` and `bias` (parameters)
    deferred to the store that is recording. Call it only under :func:`deferring`."""
    if _active is None:
        raise RuntimeError("deferrable_norm: no WeightGradStore is recording")
    _check_params("deferrable_norm", weight, bias)
    if is_rms and eps is None:
        eps = torch.finfo(x.dtype).eps
    n = 1 if normalized_shape is None else len(tuple(normalized_shape))
    if n > 1:   # the ops normalise the last dim: merge the normalised dims into one
        if tuple(x.shape[x.dim() - n:]) != tuple(normalized_shape):
            raise ValueError(f"deferrable_norm: x's trailing dimensions must be normalized_shape "
                             f"{tuple(normalized_shape)}, got x of shape {tuple(x.shape)}")
        shape = x.shape
        out = deferrable_norm(x.flatten(x.dim() - n), weight, bias, eps,
                              None if residual is None else residual.flatten(residual.dim() - n), is_rms)
        return out.view(shape) if residual is None else (out[0].view(shape), out[1].view(shape))
    params = [p for p in (weight, bias) if p is not None]
    flat = [None if p is None else p.detach().reshape(-1) for p in (weight, bias)]
    return _DeferredNorm.apply(x, residual, flat[0], flat[1], _ANCHOR, _active, _active_key, params, eps, is_rms)


def deferring(weight: torch.Tensor) -> bool:
    """Whether a layer owning `weight` should defer its weight gradient now: a store is
    recording and the weight takes gradients."""
    return _active is not None and weight.requires_grad and torch.is_grad_enabled()


class DeferrableLinear(torch.nn.Linear):
    """``torch.nn.Linear`` (same arguments, parameters and state_dict) whose weight gradient the
    pipeline's zero-bubble schedule defers to its W actions."""

    def forward(self, x):
        return deferrable_linear(x, self.weight, self.bias)
