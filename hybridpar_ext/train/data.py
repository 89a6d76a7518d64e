"""The trainer's data: global batches as a pure function of (seed, step), so every layout
sees the same tokens as one process."""

from pathlib import Path

import torch

DEFAULT_TEXT = Path(__file__).parent.parent / "data" / "coriolanus.txt"


class Batches:
    """Global batches of ``(global_batch, seq + 1)`` tokens, a pure function of (seed, step):
    random windows of a byte string, or uniform random tokens."""

    def __init__(self, data: str, vocab: int, seq: int, global_batch: int, seed: int):
        self.seq, self.global_batch, self.seed, self.vocab = seq, global_batch, seed, vocab
        self.text = None
        if data != "synthetic":
            self.text = torch.frombuffer(bytearray(Path(data).read_bytes()), dtype=torch.uint8).long()

    def __call__(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        if self.text is None:
            return torch.randint(0, self.vocab, (self.global_batch, self.seq + 1), generator=gen)
        starts = torch.randint(0, self.text.numel() - self.seq - 1, (self.global_batch,), generator=gen)
        return torch.stack([self.text[s:s + self.seq + 1] for s in starts.tolist()])

    def rows(self, step: int, first: int, last: int) -> torch.Tensor:
        """Rows ``[first, last)`` of batch `step` (a data-parallel rank's share)."""
        return self(step)[first:last]
