"""The one-byte log codec: round trip, error bound, zero, saturation."""

import math

import pytest
import torch

from pycomm.codec import LogByteCodec


def _signed_logspace(lo, hi, n=200_001, seed=0):
    mags = torch.logspace(math.log10(lo), math.log10(hi), n, dtype=torch.float64)
    signs = torch.where(torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5, -1.0, 1.0)
    return mags * signs.double()


@pytest.mark.parametrize("lo,hi", [(1e-3, 1e2), (1e-4, 1e4), (1e-7, 10.0)])
def test_round_trip_within_stated_bound(lo, hi):
    codec = LogByteCodec(lo, hi)
    g = _signed_logspace(lo, hi)
    codes = codec.encode(g)
    assert codes.dtype == torch.uint8 and codes.shape == g.shape
    rel = (codec.decode(codes) / g - 1).abs()
    assert rel.max() <= codec.relative_error_bound() + 1e-12
    assert torch.equal(torch.sign(codec.decode(codes)), torch.sign(g))


def test_five_percent_over_five_decades_and_what_eight_bits_allow():
    # 5 decades at <= 5%: the default range.
    assert LogByteCodec(1e-3, 1e2).relative_error_bound() <= 0.05
    # 127 magnitudes per sign cannot give 5% over 8 decades: the bound is 7.3% there.
    eight = LogByteCodec(1e-4, 1e4).relative_error_bound()
    assert 0.072 < eight < 0.074


def test_zero_exact_and_extremes():
    codec = LogByteCodec(1e-3, 1e2)
    out = codec.decode(codec.encode(torch.tensor([0.0, -0.0, 1e-12, -1e12, 5e3])))
    assert out[0] == 0 and out[1] == 0 and out[2] == 0
    assert out[3] < 0 and abs(out[3]) == pytest.approx(1e2, rel=0.05)  # saturates at hi
    assert out[4] == pytest.approx(1e2, rel=0.05)
    with pytest.raises(ValueError):
        LogByteCodec(0.0, 1.0)
    with pytest.raises(ValueError, match="uint8"):
        codec.decode(torch.zeros(3))
