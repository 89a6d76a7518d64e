"""Activation recomputation, applied to a model's transformer layers from outside.

- ``full``: each layer keeps only its inputs; backward reruns its forward
  (``torch.utils.checkpoint``, non-reentrant) and then its backward.
- ``selective``: each layer keeps the outputs of its expensive ops — the matmuls, the fused
  attention and the communication-overlapped matmuls — and recomputes the cheap elementwise
  work between them (the norms and their residual adds, RoPE, the GELU or SiLU-times-up) in
  backward. torch's selective activation checkpointing decides op by op from a policy; our
  attention and overlap ops are ``torch.library`` custom ops, so the policy can name them.
  The policy names c10d's collectives too, but a collective called in place (the
  tensor-parallel all-reduce of a row-parallel output without sequence parallelism) is rerun
  by the recomputation like any mutation, exactly as under ``full``: one all-reduce per layer
  and step more (the layer's last one is never recomputed: torch stops the recomputation once
  it has what backward needs). Every rank reruns the same ones in the same order.

The wrapping replaces each layer's ``forward`` on the instance, so module names, parameters and
state_dict keys stay as they are (checkpoints and the shard specs see the same model).
"""

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "selective", "full")

_SAVED_ATEN = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
               torch.ops.aten._scaled_dot_product_flash_attention.default,
               torch.ops.aten._scaled_dot_product_efficient_attention.default}


def _saved_namespaces():
    # Our fused attention and overlapped matmuls; c10d's collectives (kept, never reissued).
    return {"hybridpar", "c10d", "_c10d_functional"}


def _policy(ctx, op, *args, **kwargs):
    namespace = getattr(op, "namespace", None) or op.name().split("::")[0]
    if op in _SAVED_ATEN or namespace in _saved_namespaces():
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def transformer_layers(model):
    """The transformer layers of `model` (our :class:`~hybridpar_ext.nn.TransformerLayer` and
    the parallel layers built on it, and the Hugging Face decoder layers of a
    :class:`~hybridpar_ext.parallel.plans.llama.DecoderStage`), outermost first."""
    from ..nn import TransformerLayer
    from ..parallel.plans.llama import DecoderStage

    layers = []
    for m in model.modules():
        if isinstance(m, TransformerLayer):
            layers.append(m)
        elif isinstance(m, DecoderStage):
            layers.extend(m.model.layers.values())
    return layers


def apply_recompute(model, mode: str):
    """Make every transformer layer of `model` recompute its activations in backward (`mode`
    ``full`` or ``selective``; ``none`` leaves it as it is). Returns the layers wrapped."""
    if mode not in MODES:
        raise ValueError(f"--recompute must be one of {', '.join(MODES)}, got {mode!r}")
    from ..parallel.plans.llama import SELECTIVE_UNDER_TP, DecoderStage

    if mode == "selective" and any(isinstance(m, DecoderStage) and m.mesh.tp > 1 for m in model.modules()):
        raise ValueError(SELECTIVE_UNDER_TP)   # a layout the planner chose (flags are refused earlier)
    layers = transformer_layers(model) if mode != "none" else []
    for layer in layers:
        if getattr(layer, "_recompute", None) is not None:
            raise ValueError(f"apply_recompute: a layer already recomputes ({layer._recompute})")
        layer._recompute = mode
        layer.forward = functools.partial(_recomputed_forward, type(layer).forward.__get__(layer), mode)
    return layers


def _recomputed_forward(forward, mode, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)   # evaluation: nothing is kept anyway
    from ..parallel import weight_grad

    recording = weight_grad.recording()
    if recording is not None:
        # Zero bubble: the recomputation runs in B, where no store records; it must take the
        # forward's deferring path again, or it saves other tensors than the forward did.
        forward = functools.partial(weight_grad.replay_recording, forward, recording)
    if mode == "full":
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _policy), **kwargs)


def saved_activation_bytes(fn, *args):
    """(bytes, outputs): the bytes of the tensors created while ``fn(*args)`` runs that are still alive once it has
    returned, besides its outputs: what autograd keeps for backward. Device-agnostic (counts
    storages, each once), so it measures recomputation on a CPU as on a GPU."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode

    created = []   # every storage made, even at an address a freed one had: (weakref, address, bytes)

    class _Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if getattr(func, "is_view", False):
                return out   # a view shares its base's storage: nothing new
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    created.append((StorageWeakRef(storage), storage.data_ptr(), storage.nbytes()))
            return out

    with _Record():
        out = fn(*args)
    outputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves(out)
               if isinstance(t, torch.Tensor)}
    alive = {ptr: size for ref, ptr, size in created if not ref.expired() and ptr not in outputs}
    return sum(alive.values()), out
