"""The held-out loss: forward only, through the pipeline, no gradients kept.

Written against the stage interface the pipeline executor uses (``is_first``, ``is_last``,
``forward``, ``loss``, ``activation_shape``) and plain point-to-point sends, not against the
executor: evaluation needs no schedule. Each microbatch walks the virtual stages in order —
with ``v`` model chunks per rank (interleaving), chunk ``k`` of rank ``r`` is virtual stage
``k p + r`` — and each rank runs its (microbatch, chunk) forwards in that order, receiving
from the rank before and sending to the rank after. Messages between two ranks are posted and
received in the same order, and every receive waits only for an earlier virtual stage of the
same microbatch, so the walk cannot deadlock.
"""

import torch
import torch.distributed as dist


@torch.no_grad()
def pipeline_eval_loss(stage, mesh, inputs, targets) -> float:
    """Mean loss of the microbatches `inputs`/`targets` (this DP rank's rows), averaged over DP;
    the same on every rank. `stage` is this rank's stage, or its list of model chunks. Only
    the first virtual stage reads `inputs`, only the last `targets`."""
    chunks = list(stage) if isinstance(stage, torch.nn.ModuleList) else [stage]
    pp_group, p, rank = mesh.pp_group, mesh.pp, mesh.pp_rank
    prev = dist.get_global_rank(pp_group, (rank - 1) % p)
    after = dist.get_global_rank(pp_group, (rank + 1) % p)
    param = next(stage.parameters())
    was_training = stage.training
    stage.eval()
    total, sends = 0.0, []
    try:
        for x, y in zip(inputs, targets):
            for chunk in chunks:
                if chunk.is_first:
                    out = chunk(x)
                else:
                    buf = torch.empty(chunk.activation_shape(y.shape[0], y.shape[1]), dtype=param.dtype,
                                      device=param.device)
                    dist.recv(buf, src=prev, group=pp_group)
                    out = chunk((buf[0], buf[1]))
                if chunk.is_last:
                    total += chunk.loss(out, y).item() / len(inputs)
                else:
                    sends.append(dist.isend(torch.stack(out), dst=after, group=pp_group))
        for work in sends:
            work.wait()
    finally:
        stage.train(was_training)
    # One TP rank of the last virtual stage counts; averaged over DP.
    counts = chunks[-1].is_last and mesh.tp_rank == 0
    report = torch.tensor([total if counts else 0.0], dtype=torch.float64, device=param.device)
    dist.all_reduce(report)
    return report.item() / mesh.dp
