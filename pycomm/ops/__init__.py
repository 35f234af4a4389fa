"""Thin, documented wrappers over the ``torch.ops.pycomm`` kernels, one module per op family.

- :mod:`pycomm.ops.quantization`: :func:`quantize`, :func:`dequantize`, ... and :class:`QuantizedTensor`;
- :mod:`pycomm.ops.dgc`: top-k selection and the DGC ops;
- :mod:`pycomm.ops.philox`: counter-based random variates;
- :mod:`pycomm.ops.layouts`: bucket and segment tables, record sizes;
- :mod:`pycomm.ops.lgreco_solver`: the L-GreCo solver's op (used by :mod:`pycomm.lgreco`).

Each wrapper is followed by its op's fake kernel (shape propagation for torch.compile and meta
tensors); the schemas are in ``csrc/ops.cpp``.

The quantized byte format (bucket records of ``[min f32][unit f32][levels]``)
is specified in ``csrc/include/pycomm/quant_format.h``. CPU and CUDA produce
the same bytes for the same input and seed.

Ops that write into their arguments (quantize's ``residual``, dequantize's ``out``,
``dgc_compensate``'s ``u`` and ``v``, ``dgc_mask``, ``first_bad``, ``philox_axpy_`` and
``philox_axpy_multi_``) follow torch's rule for in-place ops, also when called as raw
``torch.ops.pycomm.*``: with grad mode on, a leaf that requires grad raises ``ValueError``
(they have no derivative: call them under ``torch.no_grad()``), and every tensor they write
gets its version counter bumped, so a backward that saved it raises instead of silently
using the new values.

Example::

    import torch, pycomm
    x = torch.randn(10_000)
    q = pycomm.ops.quantize(x, bits=4, bucket_size=512)
    x_hat = pycomm.ops.dequantize(q)               # same shape and dtype as x
    print(q.nbytes, x.numel() * 4)                 # 5280 vs 40000 bytes
"""

from pycomm.ops.validation import HEADER_BYTES, MAX_BUCKET_SIZE, SUPPORTED_DTYPES  # noqa: F401  (constants of the format)
from pycomm.ops.dgc import densify, dgc_compensate, dgc_mask, topk, topk_count
from pycomm.ops.layouts import bucket_table, mixed_payload_bytes, num_buckets, record_bytes, segment_table
from pycomm.ops import lgreco_solver  # noqa: F401  (registers the solver's fake; its API is pycomm.lgreco)
from pycomm.ops.philox import (
    PHILOX_DISTRIBUTIONS,
    philox_axpy_,
    philox_axpy_multi_,
    philox_dot,
    philox_dot_multi,
    philox_normal,
    philox_perturbed_copy,
    philox_rademacher,
)
from pycomm.ops.quantization import (
    QuantizedTensor,
    dequantize,
    dequantize_sum,
    quantize,
    quantize_with_error_feedback,
)

from pycomm.ops import dgc as _dgc, layouts as _layouts, philox as _philox, quantization as _quantization

__all__ = [*_quantization.__all__, *_layouts.__all__, "SUPPORTED_DTYPES", *_dgc.__all__, *_philox.__all__]
