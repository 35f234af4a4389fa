"""Per-layer compression errors and sizes of candidate settings, measured with pycomm's own kernels.

L-GreCo (:mod:`pycomm.hooks.lgreco`) needs, for every layer l and candidate setting c, the L2 norm
of the compression error ``||C_c(g_l) - g_l||`` of the layer's accumulated gradient and the
bytes that setting sends. The errors here come from the kernels the hooks really run: the
quantize and dequantize kernels at each bit width, and the top-k kernel at each density, each
launched once per candidate over a whole DDP bucket through a bucket or segment table.

Example::

    import torch
    from pycomm import layer_errors

    g = torch.randn(3000)
    layers = [(0, 1000), (1000, 2000)]           # (offset, length) of two layers in g
    err = layer_errors.quantization_errors(g, layers, bits=(2, 4, 8))       # [2, 3] float64
    size = layer_errors.quantization_sizes([1000, 2000], bits=(2, 4, 8))   # bytes per layer and candidate
"""

from __future__ import annotations

from typing import Sequence

import torch

from pycomm import ops
from pycomm.ops.quantization import dequantize_records_into, quantize_records

__all__ = ["quantization_errors", "quantization_sizes", "topk_errors", "topk_sizes", "INDEX_BYTES"]

#: Bytes of one top-k index on the wire (int32).
INDEX_BYTES = 4


def _per_layer_norms(squares: torch.Tensor, layers: Sequence[tuple[int, int]]) -> torch.Tensor:
    """L2 norm of each layer's slice of ``squares`` (float64 squared errors).

    One reduction per layer over its contiguous slice, not a scatter-add: float64 ``index_add_``
    uses atomics on CUDA, so its sums (and the solver's choice) could change from run to run.
    A slice's sum has a fixed order on each device, so equal inputs give equal bits on every run.
    """
    if not layers:
        return squares.new_zeros(0)
    return torch.stack([squares[offset:offset + length].sum() for offset, length in layers]).sqrt()


def _check_layers(values: torch.Tensor, layers: Sequence[tuple[int, int]]) -> None:
    if values.dim() != 1 or values.dtype != torch.float32:
        raise ValueError(f"values must be a 1-D float32 tensor, got {values.dtype} of shape {tuple(values.shape)}")
    end = 0
    for offset, length in layers:
        if offset < end or length < 0 or offset + length > values.numel():
            raise ValueError(f"layers must be ordered, non-overlapping (offset, length) slices of the "
                             f"{values.numel()} values; got ({offset}, {length})")
        end = offset + length


def quantization_errors(values: torch.Tensor, layers: Sequence[tuple[int, int]], bits: Sequence[int],
                        bucket_size: int = 512, stochastic: bool = True, seed: int = 0) -> torch.Tensor:
    """``[len(layers), len(bits)]`` float64 norms of quantize-then-dequantize errors per layer.

    Args:
        values: the flat float32 accumulated gradient of one DDP bucket (with its residual).
        layers: ``(offset, length)`` of each layer in ``values``, in order.
        bits: candidate bit widths.
        bucket_size, stochastic, seed: as in the quantization hook.
    """
    _check_layers(values, layers)
    out = torch.zeros(len(layers), len(bits), dtype=torch.float64, device=values.device)
    if not layers:
        return out
    table = ops.bucket_table(layers, bucket_size, device=values.device)
    for column, b in enumerate(bits):
        payload = quantize_records(values, bits=int(b), bucket_size=bucket_size, stochastic=stochastic, seed=seed,
                                    bucket_table=table, num_buckets=table.shape[0])
        decoded = values.clone()  # elements outside the table keep their value: zero error there
        dequantize_records_into(payload, decoded, bits=int(b), bucket_size=bucket_size, bucket_table=table)
        out[:, column] = _per_layer_norms((decoded.double() - values.double()).square(), layers)
    return out


def quantization_sizes(lengths: Sequence[int], bits: Sequence[int], bucket_size: int = 512) -> list[list[int]]:
    """Payload bytes of each layer (its own buckets of ``bucket_size``) at each bit width."""
    return [[ops.num_buckets(n, bucket_size) * ops.record_bytes(int(b), bucket_size) for b in bits]
            for n in lengths]


def topk_errors(values: torch.Tensor, layers: Sequence[tuple[int, int]], densities: Sequence[float],
                exact: bool = False, sample_ratio: float = 0.01, seed: int = 0) -> torch.Tensor:
    """``[len(layers), len(densities)]`` float64 norms of what top-k at each density leaves out, per layer.

    Args:
        values: the flat float32 accumulated velocity of one DDP bucket (what DGC compresses).
        layers: ``(offset, length)`` of each layer in ``values``, in order.
        densities: candidate densities; each layer keeps ``ops.topk_count(length, density)`` elements.
        exact, sample_ratio, seed: as in the DGC hook.
    """
    _check_layers(values, layers)
    out = torch.zeros(len(layers), len(densities), dtype=torch.float64, device=values.device)
    if not layers:
        return out
    host_segments = ops.segment_table(layers)
    segments = host_segments.to(values.device)
    squares = values.double().square()
    for column, density in enumerate(densities):
        _, indices = ops.topk(values, float(density), exact=exact, sample_ratio=sample_ratio, seed=seed,
                              segments=segments, host_segments=host_segments if values.is_cuda else None)
        left = squares.clone()
        left[indices.long()] = 0.0
        out[:, column] = _per_layer_norms(left, layers)
    return out


def topk_sizes(lengths: Sequence[int], densities: Sequence[float], value_bytes: int = 4) -> list[list[int]]:
    """Bytes of each layer's top-k payload (values + int32 indices) at each density."""
    return [[ops.topk_count(n, float(d)) * (value_bytes + INDEX_BYTES) for d in densities] for n in lengths]
