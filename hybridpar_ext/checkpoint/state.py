"""What a rank saves and loads: its parameters and optimizer state as :class:`Chunked` global
tensors, under names that do not depend on the layout.

=====================================  ===============================================================
``model.<param>``                      the parameter (plain model's name and global shape)
``optim.<param>.exp_avg``, ``.exp_avg_sq``  AdamW's moments, per parameter, in global shape
``optim.<param>.master``               the fp32 master weight, where the optimizer keeps one (ZeRO-1)
``optim.step``                         AdamW's step count (one number: every parameter has taken it)
=====================================  ===============================================================

Every tensor is a whole parameter's global tensor, however the run that saved it was split:
tensor-parallel slices are boxes of it (from the shard specs), ZeRO-1's flat fp32 slices too
(each rank's slice of a gradient bucket covers a contiguous range of some parameters' elements,
cut into boxes by :func:`~hybridpar_ext.checkpoint.chunks.flat_boxes`). So a checkpoint saved with
ZeRO-1 over 4 ranks loads into plain AdamW on one, and the reverse.

Who writes what: a parameter (and, without ZeRO-1, its moments) is written by data-parallel
rank 0, each element by the tensor-parallel rank holding its replica 0; with ZeRO-1 each
data-parallel rank writes the elements of its own slices. The last pipeline stage's copy of a
tied embedding (its spec's ``tied_to``) is not written; it is loaded from the name it is tied to.
Every holder loads every element it holds.
"""

from typing import Dict, List

import torch

from ..parallel.spec import shard_specs
from .chunks import Chunked, flat_boxes, spec_boxes

MODEL, OPTIM = "model.", "optim."
MOMENTS = ("exp_avg", "exp_avg_sq")
STEP_KEY = OPTIM + "step"


def _modules(stage) -> list:
    """A rank's model chunks (interleaved pipelines hold several, in a ModuleList), or its stage."""
    return list(stage) if isinstance(stage, (list, tuple, torch.nn.ModuleList)) else [stage]


def stage_params(stage):
    """``[(name, parameter, spec)]`` of every distinct parameter of `stage` (a module, or the
    list of model chunks a rank holds), by its first name."""
    out, seen = [], set()
    for module in _modules(stage):
        specs = shard_specs(module)
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) not in seen:
                seen.add(id(p))
                out.append((name, p, specs[name]))
    return out


class Entries:
    """The DCP state_dict of one rank (``values``: name -> :class:`Chunked` or a plain value)
    and the copies a load owes afterwards (:func:`finish_copies`)."""

    def __init__(self):
        self.values: Dict[str, object] = {}
        self.copies: List[tuple] = []   # (boxes of a second holder, the Chunked loaded first)


def model_entries(entries: Entries, stage, mesh, for_save: bool) -> None:
    """The parameters of `stage`: for a save only the copies that count (data-parallel rank 0,
    tensor-parallel replica 0, not a tied copy); for a load every element this rank holds."""
    if for_save and mesh.dp_rank != 0:
        return
    for name, p, spec in stage_params(stage):
        if for_save and spec.tied_to is not None:
            continue
        key = MODEL + (spec.tied_to or name)
        _add(entries, key, spec.global_shape, spec_boxes(p.data, spec, counted_only=for_save))


def _add(entries: Entries, key: str, shape, boxes) -> None:
    if not boxes:
        return
    if key in entries.values:
        # The same global tensor twice on this rank (a tied embedding whose first and last
        # stages are both held here, as interleaved chunks): only loads get here (a save skips
        # tied copies). Load the first, copy into the second.
        entries.copies.append((boxes, entries.values[key]))
        return
    entries.values[key] = Chunked(shape, boxes)


def finish_copies(entries: Entries) -> None:
    """After a load: fill the second holders of a tensor from the first, box by box."""
    for boxes, first in entries.copies:
        by_offsets = {offsets: view for offsets, view in first.boxes}
        for offsets, view in boxes:
            view.copy_(by_offsets[offsets])


# ---------------------------------------------------------------- optimizers


def _adam_state(optimizer, p) -> dict:
    """AdamW's state of `p`, created as torch creates it on the first step if it is not there
    yet (so a fresh optimizer can be loaded into, and one saved before its first step)."""
    state = optimizer.state[p]
    if not state:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for k in MOMENTS:
            state[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def _check_adam(optimizer, what):
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(f"checkpoint: {what} must be torch.optim.Adam/AdamW or ZeroAdamW, got "
                        f"{type(optimizer).__name__}")
    for group in optimizer.param_groups:
        if group.get("amsgrad"):
            raise ValueError("checkpoint: AdamW with amsgrad=True is not supported")


def optimizer_entries(entries: Entries, optimizer, stage, mesh, for_save: bool, with_master: bool = True) -> list:
    """The optimizer's state of `stage`'s parameters. Returns the optimizer's state dicts
    (each with its ``step``), for :func:`finish_optimizer_load`."""
    from ..parallel.data import ZeroAdamW

    if isinstance(optimizer, ZeroAdamW):
        return _zero_entries(entries, optimizer, stage, mesh, for_save, with_master)
    _check_adam(optimizer, "the optimizer")
    params = {id(p): (name, p, spec) for name, p, spec in stage_params(stage)}
    states = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in params:
                raise ValueError("checkpoint: the optimizer holds a parameter the stage does not")
            name, _, spec = params[id(p)]
            state = _adam_state(optimizer, p)
            states.append(state)
            if for_save and (spec.tied_to is not None or mesh.dp_rank != 0):
                continue
            for k in MOMENTS:
                _add(entries, f"{OPTIM}{spec.tied_to or name}.{k}", spec.global_shape,
                     spec_boxes(state[k], spec, counted_only=for_save))
    _add_step(entries, states, mesh, for_save)
    return states


def zero_ranges(optimizer, stage):
    """``[(name, spec, param, start, master view, {moment: view})]``: for each parameter part
    that ZeroAdamW's slices on this rank cover, the elements ``[start, start + view.numel())``
    of the flattened local parameter and the views of the master and moments that hold them."""
    names = {id(p): (name, spec) for name, p, spec in stage_params(stage)}
    out = []
    for reducer, bucket, master in optimizer.slices:
        lo = optimizer.rank * master.numel()
        hi = lo + master.numel()
        state = _adam_state(optimizer.optimizer, master)
        for i in reducer.bucket_indices[bucket]:
            p, offset = reducer.params[i], reducer.offsets[i]
            a, b = max(lo, offset), min(hi, offset + p.numel())
            if a >= b:
                continue
            name, spec = names[id(p)]
            out.append((name, spec, p, a - offset, master[a - lo:b - lo],
                        {k: state[k][a - lo:b - lo] for k in MOMENTS}))
    return out


def _zero_entries(entries, optimizer, stage, mesh, for_save, with_master):
    grouped: Dict[tuple, list] = {}
    for name, spec, p, start, master, moments in zero_ranges(optimizer, stage):
        if for_save and spec.tied_to is not None:
            continue
        key = spec.tied_to or name
        views = dict(moments, **({"master": master} if with_master else {}))
        for k, view in views.items():
            boxes = flat_boxes(view, p.shape, start, spec, counted_only=for_save)
            # A parameter may span several buckets' slices: its boxes are gathered first.
            grouped.setdefault((f"{OPTIM}{key}.{k}", id(p)), [spec.global_shape, []])[1].extend(boxes)
    for (key, _), (shape, boxes) in grouped.items():
        _add(entries, key, shape, boxes)
    states = [_adam_state(optimizer.optimizer, m) for _, _, m in optimizer.slices]
    _add_step(entries, states, mesh, for_save)
    return states


def _add_step(entries, states, mesh, for_save):
    steps = {float(s["step"]) for s in states}
    if len(steps) > 1:
        raise ValueError(f"checkpoint: the optimizer's parameters have taken different numbers of steps {sorted(steps)}")
    if not for_save or _is_global_rank0(mesh):
        entries.values[STEP_KEY] = torch.tensor(steps.pop() if steps else 0.0, dtype=torch.float64)


def _is_global_rank0(mesh) -> bool:
    return mesh.dp_rank == 0 and mesh.pp_rank == 0 and mesh.tp_rank == 0


def finish_optimizer_load(entries: Entries, optimizer, stage, states: list, has_master: bool) -> None:
    """After a load: every state's step from ``optim.step``; ZeroAdamW's fp32 masters from the
    loaded parameters where the checkpoint had none (a run without ZeRO-1 saved it)."""
    from ..parallel.data import ZeroAdamW

    step = float(entries.values[STEP_KEY])
    for state in states:
        state["step"].fill_(step)
    if isinstance(optimizer, ZeroAdamW) and not has_master:
        with torch.no_grad():
            for _, _, p, start, master, _ in zero_ranges(optimizer, stage):
                master.copy_(p.detach().reshape(-1)[start:start + master.numel()])


__all__ = ["Entries", "MODEL", "OPTIM", "STEP_KEY", "finish_copies", "finish_optimizer_load", "model_entries",
           "optimizer_entries", "stage_params", "zero_ranges"]
