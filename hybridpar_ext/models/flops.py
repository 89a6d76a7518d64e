"""Parameter counts and training FLOPs of the GPT-style decoder: the one place they are
computed. The GPT's ``num_parameters``, the planner's memory and step-time models and its MFU,
and the trainer's MFU all call these functions, so they cannot disagree.

The functions take the shape as plain numbers (``kv_dim = kv_heads * head_dim``; ``mlp``
"gelu" has 2 matrices, "swiglu" 3; ``norm`` "layernorm" has a weight and a bias, "rmsnorm" a
weight), so that a :class:`~hybridpar_ext.models.GPTConfig` and the planner's ``ModelSpec`` both
map onto them.

The FLOPs convention (Narayanan et al. 2021, the Megatron-LM paper, generalised to GQA and
gated MLPs; PaLM's MFU counts the same way):

- Only matrix multiplications count, a multiply-add as 2 FLOPs. Norms, softmax, activations,
  rotary embeddings and the embedding lookup are left out.
- Per token, one layer's forward costs ``2 * (h*(h + 2*kv_dim) + h*h + mats*h*ffn)`` in its
  projections and MLP, plus ``4*seq*h`` for attention's ``QK^T`` and ``PV`` **counted in full,
  not halved for the causal mask**: the published MFUs the planner is checked against count it
  so, and a causal kernel that skips the masked half does less work than this count (its MFU
  by this count is comparable across papers, not a measure of the kernel's own work).
- The LM head costs ``2*h*V`` per token.
- A training step costs 3 forward passes (the backward, twice the forward). These are model
  FLOPs: activation recomputation adds hardware FLOPs, not model FLOPs, as MFU requires.
"""

MLP_MATRICES = {"gelu": 2, "swiglu": 3}
NORM_VECTORS = {"layernorm": 2, "rmsnorm": 1}


def norm_params(hidden: int, norm: str) -> int:
    return NORM_VECTORS[norm] * hidden


def layer_matmul_params(hidden: int, kv_dim: int, ffn: int, mlp: str) -> int:
    """Weights of one layer's matrices: fused qkv, the output projection, the MLP."""
    h = hidden
    return h * (h + 2 * kv_dim) + h * h + MLP_MATRICES[mlp] * h * ffn


def layer_params(hidden: int, kv_dim: int, ffn: int, mlp: str, norm: str) -> int:
    """One layer: its matrices and its two norms."""
    return layer_matmul_params(hidden, kv_dim, ffn, mlp) + 2 * norm_params(hidden, norm)


def total_params(layers: int, hidden: int, kv_dim: int, ffn: int, vocab: int, mlp: str, norm: str,
                 tied_embeddings: bool) -> int:
    """The model: its layers, the final norm, the embedding and (untied) the LM head; a tied
    embedding is counted once."""
    embeddings = vocab * hidden * (1 if tied_embeddings else 2)
    return layers * layer_params(hidden, kv_dim, ffn, mlp, norm) + embeddings + norm_params(hidden, norm)


def attention_forward_flops_per_token(hidden: int, seq: int) -> float:
    """``QK^T`` and ``PV`` of one layer, counted in full (causal or not: see the module docstring)."""
    return 4 * seq * hidden


def layer_forward_flops_per_token(hidden: int, kv_dim: int, ffn: int, mlp: str, seq: int) -> float:
    return 2 * layer_matmul_params(hidden, kv_dim, ffn, mlp) + attention_forward_flops_per_token(hidden, seq)


def logits_forward_flops_per_token(hidden: int, vocab: int) -> float:
    return 2 * hidden * vocab


def training_flops_per_token(layers: int, hidden: int, kv_dim: int, ffn: int, vocab: int, mlp: str,
                             seq: int) -> float:
    """Model FLOPs of one training step per token: 3 forward passes of the layers and the head."""
    forward = layers * layer_forward_flops_per_token(hidden, kv_dim, ffn, mlp, seq)
    return 3 * (forward + logits_forward_flops_per_token(hidden, vocab))


def gpt_num_parameters(config) -> int:
    """Parameters of the :class:`GPT` a :class:`GPTConfig` builds."""
    return total_params(config.layers, config.hidden, config.kv_heads * config.head_dim, config.ffn,
                        config.vocab_size, config.mlp, config.norm, config.tied_embeddings)


def gpt_flops_per_token(config, seq: int) -> float:
    """Model FLOPs of one training step per token of the GPT a :class:`GPTConfig` builds,
    trained on sequences of `seq` tokens."""
    return training_flops_per_token(config.layers, config.hidden, config.kv_heads * config.head_dim,
                                    config.ffn, config.vocab_size, config.mlp, seq)
