"""Quantization: bucket records of ``[min f32][unit f32][levels]`` (``csrc/include/pycomm/quant_format.h``).

The public wrappers check their arguments and return or take a :class:`QuantizedTensor`; the private
keyword wrappers (``quantize_records`` and the two decoders) reach the op modes that the collectives
use (skip ranges, mixed tables, reduced chunks). Each op's fake kernel follows its wrapper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from pycomm import _C  # noqa: F401  (loads the library that registers torch.ops.pycomm)
from pycomm.ops.validation import HEADER_BYTES, SUPPORTED_DTYPES, check_bits_bucket, check_float_tensor
from pycomm.ops.layouts import record_bytes

__all__ = ["QuantizedTensor", "quantize", "quantize_with_error_feedback", "dequantize", "dequantize_sum"]


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized tensor: the payload of bucket records and what is needed to decode it.

    Attributes:
        payload: uint8 ``[num_buckets, record_bytes(bits, bucket_size)]``; the bytes sent on the wire.
        bits: bits per element, 1..8.
        bucket_size: elements per bucket (a multiple of 8).
        numel: number of elements encoded.
        dtype: dtype of the original tensor (what :func:`dequantize` returns).
        shape: shape of the original tensor.
    """

    payload: torch.Tensor
    bits: int
    bucket_size: int
    numel: int
    dtype: torch.dtype
    shape: torch.Size

    def __post_init__(self) -> None:
        check_bits_bucket(self.bits, self.bucket_size)
        if self.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if math.prod(self.shape) != self.numel:
            raise ValueError(f"shape {tuple(self.shape)} does not hold numel={self.numel} elements")
        p = self.payload
        expected_record = record_bytes(self.bits, self.bucket_size)
        if p.dtype != torch.uint8 or p.dim() != 2 or p.shape[1] != expected_record:
            raise ValueError(
                f"payload must be uint8 of shape [num_buckets, {expected_record}] for bits={self.bits}, "
                f"bucket_size={self.bucket_size}; got {p.dtype} {tuple(p.shape)}")
        if p.shape[0] * self.bucket_size < self.numel:
            raise ValueError(
                f"payload holds {p.shape[0]} buckets of {self.bucket_size} elements, fewer than numel={self.numel}")

    @property
    def num_buckets(self) -> int:
        return self.payload.shape[0]

    @property
    def meta(self) -> torch.Tensor:
        """float32 ``[num_buckets, 2]``: each bucket's (min, unit) (a copy)."""
        return self.payload[:, :HEADER_BYTES].contiguous().view(torch.float32)

    @property
    def data(self) -> torch.Tensor:
        """uint8 ``[num_buckets, bucket_size * bits / 8]``: the packed levels (a view)."""
        return self.payload[:, HEADER_BYTES:]

    @property
    def nbytes(self) -> int:
        """Bytes of the payload: what sending this tensor costs."""
        return self.payload.numel()

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)


def quantize_records(x: torch.Tensor, *, bits: int, bucket_size: int, stochastic: bool, seed: int,
                      residual: Optional[torch.Tensor] = None, bucket_table: Optional[torch.Tensor] = None,
                      num_buckets: int = -1, skip_begin: int = 0, skip_end: int = 0,
                      host_table: Optional[torch.Tensor] = None, chunk_row_begin: int = -1,
                      row_streams: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.ops.pycomm.quantize`` by keyword: the payload of bucket records of flat ``x``.

    For the collectives, which need the op's internal modes (see the schema in ``csrc/ops.cpp``):
    ``num_buckets`` (-1: from the table or ``x``), the buckets ``[skip_begin, skip_end)`` written as
    zero records, a mixed (4-column) ``bucket_table`` with ``bits=0`` and its ``host_table``, and
    ``chunk_row_begin`` for a reduced chunk. ``row_streams``: int64 ``[num_buckets]`` on ``x``'s device;
    stochastic rounding then draws element ``j`` of payload bucket ``k`` from Philox index
    ``row_streams[k] + j`` instead of ``k * bucket_size + j`` (entries: non-negative multiples of 8),
    so a bucket's draws can follow its parameter instead of its place in the payload. No checks beyond
    the op's own.
    """
    return torch.ops.pycomm.quantize(x, residual, bucket_table, num_buckets, bits, bucket_size, stochastic, seed,
                                     skip_begin, skip_end, host_table, chunk_row_begin, row_streams)


@torch.library.register_fake("pycomm::quantize")
def _quantize_fake(x, residual, bucket_table, num_buckets, bits, bucket_size, stochastic, seed, skip_begin,
                   skip_end, host_table=None, chunk_row_begin=-1, row_streams=None):
    if bucket_table is not None and bucket_table.shape[1] == 4:
        # The payload's length depends on the table's contents.
        return x.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.uint8)
    if num_buckets < 0:
        num_buckets = bucket_table.shape[0] if bucket_table is not None else (x.numel() + bucket_size - 1) // bucket_size
    return x.new_empty((num_buckets, HEADER_BYTES + bucket_size * bits // 8), dtype=torch.uint8)


def dequantize_records_into(payload: torch.Tensor, out: torch.Tensor, *, bits: int, bucket_size: int,
                             bucket_table: Optional[torch.Tensor] = None,
                             host_table: Optional[torch.Tensor] = None) -> None:
    """``torch.ops.pycomm.dequantize_into`` by keyword: decode ``payload`` into flat ``out`` (no checks beyond
    the op's)."""
    torch.ops.pycomm.dequantize_into(payload, out, bucket_table, bits, bucket_size, host_table)


@torch.library.register_fake("pycomm::dequantize_into")
def _dequantize_into_fake(payload, out, bucket_table, bits, bucket_size, host_table=None):
    return None


def dequantize_sum_records(payloads: torch.Tensor, *, bits: int, bucket_size: int,
                            init: Optional[torch.Tensor] = None, bucket_table: Optional[torch.Tensor] = None,
                            init_bucket_begin: int = 0, host_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.ops.pycomm.dequantize_sum`` by keyword: ``init`` (read through the table's rows from
    ``init_bucket_begin``) plus the decoded payloads, as new float32 (no checks beyond the op's)."""
    return torch.ops.pycomm.dequantize_sum(payloads, init, bucket_table, init_bucket_begin, bits, bucket_size,
                                           host_table)


@torch.library.register_fake("pycomm::dequantize_sum")
def _dequantize_sum_fake(payloads, init, bucket_table, init_bucket_begin, bits, bucket_size, host_table=None):
    if bucket_table is not None and bucket_table.shape[1] == 4:
        rows = torch.library.get_ctx().new_dynamic_size()
        return payloads.new_empty((rows * bucket_size,), dtype=torch.float32)
    return payloads.new_empty((payloads.shape[1] * bucket_size,), dtype=torch.float32)


def _quantize(x: torch.Tensor, residual: Optional[torch.Tensor], bits: int, bucket_size: int,
              stochastic: bool, seed: int) -> QuantizedTensor:
    check_float_tensor(x, "x")
    check_bits_bucket(bits, bucket_size)
    payload = quantize_records(x.reshape(-1), bits=bits, bucket_size=bucket_size, stochastic=bool(stochastic),
                                seed=int(seed), residual=residual)
    return QuantizedTensor(payload, bits, bucket_size, x.numel(), x.dtype, x.shape)


def quantize(x: torch.Tensor, bits: int = 4, bucket_size: int = 512, stochastic: bool = True,
             seed: int = 0) -> QuantizedTensor:
    """Quantize ``x`` (flattened) with per-bucket max-min scaling.

    Args:
        x: float32, float16 or bfloat16 tensor of any shape, CPU or CUDA.
        bits: bits per element, 1..8.
        bucket_size: elements per bucket, a positive multiple of 8.
        stochastic: unbiased stochastic rounding (Philox keyed by ``seed`` and the
            element's position) instead of round-to-nearest.
        seed: 64-bit seed for stochastic rounding; the same seed gives the same bytes on CPU and CUDA.

    Returns:
        A :class:`QuantizedTensor`. Per element, ``|x - dequantize(q)| <= unit / 2``
        (nearest) or ``< unit`` (stochastic), with ``unit = (max - min) / (2^bits - 1)`` of its bucket.
    """
    return _quantize(x, None, bits, bucket_size, stochastic, seed)


def quantize_with_error_feedback(x: torch.Tensor, residual: torch.Tensor, bits: int = 4, bucket_size: int = 512,
                                 stochastic: bool = True, seed: int = 0) -> QuantizedTensor:
    """Fused error feedback: ``x' = x + residual; q = Q(x'); residual = x' - dequantize(q)``, in one pass.

    ``residual`` is a contiguous float32 tensor with as many elements as ``x`` and is updated in place.
    Buckets holding NaN or Inf are encoded as NaN and leave their residual unchanged.
    """
    check_float_tensor(x, "x")
    if not isinstance(residual, torch.Tensor) or residual.dtype != torch.float32 or residual.numel() != x.numel():
        raise ValueError(f"residual must be a float32 tensor with {x.numel()} elements")
    if not residual.is_contiguous():
        raise ValueError("residual must be contiguous (it is updated in place)")
    return _quantize(x, residual.view(-1), bits, bucket_size, stochastic, seed)


def dequantize(q: QuantizedTensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode ``q`` into a tensor of its original dtype and shape (or into ``out``, any float dtype)."""
    if not isinstance(q, QuantizedTensor):
        raise ValueError(f"dequantize expects a QuantizedTensor, got {type(q).__name__}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.payload.device)
    else:
        check_float_tensor(out, "out")
        if out.numel() != q.numel or not out.is_contiguous():
            raise ValueError(f"out must be contiguous with {q.numel} elements, got shape {tuple(out.shape)}")
    dequantize_records_into(q.payload, out.view(-1), bits=q.bits, bucket_size=q.bucket_size)
    return out


def dequantize_sum(payloads: Union[Sequence[QuantizedTensor], torch.Tensor], bits: Optional[int] = None,
                   bucket_size: Optional[int] = None, numel: Optional[int] = None,
                   init: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum W quantized tensors (plus an optional ``init``) into one float32 tensor, in a single pass.

    Args:
        payloads: a sequence of :class:`QuantizedTensor` with equal bits, bucket_size and numel,
            or a uint8 tensor ``[W, num_buckets, record_bytes]`` (then ``bits``, ``bucket_size``
            and ``numel`` are required).
        init: optional float tensor of ``numel`` elements added to the sum.

    Returns:
        float32 tensor of ``numel`` elements: ``init + sum_w dequantize(payloads[w])``, summed in that order.
    """
    if isinstance(payloads, torch.Tensor):
        if bits is None or bucket_size is None or numel is None:
            raise ValueError("bits, bucket_size and numel are required when payloads is a tensor")
        check_bits_bucket(bits, bucket_size)
        stacked = payloads
        if stacked.dim() != 3 or stacked.dtype != torch.uint8:
            raise ValueError(f"payloads must be uint8 [W, num_buckets, record_bytes], got {stacked.dtype} "
                             f"{tuple(stacked.shape)}")
        if stacked.shape[1] * bucket_size < numel:
            raise ValueError(f"payloads hold {stacked.shape[1]} buckets of {bucket_size}, fewer than numel={numel}")
    else:
        qs = list(payloads)
        if not qs:
            raise ValueError("dequantize_sum needs at least one payload")
        first = qs[0]
        for q in qs:
            if (q.bits, q.bucket_size, q.numel, q.num_buckets) != (first.bits, first.bucket_size, first.numel,
                                                                   first.num_buckets):
                raise ValueError("all payloads must share bits, bucket_size, numel and num_buckets")
        bits, bucket_size, numel = first.bits, first.bucket_size, first.numel
        stacked = torch.stack([q.payload for q in qs])
    if init is not None:
        check_float_tensor(init, "init")
        if init.numel() != numel:
            raise ValueError(f"init must have numel={numel} elements, got {init.numel()}")
        init = init.reshape(-1)
    out = dequantize_sum_records(stacked, bits=bits, bucket_size=bucket_size, init=init)
    return out[:numel]
