"""Token files: a flat binary array of token ids (the nanoGPT / Megatron convention: uint16 for
vocabularies up to 65,536, uint32 beyond), memory-mapped, never loaded whole.

Global batch ``k`` of a run is a pure function of ``(seed, k)``: the start offsets of its
``global_batch`` windows are drawn from a generator seeded by the pair, and row ``i`` of the
batch is the ``seq + 1`` tokens from start ``i``. A data-parallel rank reads only its own rows
``[rank * B / dp, (rank + 1) * B / dp)``, so splitting batch ``k`` over any dp gives the same
rows as one process reading it whole, and a resumed run (under the same or another dp) reads
exactly the batches the uninterrupted run would have: the data position is just the step.

The held-out part for evaluation is another file, or the last ``eval_fraction`` of this one
(training then draws only from the part before it). Evaluation batch ``j`` is a pure function of
``(seed, j)`` as well, so every evaluation of a run sees the same tokens.
"""

from pathlib import Path

import numpy as np
import torch

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def is_token_file(data: str) -> bool:
    """``--data`` names a token file (``.bin``), not text or 'synthetic'."""
    return str(data).endswith(".bin")


def token_file(path, dtype: str) -> np.memmap:
    """The tokens of `path` as a read-only memory map (ValueError naming the flag if unfit)."""
    if dtype not in DTYPES:
        raise ValueError(f"--data-dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--data: no such token file {str(path)!r}")
    size, item = path.stat().st_size, np.dtype(DTYPES[dtype]).itemsize
    if size % item:
        raise ValueError(f"--data: {path} has {size} bytes, not a whole number of {dtype} tokens "
                         f"({item} bytes each): is --data-dtype right?")
    if size == 0:
        raise ValueError(f"--data: {path} is empty")
    return np.memmap(path, dtype=DTYPES[dtype], mode="r")


class TokenBatches:
    """Batches of ``(rows, seq + 1)`` token windows from ``tokens[start:stop]`` (a memory map),
    a pure function of ``(seed, index)``; see the module docstring."""

    def __init__(self, tokens: np.ndarray, vocab: int, seq: int, global_batch: int, seed: int,
                 start: int = 0, stop: int = None, salt: int = 0, what: str = "--data"):
        self.tokens, self.vocab, self.seq, self.global_batch = tokens, vocab, seq, global_batch
        self.seed, self.salt, self.what = seed, salt, what
        self.start, self.stop = start, len(tokens) if stop is None else stop
        if self.stop - self.start < seq + 1:
            raise ValueError(f"{what}: {self.stop - self.start} tokens, fewer than one sequence of "
                             f"--seq + 1 = {seq + 1}")

    def starts(self, index: int) -> torch.Tensor:
        """The window starts of batch `index`, all ``global_batch`` of them (cheap: indices only)."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + index) * 2 + self.salt)
        return self.start + torch.randint(0, self.stop - self.start - self.seq, (self.global_batch,), generator=gen)

    def rows(self, index: int, first: int, last: int) -> torch.Tensor:
        """Rows ``[first, last)`` of batch `index`, reading only their tokens from the file."""
        windows = [np.asarray(self.tokens[s:s + self.seq + 1]) for s in self.starts(index)[first:last].tolist()]
        out = torch.from_numpy(np.stack(windows).astype(np.int64))
        if out.numel() and int(out.max()) >= self.vocab:
            raise ValueError(f"{self.what}: token id {int(out.max())} in batch {index} is not below "
                             f"--vocab ({self.vocab})")
        return out

    def __call__(self, index: int) -> torch.Tensor:
        """The whole batch (one process; the reference)."""
        return self.rows(index, 0, self.global_batch)


def train_and_eval_batches(args, vocab: int):
    """(training batches, evaluation batches or None) from the flags ``--data`` (a ``.bin`` token
    file), ``--data-dtype``, ``--eval-data``, ``--eval-fraction`` and ``--eval-every``."""
    tokens = token_file(args.data, args.data_dtype)
    stop = len(tokens)
    evals = None
    if args.eval_every:
        rows = args.global_batch
        if args.eval_data:
            held = token_file(args.eval_data, args.data_dtype)
            evals = TokenBatches(held, vocab, args.seq, rows, args.seed, salt=1, what="--eval-data")
        else:
            stop = len(tokens) - int(len(tokens) * args.eval_fraction)
            evals = TokenBatches(tokens, vocab, args.seq, rows, args.seed, start=stop, salt=1,
                                 what="--eval-fraction (the held-out tail of --data)")
    return TokenBatches(tokens, vocab, args.seq, args.global_batch, args.seed, stop=stop), evals
