"""What every model family's plan shares: the checks that a layout splits a model (in the
family's own names for its sizes), and the pipeline stage's gradient duties."""

import torch
import torch.distributed as dist

from ..layers import partial_grad_params, sync_tensor_parallel_grads


def kv_heads_per_rank(heads: int, kv_heads: int, tp: int, op: str = "tensor parallelism"):
    """(kv heads each rank holds, ranks that hold each kv head); ValueError if they do not split."""
    if heads % tp:
        raise ValueError(f"{op}: heads ({heads}) must be divisible by the tensor-parallel size ({tp})")
    if kv_heads >= tp:
        if kv_heads % tp:
            raise ValueError(f"{op}: kv_heads ({kv_heads}) must be divisible by the tensor-parallel "
                             f"size ({tp}), or divide it")
        return kv_heads // tp, 1
    if tp % kv_heads:
        raise ValueError(f"{op}: kv_heads ({kv_heads}) must divide the tensor-parallel size ({tp}) "
                         "when there are fewer kv heads than ranks")
    return 1, tp // kv_heads


def check_model_split(dp, tp, pp, heads: int, kv_heads: int, ffn, layers) -> None:
    """ValueError naming the first size that `dp`, `tp`, `pp` cannot split. `ffn` and `layers`
    are ``(name, value)``: the messages use the model's own name for each (a GPT's ``ffn``, a
    Hugging Face config's ``intermediate_size``)."""
    for name, value in (("dp", dp), ("tp", tp), ("pp", pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    kv_heads_per_rank(heads, kv_heads, tp)
    (ffn_name, ffn_size), (layers_name, layer_count) = ffn, layers
    if ffn_size % tp:
        raise ValueError(f"tensor parallelism: {ffn_name} ({ffn_size}) must be divisible by the "
                         f"tensor-parallel size ({tp})")
    if layer_count < pp:
        raise ValueError(f"pipeline parallelism: {layers_name} ({layer_count}) must be at least the "
                         f"number of pipeline stages ({pp})")


def check_sequence(seq, max_len, tp: int, sequence_parallel: bool) -> None:
    """ValueError if `seq` tokens do not fit the model (``max_len``: ``(name, value)``) or, under
    sequence parallelism, do not split over `tp`. Nothing to check when `seq` is None."""
    if seq is None:
        return
    name, limit = max_len
    if seq > limit:
        raise ValueError(f"seq ({seq}) is longer than the model's {name} ({limit})")
    if sequence_parallel and seq % tp:
        raise ValueError(f"sequence parallelism: seq ({seq}) must be divisible by the "
                         f"tensor-parallel size ({tp})")


class PipelineStage(torch.nn.Module):
    """The gradient duties of one pipeline stage (or chunk) of any family. A subclass sets
    ``mesh``, ``is_first`` and ``is_last``, and says whether its embedding and LM head are one
    tensor held by two stages (``tied_across_stages``) and which its copy is (``tied_weight``)."""

    tied_across_stages = False

    def tied_weight(self):
        raise TypeError(f"{type(self).__name__} holds no weight tied across stages")

    def finish_grads(self):
        """The gradient sums that tensor parallelism and tied stages owe, after backward (and
        after the data-parallel reduction): partial gradients of replicated segments over TP
        (from the specs); the embedding's and the LM head's gradients across the first and
        last stages."""
        sync_tensor_parallel_grads(self, self.mesh.tp_group)
        if self.tied_across_stages:
            grad = self.tied_weight().grad
            other = self.mesh.pp - 1 if self.is_first else 0
            peer = dist.get_global_rank(self.mesh.pp_group, other)
            received = torch.empty_like(grad)
            # No copy to send: the send is waited for before the gradient changes.
            send = dist.isend(grad, dst=peer, group=self.mesh.pp_group)
            dist.recv(received, src=peer, group=self.mesh.pp_group)
            send.wait()
            grad.add_(received)

    def synced_after_reduction(self, param) -> bool:
        """Whether `param`'s gradient is still changed by :meth:`finish_grads` after the
        data-parallel reduction (so a sharded optimizer must see it whole)."""
        if not hasattr(self, "_partial_ids"):
            self._partial_ids = {id(p) for p in partial_grad_params(self)}
        if id(param) in self._partial_ids:
            return True
        return self.tied_across_stages and param is self.tied_weight()


__all__ = ["PipelineStage", "check_model_split", "check_sequence", "kv_heads_per_rank"]
