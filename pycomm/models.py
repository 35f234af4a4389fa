"""A small causal transformer language model for the demo.

:class:`CharTransformer` is a pre-norm GPT-style decoder over a byte vocabulary.
Its parameters are the mix gradient compression meets in practice: large 2-D
weight matrices (embeddings, attention and MLP projections, output head) that
hold almost all of the gradient bytes, and small 1-D biases and layer-norm
parameters.

Example::

    model = CharTransformer(ModelConfig(n_layer=2, d_model=128, context=64))
    logits = model(tokens)                 # (batch, time, vocab)
    loss = model.loss(tokens, targets)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelConfig", "CharTransformer"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a :class:`CharTransformer`.

    Attributes:
        vocab_size: number of token values (256 for bytes).
        context: maximum sequence length.
        n_layer: number of transformer blocks.
        n_head: attention heads per block (must divide ``d_model``).
        d_model: width of the residual stream.
        mlp_ratio: hidden width of the MLP as a multiple of ``d_model``.
    """

    vocab_size: int = 256
    context: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    mlp_ratio: int = 4

    def to_dict(self) -> dict[str, int]:
        """The fields as a plain dict (for reports)."""
        return asdict(self)


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention then an MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"n_head {cfg.n_head} does not divide d_model {cfg.d_model}")
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model)
        self.fc_out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        shape = (b, t, self.n_head, d // self.n_head)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """Causal transformer language model over bytes.

    Args:
        cfg: the model shape.
    """

    def __init__(self, cfg: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)
        self.apply(self._init_weights)
        # scale the residual-branch outputs down with depth (GPT-2 style)
        for block in self.blocks:
            for layer in (block.proj, block.fc_out):
                nn.init.normal_(layer.weight, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of the next token, shape ``(batch, time, vocab_size)``.

        Args:
            tokens: ``int64`` tensor of shape ``(batch, time)``, ``time <= context``.
        """
        t = tokens.shape[1]
        if t > self.cfg.context:
            raise ValueError(f"sequence length {t} exceeds the context {self.cfg.context}")
        pos = torch.arange(t, device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats per byte)."""
        logits = self(tokens)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def num_parameters(self) -> int:
        """Total number of parameters."""
        return sum(p.numel() for p in self.parameters())
