"""Property-based (hypothesis) fuzzing of the one-byte codec (pycomm/codec.py), whose codes a
peer sends.

For every range the constructor accepts, every byte decodes to what the byte layout in the
module docstring says (checked against a pure-Python decoder), every byte but 0x80 decodes
finite, and codes given as views into larger tensors (non-contiguous, any shape, empty) decode
element for element; codes of another dtype raise ValueError.

Profiles (tests/fuzz_profiles.py): by default ``pycomm-ci``, about 60 examples per test, no
deadline; ``pytest tests/ops/test_fuzz_codec.py --hypothesis-profile=long`` runs thousands.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from pycomm.codec import NONFINITE_CODE, LogByteCodec

# lo and hi anywhere among the positive floats (log-uniform), plus the edges. Half the pairs are
# drawn as lo < hi (lo from where the constructor accepts it on), so that most ranges are accepted
# and the decode checks run; the other half probe the rejections.
magnitude_st = st.one_of(
    st.builds(lambda e, m: m * 10.0**e, st.integers(-320, 308), st.floats(1.0, 9.99)),
    st.sampled_from([5e-324, 2.2250738585072014e-308, 1e-160, 1e160, 1.7976931348623157e308]),
)


def _ordered_pair(e: int, m: float, decades: float) -> tuple[float, float]:
    lo = m * 10.0**e
    log_hi = math.log10(lo) + decades
    return lo, (1.7976931348623157e308 if log_hi >= 308.25 else 10.0**log_hi)


ordered_pair_st = st.builds(_ordered_pair, st.integers(-153, 306), st.floats(1.0, 9.99), st.floats(1e-3, 460.0))
range_st = st.one_of(ordered_pair_st, st.tuples(magnitude_st, magnitude_st))


def accepted_codec(lo: float, hi: float) -> LogByteCodec:
    try:
        return LogByteCodec(lo, hi)
    except ValueError:
        assume(False)
        raise


def reference_decode(codec: LogByteCodec, code: int) -> float:
    """The byte layout: bit 7 sign, bits 0-6 magnitude code m; m = 0 is zero; 0x80 is NaN;
    magnitude lo * r**(m - 1) * 2r / (1 + r) with r = (hi / lo) ** (1 / 126)."""
    if code == NONFINITE_CODE:
        return math.nan
    m = code & 0x7F
    magnitude = 0.0 if m == 0 else codec.lo * codec.ratio ** (m - 1) * (2 * codec.ratio / (1 + codec.ratio))
    return -magnitude if code & 0x80 else magnitude


@given(lo_hi=range_st)
def test_every_code_of_an_accepted_range_decodes_finite(lo_hi):
    lo, hi = lo_hi
    """Issue 11, item 5: a range the constructor accepts never decodes a code to NaN or Inf."""
    codec = accepted_codec(lo, hi)
    codes = torch.arange(256, dtype=torch.uint8)
    values = codec.decode(codes)
    finite = torch.isfinite(values)
    assert not finite[NONFINITE_CODE]
    finite[NONFINITE_CODE] = True
    assert finite.all(), f"LogByteCodec({lo!r}, {hi!r}) decodes codes {(~finite).nonzero().reshape(-1).tolist()} " \
                         "to non-finite values"
    for code in range(256):
        expected = reference_decode(codec, code)
        actual = values[code].item()
        if code == NONFINITE_CODE:
            assert math.isnan(actual)
        else:
            assert actual == pytest.approx(expected, rel=1e-12, abs=0.0), code
    magnitudes = values[1:128]
    assert torch.all(magnitudes[1:] > magnitudes[:-1]), "magnitudes must increase with the code"
    assert torch.equal(values[129:], -values[1:128])


@given(data=st.data(), shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
       layout=st.sampled_from(["contiguous", "slice", "transposed", "strided"]))
def test_decode_of_views(data, shape, layout):
    """Codes as views into larger buffers decode element for element like the plain bytes."""
    codec = LogByteCodec(1e-3, 1e2)
    n = math.prod(shape)
    raw = data.draw(st.binary(min_size=n, max_size=n))
    plain = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(shape) if n else torch.zeros(shape,
                                                                                                      dtype=torch.uint8)
    if layout == "slice":
        big = torch.full((n + 10,), NONFINITE_CODE, dtype=torch.uint8)
        big[3:3 + n] = plain.reshape(-1)
        codes = big[3:3 + n].view(shape)
    elif layout == "transposed" and len(shape) >= 2:
        codes = plain.transpose(0, -1).contiguous().transpose(0, -1)
    elif layout == "strided":
        big = torch.full((2 * n,), NONFINITE_CODE, dtype=torch.uint8)
        big[::2] = plain.reshape(-1)
        codes = big[::2].view(shape) if n else plain
    else:
        codes = plain
    assert torch.equal(codes, plain)
    values = codec.decode(codes)
    assert values.shape == plain.shape and values.dtype == torch.float64
    flat = values.reshape(-1).tolist()
    for code, value in zip(plain.reshape(-1).tolist(), flat):
        expected = reference_decode(codec, code)
        assert (math.isnan(value) and math.isnan(expected)) or value == pytest.approx(expected, rel=1e-12, abs=0.0)


@given(dtype=st.sampled_from([torch.int8, torch.int16, torch.int32, torch.int64, torch.float32, torch.bool]),
       n=st.integers(0, 4))
def test_decode_rejects_other_dtypes(dtype, n):
    with pytest.raises(ValueError):
        LogByteCodec().decode(torch.zeros(n, dtype=dtype))


@given(lo_hi=range_st, g=st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=16))
def test_encode_decode_round_trip(lo_hi, g):
    """encode equals its float64 definition; decoding is within the stated relative error inside
    [lo, hi], saturates above, and keeps NaN/Inf visible as NaN."""
    lo, hi = lo_hi
    codec = accepted_codec(lo, hi)
    x = torch.tensor(g, dtype=torch.float64)
    codes = codec.encode(x)
    assert torch.equal(codes, codec.encode_reference(x))
    y = codec.decode(codes)
    bound = codec.relative_error_bound()
    for xi, yi in zip(x.tolist(), y.tolist()):
        if not math.isfinite(xi):
            assert math.isnan(yi)
        elif codec.lo <= abs(xi) <= codec.hi:
            assert abs(yi / xi - 1) <= bound * (1 + 1e-9)
        else:
            assert math.isfinite(yi)
