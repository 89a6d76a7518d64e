"""Our kernels in a Hugging Face model instance, patched in place.

``apply_kernels(model)`` does for an existing ``transformers`` model what Liger-Kernel's
``apply_liger_kernel_to_llama(model=...)`` does: each of the model's RMSNorm / LayerNorm
modules is swapped for ours (:class:`~hybridpar_ext.nn.RMSNorm`, :class:`~hybridpar_ext.nn.LayerNorm`)
holding the *same* weight Parameter objects, and the model's attention runs through our
kernel (``attn_implementation="hybridpar"``, see :mod:`.huggingface`). Nothing else changes:
parameter names, the state_dict, the parameters an optimizer already holds, rotary
embeddings, projections and the head are the model's own.

Which module class is "the model's norm" is looked up per architecture (``config.model_type``),
never guessed from a name: Gemma's RMSNorm, say, scales by ``1 + weight`` and must not be
swapped for ours, so a model type missing from the table is refused with its class named.
"""

import importlib

import torch

from .huggingface import register_hf_attention
from .norms import LayerNorm, RMSNorm

# model_type -> (module of its modeling code, the norm classes in it that are LLaMA's RMSNorm:
# fp32 statistics, `weight * x_hat`, eps in `variance_epsilon`). torch.nn.LayerNorm modules
# are swapped in any listed architecture that has them (GPT-2).
_RMS_NORMS = {
    "llama": ("transformers.models.llama.modeling_llama", ("LlamaRMSNorm",)),
    "mistral": ("transformers.models.mistral.modeling_mistral", ("MistralRMSNorm",)),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", ("Qwen2RMSNorm",)),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", ("Qwen3RMSNorm",)),
    "gpt2": ("transformers.models.gpt2.modeling_gpt2", ()),
}

SUPPORTED_MODEL_TYPES = tuple(sorted(_RMS_NORMS))


def _our_rms_norm(theirs):
    ours = RMSNorm(theirs.weight.shape, eps=theirs.variance_epsilon, device="meta",
                   dtype=theirs.weight.dtype)
    ours.weight = theirs.weight  # the same Parameter: optimizers and tied references still hold it
    return ours


def _our_layer_norm(theirs):
    ours = LayerNorm(theirs.normalized_shape, eps=theirs.eps,
                     elementwise_affine=theirs.weight is not None,
                     bias=theirs.bias is not None, device="meta")
    ours.weight, ours.bias = theirs.weight, theirs.bias
    return ours


def _replacements(model, rms_classes):
    """(parent, child name, new module) for every norm to swap, found before anything changes."""
    swaps = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) in rms_classes:
                new = _our_rms_norm(child)
            elif type(child) is torch.nn.LayerNorm:
                new = _our_layer_norm(child)
            else:
                continue
            new.train(child.training)
            swaps.append((parent, name, new))
    return swaps


def apply_kernels(model, *, norms: bool = True, attention: bool = True):
    """Patches a Hugging Face model (``LlamaForCausalLM``, ``Qwen2Model``, ...) in place to run
    our fused norms and attention; returns the model.

    Supported ``config.model_type``: ``SUPPORTED_MODEL_TYPES``. Any other model raises a
    ``ValueError`` naming its class, before anything is changed. ``norms=False`` or
    ``attention=False`` leaves that part as it is.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model, torch.nn.Module) or model_type not in _RMS_NORMS:
        raise ValueError(
            f"apply_kernels: no kernel mapping for {type(model).__name__}"
            + (f" (config.model_type {model_type!r})" if model_type is not None else "")
            + f"; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if attention and not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"apply_kernels: {type(model).__name__} cannot switch its attention "
                         "implementation (needs transformers' PreTrainedModel.set_attn_implementation)")
    module_path, class_names = _RMS_NORMS[model_type]
    modeling = importlib.import_module(module_path)
    rms_classes = tuple(getattr(modeling, name) for name in class_names)

    if norms:
        for parent, name, new in _replacements(model, rms_classes):
            setattr(parent, name, new)
    if attention:
        model.set_attn_implementation(register_hf_attention())
    return model
