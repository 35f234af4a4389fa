"""The benchmark's models: byte-level language models on the demo corpus.

* :class:`CharTransformer` (model ``lm`` of ``pycomm bench e2e`` and the demo):
  a small causal transformer, compute and communication in proportion.
* :class:`ByteMLP` (model ``large``): a fixed-window MLP with large dense layers
  (about 26M parameters by default) and little compute per parameter, so that
  gradient communication dominates a step.

Both take ``int64`` byte tokens ``(batch, time)`` and the next-byte targets of
:func:`pycomm.bench.data.train_batch`, and expose ``loss_from_logits`` and
``correct`` (next-byte top-1 hits) so that a training loop can score them the
same way.

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

__all__ = ["ModelConfig", "CharTransformer", "ByteMLP"]


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
        return self.loss_from_logits(self(tokens), targets)

    @staticmethod
    def loss_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``forward``'s logits against ``targets`` ``(batch, time)``."""
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    @staticmethod
    def correct(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
        """Top-1 next-byte hits and the number of predictions."""
        return int((logits.argmax(-1) == targets).sum()), targets.numel()

    def num_parameters(self) -> int:
        """Total number of parameters."""
        return sum(p.numel() for p in self.parameters())


class ByteMLP(nn.Module):
    """Fixed-window next-byte MLP with large dense layers (communication-heavy).

    The last ``context`` bytes are embedded (``embed_dim`` each), concatenated
    and passed through ``len(hidden)`` GELU layers and an output head; the model
    predicts the byte after the window. With the defaults (32 x 64 inputs,
    hidden 4096 and 4096) it has 26.3M parameters, 99.9% of them in three
    weight matrices, and costs only about 6 flops per parameter per sample, so
    a data-parallel step is dominated by the gradient exchange on any slow link.

    Args:
        context: bytes in the input window.
        embed_dim: width of each byte's embedding.
        hidden: widths of the hidden layers.
        vocab_size: number of token values (256 for bytes).
    """

    def __init__(self, context: int = 32, embed_dim: int = 64, hidden: tuple[int, ...] = (4096, 4096),
                 vocab_size: int = 256) -> None:
        super().__init__()
        if context < 1 or embed_dim < 1 or not hidden or min(hidden) < 1:
            raise ValueError(f"context, embed_dim and hidden widths must be >= 1, got {context}, {embed_dim}, {hidden}")
        self.context = context
        self.embed = nn.Embedding(vocab_size, embed_dim)
        widths = (context * embed_dim, *hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], vocab_size)
        for layer in (*self.layers, self.head):
            nn.init.normal_(layer.weight, std=layer.in_features ** -0.5)
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.embed.weight, std=1.0)
        with torch.no_grad():  # start at the uniform prediction, like the transformer (loss ln 256)
            self.head.weight.mul_(0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of the byte after the last ``context`` tokens, shape ``(batch, vocab_size)``.

        Args:
            tokens: ``int64`` tensor ``(batch, time)`` with ``time >= context``.
        """
        if tokens.shape[1] < self.context:
            raise ValueError(f"need at least {self.context} tokens per row, got {tokens.shape[1]}")
        x = self.embed(tokens[:, -self.context:]).flatten(1)
        for layer in self.layers:
            x = F.gelu(layer(x))
        return self.head(x)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the byte after the window (nats per byte)."""
        return self.loss_from_logits(self(tokens), targets)

    @staticmethod
    def loss_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``forward``'s logits; ``targets`` is ``(batch, time)``, its last column is scored."""
        return F.cross_entropy(logits, targets[:, -1])

    @staticmethod
    def correct(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
        """Top-1 hits on the byte after the window and the number of predictions."""
        return int((logits.argmax(-1) == targets[:, -1]).sum()), targets.shape[0]

    def num_parameters(self) -> int:
        """Total number of parameters."""
        return sum(p.numel() for p in self.parameters())
