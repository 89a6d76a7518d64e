"""Checkpoints with ``torch.distributed.checkpoint`` (DCP) that any layout can load.

Every parameter, Adam moment and fp32 master weight is saved as its whole global tensor, cut
into the boxes the ranks hold (from the shard specs of :mod:`hybridpar_ext.parallel.spec`,
and ZeRO-1's flat slices), so DCP reshards it into any other dp x tp x pp, sequence
parallelism, ZeRO-1 on or off, microbatching.

- ``chunks``: :class:`Chunked`, a rank's boxes of a global tensor, in DCP's checkpointable
  protocol; the planners that find them;
- ``state``: the names and boxes of a stage's parameters and optimizer state;
- ``saving``: :func:`save_state` / :func:`load_state` of one checkpoint directory;
- ``manager``: :class:`Checkpointer`, a directory where only complete checkpoints count
  (atomic commit, ``keep``, asynchronous saves);
- ``export``: consolidated safetensors out (``python -m hybridpar_ext export``) and back in
  (``train --init-from``).
"""

from .chunks import Chunked, ChunkLoadPlanner, ChunkSavePlanner
from .export import consolidated_state_dict, export_checkpoint, load_export
from .manager import Checkpointer, complete_checkpoints, latest_checkpoint
from .saving import load_state, save_state, saved_names

__all__ = ["ChunkLoadPlanner", "ChunkSavePlanner", "Checkpointer", "Chunked", "complete_checkpoints",
           "consolidated_state_dict", "export_checkpoint", "latest_checkpoint", "load_export", "load_state",
           "save_state", "saved_names"]
