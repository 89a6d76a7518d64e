"""The communication ops on gloo: run with
``.venv/bin/torchrun --nproc-per-node 2 examples/comm_ops.py``.

Sequence-parallel column and row linear layers in two lines each, checked against the
unsharded computation, then a data-parallel step with the gradient-bucket reducer.
"""

import torch
import torch.distributed as dist

from hybridpar_ext import ops


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)                        # the same full tensors on every rank
    seq, hidden, ffn = 8 * world, 24, 40
    x_full = torch.randn(seq, hidden)
    w1_full, w2_full = torch.randn(ffn, hidden), torch.randn(hidden, ffn)

    # Sequence parallel: each rank holds seq/world rows of x and ffn/world rows of w1
    # (columns of w2). all_gather_matmul gathers the rows while multiplying;
    # matmul_reduce_scatter sums the partial products while scattering the rows back.
    x = x_full.chunk(world)[rank].requires_grad_()
    w1 = w1_full.chunk(world)[rank].requires_grad_()
    w2 = w2_full.chunk(world, dim=1)[rank].requires_grad_()
    h = torch.relu(ops.all_gather_matmul(x, w1, chunks=2))          # (seq, ffn/world)
    y = ops.matmul_reduce_scatter(h, w2, chunks=2)                   # (seq/world, hidden)
    expected = (torch.relu(x_full @ w1_full.t()) @ w2_full.t()).chunk(world)[rank]
    print(f"rank {rank}: sequence-parallel MLP, max |error| {(y - expected).abs().max():.2e}")
    y.square().sum().backward()                 # backward overlaps the same way

    # Data parallel: gradients averaged in buckets while backward runs.
    model = torch.nn.Sequential(torch.nn.Linear(hidden, ffn), torch.nn.GELU(), torch.nn.Linear(ffn, 1))
    reducer = ops.GradBucketReducer(model.parameters(), bucket_cap_mb=0.001)
    data = torch.randn(16, hidden, generator=torch.Generator().manual_seed(rank))
    model(data).square().mean().backward()
    reducer.finish()
    print(f"rank {rank}: {reducer.num_buckets} buckets, {reducer.started_during_backward} started "
          f"during backward; grad[0,0] = {model[0].weight.grad[0, 0]:.6f} (the same on every rank)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
