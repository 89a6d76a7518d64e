"""``HYBRIDPAR_DEBUG=1``: before a collective op, every rank compares what it is about to
pass (op, dtypes, shapes, options) with the others in one small all-gather, and all ranks
raise the same error naming the rank that differs — instead of hanging in a collective
whose sizes do not match, or silently mixing dtypes."""

import os
import zlib

import torch
import torch.distributed as dist

_MAX_DIMS = 8
_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64,
           torch.int8, torch.uint8, torch.bool]


def enabled() -> bool:
    return os.environ.get("HYBRIDPAR_DEBUG", "0") not in ("", "0")


_MAX_TENSORS = 4
_MAX_OPTIONS = 4
_PER_TENSOR = 2 + _MAX_DIMS


def _signature(op: str, tensors, options) -> list:
    """A fixed-length list of integers: every rank sends as many, whatever it passed."""
    if len(tensors) > _MAX_TENSORS or len(options) > _MAX_OPTIONS:
        raise ValueError(f"{op}: the debug check takes at most {_MAX_TENSORS} tensors and "
                         f"{_MAX_OPTIONS} options")
    sig = [zlib.crc32(op.encode()), len(tensors), len(options)]
    for t in tensors:
        code = _DTYPES.index(t.dtype) if t.dtype in _DTYPES else len(_DTYPES)
        dims = list(t.shape)[:_MAX_DIMS]
        sig += [code, t.dim()] + dims + [0] * (_MAX_DIMS - len(dims))
    sig += [0] * (_PER_TENSOR * (_MAX_TENSORS - len(tensors)))
    sig += [int(o) for o in options] + [0] * (_MAX_OPTIONS - len(options))
    return sig


def _describe(sig: list) -> str:
    """One rank's signature, back in words."""
    ntensors, noptions = sig[1], sig[2]
    parts = []
    for k in range(min(ntensors, _MAX_TENSORS)):
        code, ndim, *dims = sig[3 + k * _PER_TENSOR:3 + (k + 1) * _PER_TENSOR]
        dtype = str(_DTYPES[code]).replace("torch.", "") if code < len(_DTYPES) else "other"
        parts.append(f"{dtype}{list(dims[:min(ndim, _MAX_DIMS)])}")
    options = sig[3 + _PER_TENSOR * _MAX_TENSORS:][:noptions]
    return ", ".join(parts) + (f" with options {options}" if options else "")


def check_same_on_all_ranks(op: str, group, device, tensors, options=()):
    """Raise on every rank if any rank's tensors (dtype and shape) or integer options differ."""
    mine = torch.tensor(_signature(op, tensors, options), dtype=torch.int64, device=device)
    everyone = torch.empty(dist.get_world_size(group) * mine.numel(), dtype=torch.int64, device=device)
    dist.all_gather_into_tensor(everyone, mine, group=group)
    rows = everyone.view(-1, mine.numel()).tolist()
    for rank, row in enumerate(rows):
        if row[0] != rows[0][0]:
            raise RuntimeError(f"{op}: HYBRIDPAR_DEBUG: rank {rank} of the group is in another "
                               "collective op than rank 0")
        if row != rows[0]:
            raise RuntimeError(
                f"{op}: HYBRIDPAR_DEBUG: rank {rank} of the group passed {_describe(row)}, "
                f"but rank 0 passed {_describe(rows[0])}; every rank must pass the same "
                "dtypes, shapes and options")
