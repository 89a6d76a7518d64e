"""Measured activation memory of a pipeline step: the bytes autograd keeps for backward
(counted by ``torch.autograd.graph.saved_tensors_hooks``) plus what zero bubble's
:class:`~hybridpar_ext.parallel.weight_grad.WeightGradStore` keeps for its W work, live at
each moment, and its peak.

Counted by storage, once however many graph nodes or closures hold it (a layer's input saved
by two ops, or by an op and then by the W work it left behind, is one tensor), and without
the parameters (saved by the matmuls, but not activations). A saved tensor stops counting
when autograd frees the node that saved it (after that node's backward), a store's tensor
when its W work has run.

:func:`measure_microbatch` probes one stage alone: what one microbatch's forward keeps, what
its pending W keeps, and the peaks of a full and a split backward; the trainer's zero bubble
chooses each rank's held-back W's from them (``hybridpar_ext.train.zero_bubble``)."""

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterable, Optional

import torch

from .weight_grad import WeightGradStore


class _Handle:
    """What the pack hook returns in place of a saved tensor; counts it while alive."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor, meter, key):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        self.meter._release(self.key)


class ActivationMeter:
    """``with meter.measure(params, store): pipe.step(...)``; then ``meter.peak`` (bytes)."""

    def __init__(self):
        self.saved: Dict[int, list] = {}   # storage key -> [bytes, references]
        self.store = None
        self.params = set()
        self.live = 0
        self.peak = 0
        self.peak_held = 0   # of the peak, the bytes only the store's pending W work kept

    @staticmethod
    def _key(t: torch.Tensor):
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()

    def _pack(self, t: torch.Tensor):
        key = self._key(t)
        if key in self.params or key[1] == 0:
            return t
        entry = self.saved.setdefault(key, [key[1], 0])
        entry[1] += 1
        if entry[1] == 1:
            self._update()
        return _Handle(t, self, key)

    @staticmethod
    def _unpack(handle):
        return handle.tensor if isinstance(handle, _Handle) else handle

    def _release(self, key):
        entry = self.saved.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.saved[key]
            self._update()

    def _update(self):
        held = dict((k, k[1]) for k in self.saved)
        only_store = 0
        if self.store is not None:
            for t in self.store.held_tensors():
                k = self._key(t)
                if k not in self.params and k not in held:
                    held[k] = k[1]
                    only_store += k[1]
        self.live = sum(held.values())
        if self.live > self.peak:
            self.peak, self.peak_held = self.live, only_store

    @contextlib.contextmanager
    def measure(self, params: Iterable[torch.Tensor], store: Optional[object] = None):
        """Count inside: `params` (a stage's parameters) are left out; `store` (a
        WeightGradStore, or None) adds what its pending W work holds."""
        self.params = {self._key(p) for p in params}
        self.store = store
        if store is not None:
            store.on_change = self._update
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield self
        finally:
            if store is not None:
                store.on_change = None


@dataclass
class MicrobatchMemory:
    """What one microbatch costs a stage, in the meter's bytes (:func:`measure_microbatch`)."""

    kept: int         # its forward's activations, kept for its backward
    pending_w: int    # what its deferred W work keeps from B until W
    fused_peak: int   # the peak from its forward through a full backward (1F1B's)
    split_peak: int   # the peak from its forward through B and W (zero bubble's split backward)


def measure_microbatch(stage, inputs: torch.Tensor, targets: Optional[torch.Tensor] = None,
                       grad_output: Optional[torch.Tensor] = None, split: bool = True) -> MicrobatchMemory:
    """Run one microbatch through `stage` twice, alone (no pipeline messages), as the executor
    does, and measure it: once with the full backward, once split into B (recording into a
    :class:`WeightGradStore`) and W. `inputs`: token ids on the first stage, the stacked
    activation of ``stage.activation_shape`` elsewhere; `targets` on the last stage, whose
    backward starts at its loss; `grad_output` (the output's shape) elsewhere. The stage's
    tensor-parallel collectives run, so every TP rank of a stage must probe alike. The
    parameters' gradients accumulate: the caller drops them. ``split=False`` skips the split
    run (a stage whose backwards all run fused): then nothing is pending and the split peak is
    the fused one."""
    params = list(stage.parameters())
    measured = {}
    for splitting in ((False, True) if split else (False,)):
        store = WeightGradStore() if splitting else None
        meter = ActivationMeter()
        with meter.measure(params, store):
            x = inputs if stage.is_first else inputs.detach().clone().requires_grad_()
            with store.recording(0) if splitting else contextlib.nullcontext():
                out = stage(x if stage.is_first else tuple(x.unbind(0)))
            if stage.is_last:
                out, grad = stage.loss(out, targets), None
            else:
                out, grad = (torch.stack(out) if isinstance(out, (tuple, list)) else out), grad_output
            kept = meter.live
            torch.autograd.backward(out, grad)   # B alone when splitting: W waits in the store
            del out, x
            pending = meter.live
            if splitting:
                store.run(0)
        measured[splitting] = (kept, pending, meter.peak)
    kept, _, fused_peak = measured[False]
    _, pending, split_peak = measured.get(True, (kept, 0, fused_peak))
    return MicrobatchMemory(kept, pending, fused_peak, split_peak)
