"""Token files: batch k a pure function of (seed, k) whatever the data-parallel split (the
resume guarantee), held-out tails kept out of training, and bad files or flags rejected by
name before any process group exists."""

import numpy as np
import pytest
import torch

from hybridpar_ext.train import parse_args
from hybridpar_ext.train.layout import check_args
from hybridpar_ext.train.token_data import TokenBatches, token_file, train_and_eval_batches


@pytest.fixture
def tokens_bin(tmp_path):
    path = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 50_000, 4_001, dtype=np.uint16).tofile(path)
    return path


@pytest.mark.parametrize("global_batch", [12, 1])
def test_dp_splits_of_batch_k_concatenate_to_the_same_rows(tokens_bin, global_batch):
    tokens = token_file(tokens_bin, "uint16")
    whole = TokenBatches(tokens, 50_000, 9, global_batch, seed=3)
    for k in (1, 2, 17):
        batch = whole(k)
        assert batch.shape == (global_batch, 10) and batch.dtype == torch.int64
        for dp in [d for d in (1, 2, 3, 4, 6, 12) if global_batch % d == 0]:
            share = global_batch // dp
            # A fresh reader per rank, as after a restart under another dp.
            parts = [TokenBatches(token_file(tokens_bin, "uint16"), 50_000, 9, global_batch, seed=3)
                     .rows(k, r * share, (r + 1) * share) for r in range(dp)]
            assert torch.equal(torch.cat(parts), batch), f"batch {k} split over dp {dp}"
        start = whole.starts(k)[0].item()
        assert torch.equal(batch[0], torch.from_numpy(tokens[start:start + 10].astype(np.int64)))
    assert not torch.equal(whole(1), whole(2))
    assert not torch.equal(whole(1), TokenBatches(tokens, 50_000, 9, global_batch, seed=4)(1))


def test_uint32_and_the_held_out_tail(tmp_path):
    path = tmp_path / "big.bin"
    np.arange(1_000, dtype=np.uint32).__add__(70_000).tofile(path)
    args = parse_args(["--data", str(path), "--data-dtype", "uint32", "--vocab", "71000", "--seq", "7",
                       "--eval-every", "2", "--eval-fraction", "0.25", "--global-batch", "5"])
    train, held = train_and_eval_batches(args, 71_000)
    for k in range(1, 30):
        assert int(train(k)[:, -1].max()) < 70_000 + 750   # training windows end before the tail
        assert int(held(k).min()) >= 70_000 + 750
    assert held(0).shape == (5, 8)


def test_bad_files_and_flags_name_the_flag(tmp_path, tokens_bin):
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    cases = [
        (["--data", str(tmp_path / "missing.bin")], "--data: no such token file"),
        (["--data", str(odd)], "not a whole number of uint16"),
        (["--data", str(tokens_bin), "--eval-every", "2", "--eval-fraction", "1.5"], "--eval-fraction"),
        (["--eval-every", "2"], "--eval-every needs a token file"),
        (["--data", str(tokens_bin), "--eval-every", "1", "--eval-data", str(tmp_path / "no.bin")],
         "--data: no such token file"),
        (["--data", str(tokens_bin), "--seq", "5000"], "--seq"),
    ]
    for flags, message in cases:
        with pytest.raises(ValueError, match=message):
            check_args(parse_args(flags), 1)
    # A token id the model has no row for is reported with the batch that holds it.
    reader = TokenBatches(token_file(tokens_bin, "uint16"), 256, 8, 4, seed=0)
    with pytest.raises(ValueError, match=r"not below --vocab \(256\)"):
        reader(1)
