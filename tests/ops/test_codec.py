"""The one-byte log codec: round trip, error bound, zero, saturation; the table form of
encode / decode (what runs on the device) against the float64 reference definition."""

import math

import pytest
import torch

from pycomm.codec import LogByteCodec

from cuda_support import requires_cuda


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


CODECS = [LogByteCodec(1e-3, 1e2), LogByteCodec(1e-4, 1e4), LogByteCodec(1e-7, 10.0), LogByteCodec(0.37, 0.5)]


def _boundary_values(codec):
    """Both sides of every step-up point and of the below-lo rounding point, plus specials."""
    points = codec._tables(torch.device("cpu"))[0]
    below = torch.tensor([codec._below_bound], dtype=torch.float64).sqrt()
    edges = torch.cat([points, below, torch.tensor([codec.lo, codec.hi], dtype=torch.float64)])
    near = [edges]
    for direction in (0.0, math.inf):
        step = edges
        for _ in range(3):
            step = torch.nextafter(step, torch.full_like(step, direction))
            near.append(step)
    specials = torch.tensor([0.0, 5e-324, 1e-300, math.inf, math.nan, 1e300], dtype=torch.float64)
    mags = torch.cat(near + [specials])
    return torch.cat([mags, -mags])


@pytest.mark.parametrize("codec", CODECS, ids=str)
def test_table_encode_equals_reference(codec):
    g = torch.cat([_boundary_values(codec), _signed_logspace(codec.lo / 10, codec.hi * 10, 100_001, seed=1),
                   torch.randn(10_000, dtype=torch.float64, generator=torch.Generator().manual_seed(2))])
    assert torch.equal(codec.encode(g), codec.encode_reference(g))
    # float32 inputs, other shapes
    f = g.float()[: g.numel() // 2 * 2].reshape(-1, 2)
    assert torch.equal(codec.encode(f), codec.encode_reference(f).reshape(f.shape))
    assert codec.encode(torch.tensor(0.5)).shape == ()


@pytest.mark.parametrize("codec", CODECS, ids=str)
def test_table_decode_equals_formula(codec):
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    m = (codes & 0x7F).long()
    formula = torch.where((codes & 0x80) != 0, -codec.decode_magnitude(m), codec.decode_magnitude(m))
    formula[0x80] = math.nan  # the non-finite marker
    assert torch.equal(codec.decode(codes).nan_to_num(7.0), formula.nan_to_num(7.0))
    assert torch.isnan(codec.decode(codes))[0x80] and torch.isnan(codec.decode(codes)).sum() == 1
    assert torch.equal(codec.decode(codes.reshape(16, 16)).nan_to_num(7.0), formula.nan_to_num(7.0).reshape(16, 16))


def test_pickle_drops_device_tables():
    import pickle

    codec = LogByteCodec(1e-5, 1.0)
    codec.encode(torch.ones(3))
    clone = pickle.loads(pickle.dumps(codec))
    assert clone == codec and clone._cache == {}
    g = torch.randn(1000, dtype=torch.float64)
    assert torch.equal(clone.encode(g), codec.encode(g))


@requires_cuda
@pytest.mark.parametrize("codec", CODECS, ids=str)
def test_cuda_codes_and_values_equal_cpu(codec):
    g = torch.cat([_boundary_values(codec), _signed_logspace(codec.lo / 10, codec.hi * 10, 100_001, seed=3)])
    codes = codec.encode(g.cuda())
    assert codes.device.type == "cuda"
    assert torch.equal(codes.cpu(), codec.encode_reference(g))
    all_codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    assert torch.equal(codec.decode(all_codes.cuda()).cpu(), codec.decode(all_codes))


@pytest.mark.parametrize("codec", CODECS, ids=str)
def test_nonfinite_values_keep_a_marker(codec):
    from pycomm.codec import NONFINITE_CODE

    g = torch.tensor([math.nan, math.inf, -math.inf, -math.nan, 1.0, -0.0], dtype=torch.float64)
    codes = codec.encode(g)
    assert codes[:4].tolist() == [NONFINITE_CODE] * 4
    assert torch.equal(codes, codec.encode_reference(g))
    decoded = codec.decode(codes)
    assert torch.isnan(decoded[:4]).all() and torch.isfinite(decoded[4:]).all()
    assert codes[5].item() == 0 and decoded[5].item() == 0.0  # minus zero is zero, not the marker


def _accepted(lo: float, hi: float) -> bool:
    try:
        LogByteCodec(lo, hi)
    except ValueError:
        return False
    return True


def _assert_every_code_finite(codec: LogByteCodec) -> None:
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    values = codec.decode(codes)
    finite = torch.isfinite(values)
    assert finite.sum() == 255 and not finite[0x80], (codec, values[~finite])
    assert (values[1:128].diff() >= 0).all() and (values[1:128] > 0).all()
    # The extremes of float64 encode to codes that decode finite too (saturation, rounding to zero).
    extremes = torch.tensor([5e-324, 2.2250738585072014e-308, codec.lo, codec.hi, 1.7976931348623157e308],
                            dtype=torch.float64)
    extremes = torch.cat([extremes, -extremes])
    assert torch.isfinite(codec.decode(codec.encode(extremes))).all()
    assert torch.equal(codec.encode(extremes), codec.encode_reference(extremes))


def _bisect_bits(accepted_low: float, rejected_high: float, accepts) -> tuple[float, float]:
    """The adjacent float64 pair (accepted, rejected) between the two given ends (positive floats, in
    either order): positive doubles are ordered as their bit patterns."""
    a = torch.tensor([accepted_low], dtype=torch.float64).view(torch.int64).item()
    b = torch.tensor([rejected_high], dtype=torch.float64).view(torch.int64).item()
    as_float = lambda bits: torch.tensor([bits], dtype=torch.int64).view(torch.float64).item()  # noqa: E731
    assert accepts(as_float(a)) and not accepts(as_float(b))
    while abs(b - a) > 1:
        mid = (a + b) // 2
        if accepts(as_float(mid)):
            a = mid
        else:
            b = mid
    return as_float(a), as_float(b)


def test_nan_ranges_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="hi / lo"):
        LogByteCodec(1e-160, 1e160)  # ratio inf: every code decoded to NaN
    with pytest.raises(ValueError, match="hi / lo"):
        LogByteCodec(1.0, 1.0000000000000002)  # ratio rounds to 1: log r = 0
    with pytest.raises(ValueError, match="too large"):
        LogByteCodec(1.0, 1.7e308)  # hi * 2r / (1 + r) overflows
    with pytest.raises(ValueError, match="too small"):
        LogByteCodec(1e-300, 1.0)  # the rounding below lo squares underflow
    with pytest.raises(ValueError, match="smallest normal"):
        LogByteCodec(5e-324, 1.0)
    for bad in [(math.nan, 1.0), (1e-3, math.nan), (1e-3, math.inf), (True, 2.0), ("1e-3", 1.0), (2.0, 1.0)]:
        with pytest.raises(ValueError):
            LogByteCodec(*bad)


def test_every_accepted_range_decodes_finite():
    """Random ranges over the whole float64 exponent range: each is rejected, or every code decodes finite."""
    gen = torch.Generator().manual_seed(11)
    exponents = torch.rand(400, 2, generator=gen, dtype=torch.float64) * 616 - 308
    accepted = 0
    for e_lo, e_hi in exponents.tolist():
        lo, hi = 10.0 ** min(e_lo, e_hi), 10.0 ** max(e_lo, e_hi)
        if _accepted(lo, hi):
            accepted += 1
            _assert_every_code_finite(LogByteCodec(lo, hi))
    assert 20 < accepted < 400  # both outcomes were exercised


@pytest.mark.parametrize("fixed", [1e-3, 1.0, 1e100])
def test_boundaries_of_the_accepted_ranges_decode_finite(fixed):
    # The largest accepted hi for lo = fixed, and the smallest accepted lo for hi = fixed * 1e10:
    # the last accepted float64 decodes every code finite, the next one is rejected.
    hi_ok, hi_bad = _bisect_bits(fixed * 10, 1.7976931348623157e308, lambda hi: _accepted(fixed, hi))
    assert hi_ok < hi_bad
    _assert_every_code_finite(LogByteCodec(fixed, hi_ok))
    assert not _accepted(fixed, hi_bad)
    top = fixed * 1e10
    lo_ok, lo_bad = _bisect_bits(fixed, 5e-324, lambda lo: _accepted(lo, top))
    assert lo_bad < lo_ok
    _assert_every_code_finite(LogByteCodec(lo_ok, top))
    assert not _accepted(lo_bad, top)
    # The narrowest range: hi just far enough above lo for a ratio above 1.
    narrow_ok, narrow_bad = _bisect_bits(fixed * 2, fixed, lambda hi: _accepted(fixed, hi))
    assert fixed < narrow_bad < narrow_ok
    _assert_every_code_finite(LogByteCodec(fixed, narrow_ok))
    assert not _accepted(fixed, narrow_bad)


def test_extreme_accepted_ranges_decode_finite():
    # The smallest lo and the largest hi accepted at all (narrow ranges), and the widest hi / lo.
    lo_ok, lo_bad = _bisect_bits(1e-100, 5e-324, lambda lo: _accepted(lo, 2 * lo))
    assert 1e-154 < lo_ok < 1e-153
    hi_ok, hi_bad = _bisect_bits(1e300, 1.7976931348623157e308, lambda hi: _accepted(hi / 2, hi))
    assert hi_ok > 1.7e308
    wide_ok, wide_bad = _bisect_bits(1e-140 * 10, 1.7976931348623157e308, lambda hi: _accepted(1e-140, hi))
    assert wide_ok / 1e-140 > 1e307
    for codec in (LogByteCodec(lo_ok, 2 * lo_ok), LogByteCodec(hi_ok / 2, hi_ok), LogByteCodec(1e-140, wide_ok)):
        _assert_every_code_finite(codec)
    for lo, hi in ((lo_bad, 2 * lo_bad), (hi_bad / 2, hi_bad), (1e-140, wide_bad)):
        assert not _accepted(lo, hi)
