"""Stateful compressors that users can call on their own tensors, outside DDP.

Example::

    import torch, pycomm
    dgc = pycomm.compressors.DGC(density=0.001, momentum=0.9)
    grad = torch.randn(1_000_000)
    values, indices = dgc.compress(grad)              # 1,000 values + 1,000 int32 indices
    dense = pycomm.ops.densify(values, indices, grad.numel())
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from pycomm import ops

__all__ = ["DGC"]


class DGC:
    """Deep Gradient Compression (Lin et al., 2018) of one flat tensor, or of the layers of one.

    Each call accumulates the gradient with momentum correction (``u = m*u + g; v += u``, or
    the Nesterov form), selects the ``density`` fraction of ``v`` with the largest magnitude,
    and zeroes ``v`` there (and ``u``: momentum factor masking). What is not sent stays in ``v``
    and is sent later, so nothing is lost. Momentum lives here: pair with SGD(momentum=0).

    Args:
        density: fraction of elements sent, in (0, 1].
        momentum: momentum factor m in [0, 1).
        nesterov: Nesterov momentum correction (``u = m*(u + g); v += u + g``).
        clip_norm: local gradient clipping threshold (per layer), or None. The DDP hook scales
            it by ``W^-1/2`` for W workers, as in the paper.
        momentum_masking: zero ``u`` at the sent positions (on by default).
        exact: exact top-k instead of the sampled threshold search.
        sample_ratio: fraction of elements sampled to estimate the threshold.
        seed: seed of the sample's random start.
    """

    def __init__(self, density: float = 0.001, momentum: float = 0.9, nesterov: bool = False,
                 clip_norm: Optional[float] = None, momentum_masking: bool = True, exact: bool = False,
                 sample_ratio: float = 0.01, seed: int = 0) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if clip_norm is not None and clip_norm <= 0:
            raise ValueError(f"clip_norm must be positive or None, got {clip_norm}")
        if not 0.0 < sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be in (0, 1], got {sample_ratio}")
        self.density = density
        self.momentum = momentum
        self.nesterov = nesterov
        self.clip_norm = clip_norm
        self.momentum_masking = momentum_masking
        self.exact = exact
        self.sample_ratio = sample_ratio
        self.seed = seed
        self.u: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def _buffers(self, grad: torch.Tensor) -> None:
        if self.u is None or self.u.numel() != grad.numel() or self.u.device != grad.device:
            self.u = torch.zeros(grad.numel(), dtype=torch.float32, device=grad.device)
            self.v = torch.zeros_like(self.u)

    def compensate(self, grad: torch.Tensor, segments: Optional[torch.Tensor] = None,
                   clip_norm: Optional[float] = None) -> None:
        """Accumulate ``grad`` into ``u`` and ``v`` (clipping each segment to ``clip_norm`` if given)."""
        self._buffers(grad)
        clip = self.clip_norm if clip_norm is None else clip_norm
        ops.dgc_compensate(grad, self.u, self.v, self.momentum, self.nesterov, clip or 0.0, segments)

    def select(self, density: Optional[float] = None, segments: Optional[torch.Tensor] = None,
               seed: Optional[int] = None,
               host_segments: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of ``v`` by magnitude (per segment), without changing ``v``.

        ``segments`` may carry per-segment counts (``pycomm.ops.segment_table(..., counts=...)``):
        then each segment keeps its own count and ``density`` is not used. ``host_segments`` is an
        optional CPU copy of a CUDA ``segments`` table (see :func:`pycomm.ops.topk`).
        """
        if self.v is None:
            raise RuntimeError("select() before compensate(): there is nothing accumulated")
        return ops.topk(self.v, self.density if density is None else density, exact=self.exact,
                        sample_ratio=self.sample_ratio, seed=self.seed if seed is None else seed,
                        segments=segments, host_segments=host_segments)

    def mask(self, indices: torch.Tensor, first_bad: Optional[torch.Tensor] = None) -> None:
        """Zero ``v`` at the sent positions, and ``u`` too with momentum masking (``first_bad``: see
        :func:`pycomm.ops.dgc_mask`)."""
        ops.dgc_mask(self.v, indices, self.u if self.momentum_masking else None, first_bad=first_bad)

    def compress(self, grad: torch.Tensor, density: Optional[float] = None,
                 segments: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """compensate + select + mask: returns the (values, indices) to send (see :meth:`select` for
        per-segment counts)."""
        self.compensate(grad, segments)
        values, indices = self.select(density, segments)
        self.mask(indices)
        return values, indices

    def state_dict(self) -> dict[str, Any]:
        return {"u": self.u, "v": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.u, self.v = state["u"], state["v"]
