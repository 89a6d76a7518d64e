"""The held-out loss: forward only, through the pipeline, no gradients kept.

Written against the stage interface the pipeline executor uses (``is_first``, ``is_last``,
``forward``, ``loss``, ``activation_shape``) and plain point-to-point sends, not against the
executor: evaluation needs no schedule, every stage runs its microbatches' forwards in order,
receiving from the stage before and sending to the stage after.
"""

import torch
import torch.distributed as dist


@torch.no_grad()
def pipeline_eval_loss(stage, mesh, inputs, targets) -> float:
    """Mean loss of the microbatches `inputs`/`targets` (this DP rank's rows), averaged over DP;
    the same on every rank. Only the first stage reads `inputs`, only the last `targets`."""
    pp_group = mesh.pp_group
    prev = dist.get_global_rank(pp_group, stage.stage - 1) if not stage.is_first else None
    after = dist.get_global_rank(pp_group, stage.stage + 1) if not stage.is_last else None
    param = next(stage.parameters())
    was_training = stage.training
    stage.eval()
    total, sends = 0.0, []
    try:
        for x, y in zip(inputs, targets):
            if stage.is_first:
                out = stage(x)
            else:
                buf = torch.empty(stage.activation_shape(y.shape[0], y.shape[1]), dtype=param.dtype,
                                  device=param.device)
                dist.recv(buf, src=prev, group=pp_group)
                out = stage((buf[0], buf[1]))
            if stage.is_last:
                total += stage.loss(out, y).item() / len(inputs)
            else:
                sends.append(dist.isend(torch.stack(out), dst=after, group=pp_group))
        for work in sends:
            work.wait()
    finally:
        stage.train(was_training)
    # One TP rank of each last stage counts; averaged over DP.
    counts = stage.is_last and mesh.tp_rank == 0
    report = torch.tensor([total if counts else 0.0], dtype=torch.float64, device=param.device)
    dist.all_reduce(report)
    return report.item() / mesh.dp
