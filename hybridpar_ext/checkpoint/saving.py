"""One checkpoint directory through DCP: :func:`save_state` writes this rank's part of the
model, the optimizer and the trainer's small state; :func:`load_state` fills a model and an
optimizer of any layout from it. Both are collective over ``group`` (every rank of the job).

The trainer's state (step, LR schedule, data position: a few numbers) is written once, by
rank 0, as a pickled value; every rank reads it back.
"""

from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.staging import AsyncStager

from .chunks import Chunked, ChunkLoadPlanner, ChunkSavePlanner
from .state import (OPTIM, Entries, finish_copies, finish_optimizer_load, model_entries,
                    optimizer_entries)

TRAINER_KEY = "trainer"


def build_entries(stage, optimizer, mesh, for_save: bool, with_master: bool = True):
    entries = Entries()
    model_entries(entries, stage, mesh, for_save)
    states = optimizer_entries(entries, optimizer, stage, mesh, for_save, with_master) if optimizer is not None else None
    return entries, states


def _rank0(group) -> bool:
    return dist.get_rank(group) == 0


def save_state(path, stage, optimizer, mesh, trainer_state: Optional[dict] = None, group=None,
               async_save: bool = False, writer_hook=None):
    """Write `stage`'s parameters, `optimizer`'s state and `trainer_state` into directory
    `path` (collective). With ``async_save`` the tensors are copied to CPU memory first and
    written by a background thread: returns the future (its result is DCP's metadata) at once;
    otherwise returns once every rank has written. ``writer_hook(rank)`` runs after this rank
    has written its files and before the checkpoint's metadata is (for tests of a crash)."""
    entries, _ = build_entries(stage, optimizer, mesh, for_save=True)
    values = dict(entries.values)
    if trainer_state is not None and _rank0(group):
        values[TRAINER_KEY] = trainer_state
    writer = _Writer(path, writer_hook)
    if async_save:
        return dcp.async_save(values, storage_writer=writer, planner=ChunkSavePlanner(), process_group=group,
                              async_stager=_CopyToCPU())
    dcp.save(values, storage_writer=writer, planner=ChunkSavePlanner(), process_group=group)
    return None


def saved_names(path) -> dict:
    """``{name: TensorStorageMetadata or BytesStorageMetadata}`` of the checkpoint in `path`."""
    return FileSystemReader(str(path)).read_metadata().state_dict_metadata


def load_state(path, stage, optimizer, mesh, group=None) -> Optional[dict]:
    """Fill `stage`'s parameters and `optimizer`'s state from the checkpoint in `path`, whatever
    the layout that saved it (collective). Returns the trainer's state it holds (or None).
    Raises ValueError on every rank alike if a tensor this rank needs is missing or has
    another shape (a checkpoint of another model)."""
    saved = saved_names(path)
    has_master = any(k.startswith(OPTIM) and k.endswith(".master") for k in saved)
    entries, states = build_entries(stage, optimizer, mesh, for_save=False, with_master=has_master)
    problems = []
    for key, value in entries.values.items():
        md = saved.get(key)
        if md is None:
            problems.append(f"{key} is not in the checkpoint")
        elif isinstance(value, Chunked) and (not isinstance(md, TensorStorageMetadata) or md.size != value.size()):
            problems.append(f"{key} has shape {tuple(getattr(md, 'size', ()))} in the checkpoint, "
                            f"{tuple(value.size())} here")
    _raise_everywhere(problems, group, f"load_state: the checkpoint in {path} does not fit this model")
    if TRAINER_KEY in saved:
        entries.values[TRAINER_KEY] = None
    values = entries.values
    with torch.no_grad():
        dcp.load(values, storage_reader=FileSystemReader(str(path)), planner=ChunkLoadPlanner(), process_group=group)
        finish_copies(entries)
        if optimizer is not None:
            finish_optimizer_load(entries, optimizer, stage, states, has_master)
    return values.get(TRAINER_KEY)


def _raise_everywhere(problems, group, what):
    """Raise the same ValueError on every rank if any rank found a problem (a rank that raised
    alone would leave the others waiting in the load's collectives)."""
    world = dist.get_world_size(group)
    gathered = [None] * world
    dist.all_gather_object(gathered, problems[:5], group=group)
    found = [(r, p) for r, ps in enumerate(gathered) for p in ps]
    if found:
        raise ValueError(f"{what}: " + "; ".join(f"rank {r}: {p}" for r, p in found[:5]))


class _Writer(FileSystemWriter):
    """DCP's file writer (one file per rank), with a hook after this rank's data is written."""

    def __init__(self, path, hook=None):
        super().__init__(str(path), single_file_per_rank=True, sync_files=True)
        self.hook = hook

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        if self.hook is not None:
            future.wait()
            self.hook()
        return future


class _CopyToCPU(AsyncStager):
    """Stages a state_dict for an asynchronous save: every box a CPU copy (so training can go
    on changing the parameters), small values as they are."""

    _synchronize_after_execute = False

    def stage(self, state_dict):
        return {k: v.staged() if isinstance(v, Chunked) else
                (v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v)
                for k, v in state_dict.items()}

    def close(self):
        pass


__all__ = ["TRAINER_KEY", "build_entries", "load_state", "save_state", "saved_names"]
