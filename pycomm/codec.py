"""One-byte codec for scalars: sign plus log-magnitude.

Byte layout: bit 7 is the sign, bits 0-6 a magnitude code m. m = 0 is exactly
zero; m in 1..127 stands for the magnitude ``lo * r**(m - 1) * c`` with
``r = (hi / lo) ** (1 / 126)`` and ``c = 2 r / (1 + r)``, the value of each
interval ``[lo r^(m-1), lo r^m)`` that minimises the largest relative error,
which is ``(r - 1) / (r + 1)`` inside ``[lo, hi]``. Magnitudes below ``lo / r``
round to zero (or to the first code above ``lo / r``), magnitudes above ``hi``
saturate at the last code. The byte 0x80 ("minus zero", otherwise unused) marks a
non-finite value (NaN or +-Inf) and decodes as NaN, so an overflow survives the
trip: a receiver sees it and AMP's GradScaler sees it.

What 8 bits allow: with 127 magnitudes per sign, a relative error of at most
5% spans ``((1.05 / 0.95) ** 127)`` = 5.5 decades, and 8 decades cost at most
7.3%. :func:`relative_error_bound` gives the bound of a configured range.

The codec works on tensors of any shape, element by element, on the tensors'
device and without waiting for it, with the same codes and values on every
device: the magnitude code is defined by ``floor(log(|g| / lo) / log r) + 1``
evaluated in float64 on the CPU (:meth:`LogByteCodec.encode_reference`), and
encode / decode use two tables derived from it once per device (the 126 smallest
magnitudes at which that code steps up, found by bisection on the float64 bit
patterns, and the 128 decoded magnitudes), so no logarithm or power runs on the
device, where libdevice and the CPU's libm may differ in the last bit.
"""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["LogByteCodec", "NONFINITE_CODE"]

_CODES = 127

#: The code of NaN and +-Inf (sign bit with magnitude code 0); it decodes as NaN.
NONFINITE_CODE = 0x80

_SMALLEST_NORMAL = sys.float_info.min


@dataclass(frozen=True)
class LogByteCodec:
    """Sign + 7-bit log-magnitude codec over magnitudes ``[lo, hi]``.

    Args:
        lo: smallest magnitude coded with the stated relative error (a normal float64 > 0).
        hi: largest magnitude (> lo); larger ones saturate.

    Raises:
        ValueError: unless every code decodes to a finite value and the rounding below ``lo``
            works in float64: ``2.2e-308 <= lo < hi``, ``hi / lo`` finite with a 126th root above 1,
            ``hi * 2r / (1 + r)`` finite (so ``hi`` up to about ``DBL_MAX / 2``), and
            ``lo**2 * 2 / (1 + r)`` a normal float64 (so ``lo`` from about ``1.5e-154``).
    """

    lo: float = 1e-3
    hi: float = 1e2
    # Per-device tables (see _tables): derived data, not part of the value.
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lo, hi = self.lo, self.hi
        if (isinstance(lo, bool) or isinstance(hi, bool) or not isinstance(lo, numbers.Real)
                or not isinstance(hi, numbers.Real)):
            raise ValueError(f"lo and hi must be real numbers, got lo={lo!r}, hi={hi!r}")
        if not (_SMALLEST_NORMAL <= lo < hi < math.inf):
            raise ValueError(f"need {_SMALLEST_NORMAL!r} (the smallest normal float64) <= lo < hi < inf, "
                             f"got lo={lo}, hi={hi}")
        # The codes are multiples of log(r): r must be a finite float64 above 1 (hi / lo finite, and
        # far enough from 1 that its 126th root does not round to 1).
        if not math.isfinite(hi / lo) or not 1.0 < self.ratio < math.inf:
            raise ValueError(f"hi / lo must be a finite float64 whose 126th root exceeds 1, got lo={lo}, hi={hi} "
                             f"(hi / lo = {hi / lo})")
        # The largest code decodes to about hi * 2r / (1 + r), up to twice hi.
        if not bool(torch.isfinite(self.decode_magnitude(torch.arange(_CODES + 1))).all()):
            raise ValueError(f"hi={hi} is too large: the largest code would decode to infinity "
                             f"(hi * 2r / (1 + r) must stay finite, r = {self.ratio})")
        # Below lo the rounding compares |g|^2 with this bound: a subnormal bound (or 0) would round
        # every tiny magnitude to the first code instead of to zero.
        if not self._below_bound >= _SMALLEST_NORMAL:
            raise ValueError(f"lo={lo} is too small for hi={hi}: lo**2 * 2 / (1 + r) must be a normal float64 "
                             f"(about lo >= 1.5e-154 * sqrt((1 + r) / 2)), r = {self.ratio}")

    @property
    def ratio(self) -> float:
        return (self.hi / self.lo) ** (1.0 / (_CODES - 1))

    def relative_error_bound(self) -> float:
        """Largest ``|decode(encode(g)) / g - 1|`` for ``lo <= |g| <= hi``."""
        r = self.ratio
        return (r - 1) / (r + 1)

    def encode(self, g: torch.Tensor) -> torch.Tensor:
        """uint8 codes of ``g`` on its device (NaN and +-Inf encode as :data:`NONFINITE_CODE`).

        Equal, code for code, to :meth:`encode_reference` on every device. Only torch ops on
        ``g``'s device: nothing waits for the device except the first call on a new device,
        which copies the codec's tables there.
        """
        g = g.double()
        thresholds, _ = self._tables(g.device)
        mag = g.abs()
        # Code m >= 1 for |g| >= lo: one more than the number of step-up points at or below |g|.
        m = torch.searchsorted(thresholds, mag.reshape(-1), right=True).reshape(mag.shape) + 1
        m = torch.where(torch.isnan(mag), _CODES, m)
        # Below lo: round to zero or to code 1, whichever is closer in relative terms.
        m = torch.where(mag < self.lo, (mag * mag >= self._below_bound).long(), m)
        m = torch.where(mag == 0, 0, m)
        sign = (torch.signbit(g) & (m > 0)).to(torch.uint8) << 7
        return torch.where(torch.isfinite(g), sign | m.to(torch.uint8), NONFINITE_CODE)

    def encode_reference(self, g: torch.Tensor) -> torch.Tensor:
        """The definition of the codes, in float64 on the CPU (the result is a CPU tensor)."""
        g = g.detach().double().cpu()
        log_r = math.log(self.ratio)
        mag = g.abs()
        # Interval m covers [lo r^(m-1), lo r^m): m = floor(log(|g|/lo)/log r) + 1.
        m = torch.floor(torch.log(mag / self.lo) / log_r) + 1
        m = torch.nan_to_num(m, nan=_CODES, posinf=_CODES, neginf=0).clamp_(0, _CODES)
        below = mag < self.lo
        m = torch.where(below, torch.where(mag * mag >= self._below_bound, 1.0, 0.0), m)
        m = torch.where(mag == 0, torch.zeros_like(m), m)
        sign = (torch.signbit(g) & (m > 0)).to(torch.uint8) << 7
        return torch.where(torch.isfinite(g), sign | m.to(torch.uint8), NONFINITE_CODE)

    @property
    def _below_bound(self) -> float:
        # |g| < lo rounds to code 1 when |g|^2 >= (first decoded magnitude) * (lo / r), else to 0.
        first = self.lo * 1.0 * (2 * self.ratio / (1 + self.ratio))
        return first * self.lo / self.ratio

    def decode_magnitude(self, m: torch.Tensor) -> torch.Tensor:
        """The magnitude of code ``m`` (0 .. 127), computed in float64 (the definition)."""
        r = self.ratio
        value = self.lo * torch.pow(torch.as_tensor(r, dtype=torch.float64), m.double() - 1) * (2 * r / (1 + r))
        return torch.where(m == 0, torch.zeros_like(value), value)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """float64 values of uint8 ``codes``, on their device (a table lookup: the same values everywhere)."""
        if codes.dtype != torch.uint8:
            raise ValueError(f"codes must be uint8, got {codes.dtype}")
        _, magnitudes = self._tables(codes.device)
        value = torch.take(magnitudes, (codes & 0x7F).long())
        value = torch.where((codes & 0x80) != 0, -value, value)
        return torch.where(codes == NONFINITE_CODE, math.nan, value)

    # -- tables ------------------------------------------------------------------------
    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(step-up points [126], decoded magnitudes [128]) as float64 tensors on ``device``, cached."""
        key = str(device)
        tables = self._cache.get(key)
        if tables is None:
            cpu = self._cache.get("cpu")
            if cpu is None:
                cpu = (self._step_up_points(), self.decode_magnitude(torch.arange(_CODES + 1)))
                self._cache["cpu"] = cpu
            tables = tuple(t.to(device) for t in cpu)
            self._cache[key] = tables
        return tables

    def _step_up_points(self) -> torch.Tensor:
        """For k = 2 .. 127, the smallest float64 x >= lo whose reference code is >= k.

        The reference code is non-decreasing in |g| (log, division and floor are), so a
        bisection over the bit patterns of positive doubles (ordered as their values) finds
        each point exactly.
        """
        targets = torch.arange(2, _CODES + 1, dtype=torch.int64)
        lo_bits = torch.tensor([self.lo], dtype=torch.float64).view(torch.int64)
        low = lo_bits.expand(targets.shape).clone()          # code(low) < k
        high = torch.tensor([math.inf], dtype=torch.float64).view(torch.int64).expand(targets.shape).clone()
        while bool((high - low > 1).any()):
            mid = low + (high - low) // 2
            reached = (self.encode_reference(mid.view(torch.float64)) & 0x7F).long() >= targets
            high = torch.where(reached, mid, high)
            low = torch.where(reached, low, mid)
        return high.view(torch.float64)

    def __getstate__(self) -> dict[str, Any]:
        return {"lo": self.lo, "hi": self.hi}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "lo", state["lo"])
        object.__setattr__(self, "hi", state["hi"])
        object.__setattr__(self, "_cache", {})
