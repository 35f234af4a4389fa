"""Per-layer compression errors and sizes for L-GreCo, against pure-torch float64 references."""

import math

import pytest
import torch

import pycomm
from pycomm import layer_errors, ops
from cuda_support import requires_cuda


def _layers():
    return [(0, 1000), (1000, 4096), (5096, 8), (5104, 777)]


def _values(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6000, generator=g)
    x[1000:5096] *= 0.01   # layers of very different scale
    x[5104:5881] = torch.distributions.StudentT(2.0).sample((777,))
    return x


def test_quantization_errors_match_per_layer_round_trip():
    x, layers, bits = _values(), _layers(), (2, 3, 4, 8)
    got = layer_errors.quantization_errors(x, layers, bits, bucket_size=256, stochastic=False)
    for l, (offset, length) in enumerate(layers):
        piece = x[offset:offset + length]
        for c, b in enumerate(bits):
            # Each layer has its own buckets, so a layer quantized alone gives the same bytes.
            decoded = ops.dequantize(ops.quantize(piece, bits=b, bucket_size=256, stochastic=False))
            want = (decoded.double() - piece.double()).norm().item()
            assert got[l, c].item() == pytest.approx(want, rel=1e-12, abs=0.0), (l, b)
    # More bits, less error, on every layer; and the slow layer's error scales with it.
    assert bool((got[:, :-1] >= got[:, 1:]).all())
    assert got[1, 1] < got[0, 1] / 20


def test_quantization_errors_leave_other_elements_out():
    x = _values()
    only = layer_errors.quantization_errors(x, [(1000, 4096)], (4,), bucket_size=256, stochastic=False)
    both = layer_errors.quantization_errors(x, _layers(), (4,), bucket_size=256, stochastic=False)
    assert only[0, 0].item() == both[1, 0].item()


def test_stochastic_errors_are_close_to_their_expectation():
    x = _values()
    a = layer_errors.quantization_errors(x, _layers(), (4,), bucket_size=256, stochastic=True, seed=1)
    b = layer_errors.quantization_errors(x, _layers(), (4,), bucket_size=256, stochastic=True, seed=2)
    assert not torch.equal(a, b)
    assert torch.allclose(a[[0, 1, 3]], b[[0, 1, 3]], rtol=0.1)


@pytest.mark.parametrize("exact", [True, False])
def test_topk_errors_match_torch_topk(exact):
    x, layers, densities = _values(3), _layers(), (0.001, 0.01, 0.1, 1.0)
    got = layer_errors.topk_errors(x, layers, densities, exact=exact)
    for l, (offset, length) in enumerate(layers):
        piece = x[offset:offset + length].double()
        for c, d in enumerate(densities):
            k = ops.topk_count(length, d)
            kept = piece.abs().topk(k).indices
            rest = piece.clone()
            rest[kept] = 0
            assert got[l, c].item() == pytest.approx(rest.norm().item(), rel=1e-9, abs=1e-12), (l, d)
    assert bool((got[:, -1] == 0).all())


def test_sizes():
    q = layer_errors.quantization_sizes([1000, 8, 0], (2, 8), bucket_size=256)
    assert q == [[4 * (8 + 64), 4 * (8 + 256)], [8 + 64, 8 + 256], [0, 0]]
    t = layer_errors.topk_sizes([1000, 8], (0.001, 0.5), value_bytes=2)
    assert t == [[1 * 6, 500 * 6], [1 * 6, 4 * 6]]


def test_bad_layers_rejected():
    x = torch.randn(100)
    with pytest.raises(ValueError, match="non-overlapping"):
        layer_errors.quantization_errors(x, [(0, 60), (50, 10)], (4,))
    with pytest.raises(ValueError, match="non-overlapping"):
        layer_errors.topk_errors(x, [(90, 20)], (0.1,))
    with pytest.raises(ValueError, match="float32"):
        layer_errors.topk_errors(x.double(), [(0, 10)], (0.1,))


def test_empty_layer_list():
    assert layer_errors.quantization_errors(torch.randn(10), [], (2, 4)).shape == (0, 2)
    assert layer_errors.topk_errors(torch.randn(10), [], (0.5,)).shape == (0, 1)


def _exact_reference_norms(squares, layers):
    """float64 per-layer reference: each layer's squared errors summed on their own, then sqrt."""
    return torch.stack([squares[offset:offset + length].clone().sum() for offset, length in layers]).sqrt()


def _check_exact_and_reproducible(device):
    x, layers = _values().to(device), _layers()
    got = layer_errors.quantization_errors(x, layers, (2, 4), bucket_size=256, stochastic=False)
    for c, b in enumerate((2, 4)):
        decoded = torch.cat([ops.dequantize(ops.quantize(x[o:o + n], bits=b, bucket_size=256, stochastic=False))
                             for o, n in layers])
        pieces = torch.cat([x[o:o + n] for o, n in layers])
        packed, start = [], 0
        for _, n in layers:
            packed.append((start, n))
            start += n
        want = _exact_reference_norms((decoded.double() - pieces.double()).square(), packed)
        assert torch.equal(got[:, c], want), (b, got[:, c] - want)
    top = layer_errors.topk_errors(x, layers, (0.01, 0.1), exact=True)
    for c, d in enumerate((0.01, 0.1)):
        squares = x.double().square()
        for o, n in layers:
            kept = x[o:o + n].abs().topk(ops.topk_count(n, d)).indices
            squares[o + kept] = 0.0
        assert torch.equal(top[:, c], _exact_reference_norms(squares, layers)), d
    # Run to run: the same bits (a float64 scatter-add with atomics would not promise this on CUDA).
    for _ in range(3):
        assert torch.equal(layer_errors.quantization_errors(x, layers, (2, 4), bucket_size=256, stochastic=False), got)
        assert torch.equal(layer_errors.topk_errors(x, layers, (0.01, 0.1), exact=True), top)


def test_per_layer_sums_are_exact_and_reproducible():
    _check_exact_and_reproducible("cpu")


@requires_cuda
def test_per_layer_sums_are_exact_and_reproducible_on_cuda():
    _check_exact_and_reproducible("cuda")
