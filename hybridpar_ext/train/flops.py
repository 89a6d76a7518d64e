"""Training FLOPs per token of the GPT, for the trainer's MFU."""


def flops_per_token(config, seq: int) -> float:
    """Training FLOPs per token: 6 per weight of every matmul (the projections, the MLP and the
    LM head; not the embedding lookup or the norms) and the causal attention's scores and
    values (half of 12 * layers * hidden * seq)."""
    h, kv = config.hidden, config.kv_heads * config.head_dim
    mlp = (3 if config.mlp == "swiglu" else 2) * h * config.ffn
    matmul_weights = config.layers * (h * (h + 2 * kv) + h * h + mlp) + config.vocab_size * h
    return 6 * matmul_weights + 6 * config.layers * h * seq
