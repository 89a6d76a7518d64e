"""A directory of checkpoints in which only complete ones count.

``DIR/step_00000042/`` is the checkpoint taken after step 42. A save writes into
``DIR/step_00000042.tmp/``; once every rank has written its files (DCP's save ends with the
coordinator writing the metadata after gathering every rank's results), rank 0 writes
``checkpoint.json`` (the step, the model, the layout) into it and renames it to its final name —
one atomic rename, the commit. A run killed while saving leaves a ``.tmp`` directory that no
loader looks at (and the next run removes), so it resumes from the previous checkpoint.

``keep``: after each commit, only the newest ``keep`` complete checkpoints stay. With
``async_save`` the tensors are copied to CPU memory and DCP writes them from a background
thread over a gloo group of its own, while training goes on; the commit happens on rank 0 once
that save is done (checked after each step, and before the next save or the end).
"""

import datetime
import json
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

import torch.distributed as dist

from .saving import load_state, save_state

INFO_FILE = "checkpoint.json"
_NAME = re.compile(r"^step_(\d+)$")
# For the tests of a crash while saving only (not a flag): "STEP:RANK" makes global rank RANK
# exit abruptly in the save of step STEP, after writing its files, before the commit.
CRASH_ENV = "HYBRIDPAR_TEST_CHECKPOINT_CRASH"


def step_dir(directory, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}"


def complete_checkpoints(directory) -> List[Tuple[int, Path]]:
    """``[(step, path)]`` of the committed checkpoints in `directory`, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME.match(entry.name)
        if match and (entry / INFO_FILE).is_file() and (entry / ".metadata").is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(directory) -> Optional[Tuple[int, Path]]:
    """The newest complete checkpoint in `directory`, or None."""
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def read_info(path) -> dict:
    return json.loads((Path(path) / INFO_FILE).read_text())


class Checkpointer:
    """Saves and loads the checkpoints of one run in `directory` (collective: build it on
    every rank, after the process group)."""

    def __init__(self, directory, keep: Optional[int] = None, async_save: bool = False,
                 timeout: Optional[float] = None):
        if keep is not None and keep < 2:
            raise ValueError(f"Checkpointer: keep must be at least 2 (or None: keep all), got {keep}")
        self.directory, self.keep, self.async_save = Path(directory), keep, async_save
        self.rank = dist.get_rank()
        # DCP's collectives on a gloo group of their own: an asynchronous save runs them from a
        # background thread while training uses the default group.
        self.group = dist.new_group(backend="gloo", **(
            {"timeout": datetime.timedelta(seconds=timeout)} if timeout else {}))
        self.pending = None   # (future, step, info) of an asynchronous save not yet committed
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob("step_*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)   # left by a run killed while saving
        dist.barrier(group=self.group)

    def save(self, step: int, stage, optimizer, mesh, trainer_state: dict, info: dict) -> None:
        """Checkpoint `step` (collective). Synchronous: committed when this returns. Asynchronous:
        the write goes on in the background, the previous asynchronous save committed first."""
        self.wait()
        tmp = self.directory / f"step_{step:08d}.tmp"
        hook = _crash_hook(step, self.rank)
        if self.async_save:
            future = save_state(tmp, stage, optimizer, mesh, trainer_state, self.group, async_save=True,
                                writer_hook=hook)
            self.pending = (future, step, info)
            return
        save_state(tmp, stage, optimizer, mesh, trainer_state, self.group, writer_hook=hook)
        self._commit(step, info)
        dist.barrier(group=self.group)

    def poll(self) -> None:
        """Commit the asynchronous save if it is done (rank 0; the others have nothing to do)."""
        if self.pending is not None and self.pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Finish and commit the pending asynchronous save, if any."""
        if self.pending is None:
            return
        future, step, info = self.pending
        self.pending = None
        future.result()   # raises if the background save failed: nothing is committed
        self._commit(step, info)

    def _commit(self, step: int, info: dict) -> None:
        if self.rank != 0:
            return
        tmp, final = self.directory / f"step_{step:08d}.tmp", step_dir(self.directory, step)
        (tmp / INFO_FILE).write_text(json.dumps(dict(info, step=step), indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.directory)
        if self.keep is not None:
            for _, old in complete_checkpoints(self.directory)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path, stage, optimizer, mesh) -> Optional[dict]:
        """Fill `stage` and `optimizer` from the checkpoint in `path` (collective); returns the
        trainer state it holds."""
        return load_state(path, stage, optimizer, mesh, self.group)


def _fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crash_hook(step: int, rank: int):
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return None
    crash_step, _, crash_rank = spec.partition(":")
    if int(crash_step) != step or int(crash_rank) != rank:
        return None

    def crash():
        print(f"[rank {rank}] {CRASH_ENV}: exiting in the save of step {step}", flush=True)
        os._exit(17)
    return crash


__all__ = ["CRASH_ENV", "Checkpointer", "INFO_FILE", "complete_checkpoints", "latest_checkpoint", "read_info",
           "step_dir"]
