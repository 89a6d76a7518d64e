"""Our attention in Hugging Face transformers' attention-function registry.

After :func:`register_hf_attention`, ``attn_implementation="hybridpar"`` makes the models
that dispatch through ``AttentionInterface`` (LLaMA, Qwen2, Mistral, GPT-2, ...) use
``hybridpar_ext.ops.attention``. Masks are built as for ``"sdpa"``: none when the batch is
purely causal (the fused path), a boolean mask otherwise. A mask that is exactly the
causal (or sliding-window) pattern still takes the fused path; any other (padding, say)
goes to transformers' SDPA function, with a one-time warning.
"""

import warnings

import torch

from .. import ops
from ..ops.attention import ATTENTION_DTYPES, MAX_HEAD_DIM, MIN_HEAD_DIM
from ..reference.attention import visible_mask

NAME = "hybridpar"
_warned = set()


def _warn_once(reason):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"hybridpar attention: {reason}; using transformers' sdpa attention",
                      stacklevel=3)


def _window(sliding_window):
    # transformers' sliding window of w keeps w keys: the query's own and w - 1 before it.
    return None if not sliding_window else (sliding_window - 1, None)


def _mask_is(mask, q_len, kv_len, causal, window):
    """Is `mask` (batch, 1|heads, q, kv; True = attend) the pattern the kernel applies itself?"""
    if mask.dtype != torch.bool or mask.shape[-2:] != (q_len, kv_len):
        return False
    left, right = (-1, -1) if window is None else (window[0], -1)
    expected = visible_mask(q_len, kv_len, causal, left, right, device=mask.device)
    return bool(torch.all(mask == expected))


def hybridpar_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                scaling=None, is_causal=None, **kwargs):
    """transformers' attention-function signature: q/k/v are (batch, heads, seqlen, head_dim);
    returns ``(output (batch, seqlen, heads, head_dim), None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = _window(kwargs.get("sliding_window"))
    reason = None
    if dropout > 0 and module.training:
        reason = "attention dropout while training is not supported"
    elif kwargs.get("softcap") is not None:
        reason = "softcap is not supported"
    elif kwargs.get("output_attentions"):
        reason = "output_attentions=True is not supported"
    elif not MIN_HEAD_DIM <= query.shape[-1] <= MAX_HEAD_DIM or query.dtype not in ATTENTION_DTYPES:
        reason = f"head_dim {query.shape[-1]} / dtype {query.dtype} is not supported"
    elif attention_mask is not None and not _mask_is(attention_mask, query.shape[2], key.shape[2],
                                                     causal, window):
        reason = "an attention mask other than the causal pattern (padding?)"
    if reason is not None:
        _warn_once(reason)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    out = ops.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                        causal=bool(causal), softmax_scale=scaling, window=window)
    return out, None


def register_hf_attention(name: str = NAME) -> str:
    """Registers the fused attention (and sdpa-style masks) with transformers under `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, hybridpar_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
