"""The direct-tensor wrappers of pycomm.ops compile with torch.compile(fullgraph=True): no graph break,
and the compiled function returns exactly what eager returns.

``backend="aot_eager"`` traces through the fake kernels and AOT autograd (what inductor would get) without
generating code, so the test stays cheap; the ops themselves then run their real kernels.
"""

import pytest
import torch

from pycomm import ops


def _quantize_roundtrip(x):
    return ops.dequantize(ops.quantize(x, bits=4, bucket_size=512, stochastic=True, seed=7))


def _dequantize_sum(x):
    q = ops.quantize(x, bits=2, bucket_size=64, stochastic=False)
    return ops.dequantize_sum([q, q, q])


def _error_feedback(x):
    residual = torch.zeros_like(x, dtype=torch.float32)
    q = ops.quantize_with_error_feedback(x, residual, bits=3)
    return ops.dequantize(q), residual


def _topk_densify(x):
    values, indices = ops.topk(x, 0.01)
    return ops.densify(values.unsqueeze(0), indices.unsqueeze(0), x.numel())


def _dgc_step(x):
    u, v = torch.zeros_like(x), torch.zeros_like(x)
    ops.dgc_compensate(x, u, v, 0.9)
    values, indices = ops.topk(v, 0.05)
    ops.dgc_mask(v, indices, u)
    return u, v, values


def _philox(x):
    z = ops.philox_normal(x.numel(), seed=3, offset=5)
    moved = ops.philox_perturbed_copy([x], seed=3, alpha=0.1)[0]
    return z, moved, ops.philox_dot([x], seed=3), ops.philox_dot_multi([x], [1, 2])


def _philox_axpy(x):
    y = x.clone()
    ops.philox_axpy_([y], seed=11, alpha=-0.5)
    ops.philox_axpy_multi_([y], [1, 2], torch.tensor([0.25, -1.0], dtype=torch.float64))
    return y


@pytest.mark.parametrize("fn", [_quantize_roundtrip, _dequantize_sum, _error_feedback, _topk_densify, _dgc_step,
                                _philox, _philox_axpy], ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_equals_eager(fn, dtype):
    torch._dynamo.reset()
    x = torch.randn(4099, generator=torch.Generator().manual_seed(0)).to(dtype)
    if fn in (_dgc_step,) and dtype != torch.float32:
        x = x.float()  # DGC's accumulators are float32
    with torch.no_grad():
        eager = fn(x)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    flat_e = eager if isinstance(eager, tuple) else (eager,)
    flat_c = compiled if isinstance(compiled, tuple) else (compiled,)
    assert len(flat_e) == len(flat_c)
    for e, c in zip(flat_e, flat_c):
        if not isinstance(e, torch.Tensor):  # philox_dot returns a Python float
            assert type(e) is type(c) and e == c
            continue
        assert e.dtype == c.dtype and e.shape == c.shape
        assert torch.equal(e, c), f"{fn.__name__}: compiled result differs from eager"
