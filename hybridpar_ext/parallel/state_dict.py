"""Moving a GPT's state_dict between its plain form and its DP x TP x PP form.

The parallel model keeps the plain model's parameter names (``embed.weight``,
``layers.{i}.attn.qkv.weight``, ...: layer ``i`` keeps its global index on whichever pipeline
stage holds it), so a rank's state_dict is a subset of the plain one's keys with some tensors
cut. The split over ``tp`` ranks, rank ``r`` taking slice ``r`` of ``tp`` equal slices:

=============================  ==================================================================
``embed.weight``, ``lm_head``  rows (vocabulary): ``[r*V/tp, (r+1)*V/tp)``
``attn.qkv.weight``            rows ``[q of heads r*h/tp.. ; k of its kv heads ; v of its kv heads]``;
                               with fewer kv heads than ranks, rank ``r`` holds kv head
                               ``r // (tp/kv_heads)`` (its query heads' group), replicated
``attn.out_proj.weight``       columns (query heads) ``r``-th slice
``mlp.fc1.weight``             GELU: rows ``r``-th slice; SwiGLU: ``[gate r-th slice ; up r-th slice]``
``mlp.fc2.weight``             columns ``r``-th slice
norms                          whole on every rank
=============================  ==================================================================

Pipeline stage ``s`` of ``pp`` holds the layers :func:`stage_layers` gives it; stage 0 also
holds ``embed``, the last stage ``norm`` and ``lm_head`` (with tied embeddings and ``pp > 1`` the
last stage keeps its own copy of the embedding as ``lm_head.weight``, kept equal by summing
the two gradients). Data-parallel ranks hold identical copies. Merging is the inverse: for
each name, the ``tp`` slices are concatenated (a replicated kv head is taken from the first
rank that holds it, a norm from rank 0), and the stages' dicts are united.
"""

import torch
import torch.distributed as dist

from .transformer import kv_heads_per_rank


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """The layers of pipeline stage `stage`: consecutive, as even as can be, the earlier
    stages taking one more when `pp` does not divide `num_layers`."""
    if num_layers < pp:
        raise ValueError(f"layers ({num_layers}) must be at least the number of pipeline stages ({pp})")
    base, extra = divmod(num_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


def on_stage(name: str, config, pp: int, stage: int) -> bool:
    if name.startswith("embed."):
        return stage == 0
    if name.startswith(("norm.", "lm_head.")):
        return stage == pp - 1
    if name.startswith("layers."):
        return int(name.split(".")[1]) in stage_layers(config.layers, pp, stage)
    raise KeyError(f"unknown GPT parameter {name!r}")


def _qkv_rows(config, tp: int, rank: int):
    """Row ranges of the full qkv weight that rank `rank` holds, in its order."""
    hd = config.hidden // config.heads
    local_kv, replicas = kv_heads_per_rank(config.heads, config.kv_heads, tp)
    q_per_rank = config.heads // tp * hd
    first_kv = rank // replicas * local_kv   # replicated: local_kv is 1; split: replicas is 1
    k0, v0 = config.heads * hd, (config.heads + config.kv_heads) * hd
    return [(rank * q_per_rank, (rank + 1) * q_per_rank),
            (k0 + first_kv * hd, k0 + (first_kv + local_kv) * hd),
            (v0 + first_kv * hd, v0 + (first_kv + local_kv) * hd)]


def _kind(name: str) -> str:
    if name.endswith("attn.qkv.weight"):
        return "qkv"
    if name.endswith("mlp.fc1.weight"):
        return "fc1"
    if name.endswith(("attn.out_proj.weight", "mlp.fc2.weight")):
        return "columns"
    if name in ("embed.weight", "lm_head.weight"):
        return "rows"
    return "whole"


def split_tensor(name: str, tensor: torch.Tensor, config, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s slice of the full parameter `name` (a copy)."""
    kind = _kind(name)
    if kind == "whole":
        return tensor.clone()
    if kind == "qkv":
        return torch.cat([tensor[a:b] for a, b in _qkv_rows(config, tp, rank)]).clone()
    if kind == "fc1" and config.mlp == "swiglu":
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]]).clone()
    dim = 1 if kind == "columns" else 0
    if tensor.shape[dim] % tp:
        raise ValueError(f"{name}: dimension {dim} ({tensor.shape[dim]}) must be divisible by the "
                         f"tensor-parallel size ({tp})")
    return tensor.chunk(tp, dim=dim)[rank].clone()


def merge_tensors(name: str, parts, config) -> torch.Tensor:
    """The full parameter `name` from its slices on each of the ``len(parts)`` TP ranks."""
    tp, kind = len(parts), _kind(name)
    if kind == "whole":
        return parts[0].clone()
    if kind == "qkv":
        hd = config.hidden // config.heads
        local_kv, replicas = kv_heads_per_rank(config.heads, config.kv_heads, tp)
        q_rows = config.heads // tp * hd
        holders = range(0, tp, replicas)        # the first rank holding each kv head
        q = [p[:q_rows] for p in parts]
        k = [parts[r][q_rows:q_rows + local_kv * hd] for r in holders]
        v = [parts[r][q_rows + local_kv * hd:] for r in holders]
        return torch.cat(q + k + v)
    if kind == "fc1" and config.mlp == "swiglu":
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(list(parts), dim=1 if kind == "columns" else 0)


def shard_state_dict(state_dict: dict, config, tp: int = 1, tp_rank: int = 0, pp: int = 1,
                     pp_rank: int = 0) -> dict:
    """The entries of a plain GPT's `state_dict` that rank (tp_rank, pp_rank) holds, cut to
    its slices. Loads with ``load_state_dict`` into the module :func:`parallelize` builds."""
    return {name: split_tensor(name, t, config, tp, tp_rank) for name, t in state_dict.items()
            if on_stage(name, config, pp, pp_rank)}


def merge_state_dicts(shards, config) -> dict:
    """The plain state_dict from the state_dicts of one pipeline stage's TP ranks (by rank);
    for several stages, unite the results."""
    return {name: merge_tensors(name, [s[name] for s in shards], config) for name in shards[0]}


def gather_state_dict(module, mesh, config, tensors: dict = None) -> dict:
    """The full, plain-shaped state_dict of a parallel GPT (`module` from :func:`parallelize`),
    on every rank: TP slices all-gathered and merged, stages exchanged over PP. ``tensors``
    (name -> tensor, same shapes as the parameters: gradients, say) replaces the parameters.
    Meant for checkpoints and tests: it moves every tensor through every rank."""
    if tensors is None:
        tensors = {k: v.detach() for k, v in module.state_dict().items()}
    merged = {}
    for name, t in tensors.items():
        parts = [torch.empty_like(t) for _ in range(mesh.tp)]
        dist.all_gather(parts, t.contiguous(), group=mesh.tp_group)
        merged[name] = merge_tensors(name, [p.cpu() for p in parts], config)
    stages = [None] * mesh.pp
    dist.all_gather_object(stages, merged, group=mesh.pp_group)
    full = {}
    for stage in stages:
        full.update(stage)
    return full
