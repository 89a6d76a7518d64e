"""A decoder-only transformer in plain PyTorch, built from :mod:`hybridpar_ext.nn`
(pre-norm :class:`~hybridpar_ext.nn.TransformerLayer` blocks with the residual add fused into
the next norm). The model knows nothing of parallelism: :func:`hybridpar_ext.parallel.parallelize`
applies it from outside.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .. import nn as hnn
from . import flops

NORMS, MLPS = hnn.transformer.NORMS, hnn.transformer.ACTIVATIONS


@dataclass
class GPTConfig:
    vocab_size: int = 256
    max_seq_len: int = 128
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    kv_heads: Optional[int] = None       # None: as many as heads (no GQA)
    ffn: Optional[int] = None            # None: 4 * hidden (gelu), 8/3 * hidden rounded to 8 (swiglu)
    norm: str = "layernorm"
    mlp: str = "gelu"
    tied_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self):
        if self.kv_heads is None:
            self.kv_heads = self.heads
        if self.ffn is None:
            self.ffn = 4 * self.hidden if self.mlp == "gelu" else -(-8 * self.hidden // 3 // 8) * 8
        for name in ("vocab_size", "max_seq_len", "layers", "hidden", "heads", "kv_heads", "ffn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive int, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(f"GPTConfig: hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if not 16 <= self.hidden // self.heads <= 256:
            raise ValueError(f"GPTConfig: head_dim = hidden / heads = {self.hidden // self.heads} must be in "
                             "[16, 256] (what the fused attention supports)")
        if self.heads % self.kv_heads:
            raise ValueError(f"GPTConfig: heads ({self.heads}) must be a multiple of kv_heads "
                             f"({self.kv_heads})")
        if self.norm not in NORMS:
            raise ValueError(f"GPTConfig: norm must be one of {NORMS}, got {self.norm!r}")
        if self.mlp not in MLPS:
            raise ValueError(f"GPTConfig: mlp must be one of {MLPS}, got {self.mlp!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def num_parameters(self) -> int:
        """Parameters of the model this config builds (tied embeddings counted once)."""
        return flops.gpt_num_parameters(self)

    def flops_per_token(self, seq: int) -> float:
        """Model FLOPs of one training step per token on `seq`-token sequences (the convention
        of :mod:`hybridpar_ext.models.flops`)."""
        return flops.gpt_flops_per_token(self, seq)


def make_layer(config: GPTConfig, **factory) -> hnn.TransformerLayer:
    return hnn.TransformerLayer(config.hidden, config.heads, config.kv_heads, config.ffn, config.norm,
                                config.mlp, config.rope_theta, config.norm_eps, **factory)


class GPT(torch.nn.Module):
    """Token embedding, ``layers`` pre-norm blocks, final norm, LM head (tied to the
    embedding by default). ``forward(tokens, targets=None)``: logits ``(batch, seq, vocab)``,
    or the mean cross-entropy with ``targets``."""

    def __init__(self, config: GPTConfig, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.config = config
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden, **factory)
        self.layers = torch.nn.ModuleList(make_layer(config, **factory) for _ in range(config.layers))
        self.norm = hnn.make_norm(config.norm, config.hidden, config.norm_eps, **factory)
        self.lm_head = torch.nn.Linear(config.hidden, config.vocab_size, bias=False, **factory)
        if config.tied_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                continue  # norm weights and biases keep their module's init
            # Output projections scaled by depth, as in GPT-2.
            scale = (2 * self.config.layers) ** -0.5 if name.endswith(("out_proj.weight", "fc2.weight")) else 1.0
            torch.nn.init.normal_(p, std=std * scale)

    def forward(self, tokens, targets=None):
        if tokens.shape[-1] > self.config.max_seq_len:
            raise ValueError(f"GPT: sequence of {tokens.shape[-1]} tokens is longer than "
                             f"max_seq_len {self.config.max_seq_len}")
        x, residual = self.embed(tokens), None
        for layer in self.layers:
            x, residual = layer(x, residual)
        x, _ = self.norm(x, residual)
        logits = self.lm_head(x)
        if targets is None:
            return logits
        # At least float32; float64 stays float64.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten())
