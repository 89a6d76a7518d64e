"""Checkpoints with ``torch.distributed.checkpoint`` (DCP) that any layout can load.

Every parameter, Adam moment and fp32 master weight is saved as its whole global tensor, cut
into the boxes the ranks hold (from the shard specs of :mod:`hybridpar_ext.parallel.spec`,
and ZeRO-1's flat slices), so DCP reshards it into any other dp x tp x pp, sequence
parallelism, ZeRO-1 on or off, microbatching.

- ``chunks``: :class:`Chunked`, a rank's boxes of a global tensor, in DCP's checkpointable
  protocol; the planners that find them;
- ``state``: the names and boxes of a stage's parameters and optimizer state;
- ``saving``: :func:`save_state` / :func:`load_state` of one checkpoint directory.
"""

from .chunks import Chunked, ChunkLoadPlanner, ChunkSavePlanner
from .saving import load_state, save_state, saved_names

__all__ = ["ChunkLoadPlanner", "ChunkSavePlanner", "Chunked", "load_state", "save_state", "saved_names"]
