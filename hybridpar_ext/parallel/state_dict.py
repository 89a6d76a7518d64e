"""Moving state_dicts between a model's plain form and its tensor-parallel form, from the
:class:`~hybridpar_ext.parallel.spec.ShardSpec` of each parameter (never from its name).

- :func:`shard_tensor`: this rank's local tensor of a global one (its segments concatenated
  along the spec's dimension, then zero padding);
- :func:`merge_tensors_by_specs`: the global tensor from every TP rank's local tensor and spec
  (each segment taken from its replica 0; padding dropped);
- :func:`split_by_specs` / :func:`merge_by_specs`: the same over whole state_dicts;
- :func:`gather_state_dict`: the full, plain-shaped state_dict of a parallelized module on
  every rank (TP slices all-gathered and merged, pipeline stages exchanged).

A parallelized module keeps the plain model's parameter names, so its state_dict is a subset
of the plain one's keys (a pipeline stage holds some of them) with some tensors cut.
"""

import torch
import torch.distributed as dist

from .spec import ShardSpec


def shard_tensor(tensor: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """This rank's local tensor of the global `tensor` under `spec` (a new tensor)."""
    if tuple(tensor.shape) != spec.global_shape:
        raise ValueError(f"shard_tensor: tensor of shape {tuple(tensor.shape)} does not match the "
                         f"spec's global shape {spec.global_shape}")
    if tensor.dim() == 0 or spec.is_replicated:
        return tensor.clone()
    pieces = [tensor.narrow(spec.dim, s.start, s.length) for s in spec.segments]
    if spec.padding:
        shape = list(tensor.shape)
        shape[spec.dim] = spec.padding
        pieces.append(tensor.new_zeros(shape))
    if not pieces:
        return tensor.new_zeros(spec.local_shape)
    return torch.cat(pieces, dim=spec.dim)


def merge_tensors_by_specs(parts, specs) -> torch.Tensor:
    """The global tensor from the local tensors `parts` of every TP rank and their `specs`.
    Each global index is read from the replica 0 that holds it; raises if one is held by none."""
    spec0 = specs[0]
    if len(spec0.global_shape) == 0:
        return parts[0].clone()
    out = parts[0].new_empty(spec0.global_shape)
    covered = torch.zeros(spec0.global_shape[spec0.dim], dtype=torch.bool)
    for part, spec in zip(parts, specs):
        if tuple(part.shape) != spec.local_shape:
            raise ValueError(f"merge: a part of shape {tuple(part.shape)} does not match its spec's "
                             f"local shape {spec.local_shape}")
        for offset, seg in spec.local_segments():
            if seg.replica == 0:
                out.narrow(spec.dim, seg.start, seg.length).copy_(part.narrow(spec.dim, offset, seg.length))
                covered[seg.start:seg.stop] = True
    if not bool(covered.all()):
        missing = (~covered).nonzero().flatten()
        raise ValueError(f"merge: indices {missing[:8].tolist()}... of dimension {spec0.dim} are held by "
                         "no rank's replica 0")
    return out


def split_by_specs(state_dict: dict, specs: dict) -> dict:
    """The entries of a plain `state_dict` named in `specs` (one rank's specs), each cut to its
    local tensor: loads with ``load_state_dict`` into the parallelized module."""
    missing = set(specs) - set(state_dict)
    if missing:
        raise KeyError(f"split_by_specs: the state_dict lacks {sorted(missing)}")
    return {name: shard_tensor(state_dict[name], spec) for name, spec in specs.items()}


def merge_by_specs(shards, specs_by_rank) -> dict:
    """The plain state_dict of one pipeline stage from the state_dicts `shards` of its TP ranks
    and their specs (both by TP rank)."""
    return {name: merge_tensors_by_specs([s[name] for s in shards], [sp[name] for sp in specs_by_rank])
            for name in shards[0]}


def gather_state_dict(module, mesh, config=None, tensors: dict = None) -> dict:
    """The full, plain-shaped state_dict of a parallelized module (a pipeline stage) on every
    rank: TP slices all-gathered and merged by their specs, stages exchanged over PP.
    ``tensors`` (name -> tensor, same shapes as the parameters: gradients, say) replaces the
    parameters. ``config`` is not needed (the specs say it all) and is accepted for callers of
    the GPT-only version. Meant for tests and exports: it moves every tensor through every rank."""
    from .spec import shard_specs

    if tensors is None:
        tensors = {k: v.detach() for k, v in module.state_dict().items()}
    specs = shard_specs(module)
    all_specs = [None] * mesh.tp
    dist.all_gather_object(all_specs, {n: specs[n] for n in tensors}, group=mesh.tp_group)
    merged = {}
    for name, t in tensors.items():
        parts = [torch.empty_like(t) for _ in range(mesh.tp)]
        dist.all_gather(parts, t.contiguous(), group=mesh.tp_group)
        merged[name] = merge_tensors_by_specs([p.cpu() for p in parts], [s[name] for s in all_specs])
    stages = [None] * mesh.pp
    dist.all_gather_object(stages, merged, group=mesh.pp_group)
    full = {}
    for stage in stages:
        full.update(stage)
    return full
