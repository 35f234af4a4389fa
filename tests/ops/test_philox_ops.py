"""Philox variates and the ops built on them (CPU): philox_normal / philox_rademacher,
philox_axpy_, philox_perturbed_copy, philox_dot, and their K-direction forms
philox_axpy_multi_ and philox_dot_multi.

The variates are checked bit for bit against an independent numpy float32
implementation of the formulas in csrc/include/pycomm/philox_variates.h (numpy's
float32 arithmetic is IEEE-754 with one rounding per operation, as the kernels'),
and the dot product against a numpy float64 sum in the stated order. Statistical
tests use fixed seeds, so they are deterministic; their tolerances are about 5
standard errors of the statistic.
"""

import math

import numpy as np
import pytest
import torch

import pycomm
from pycomm import ops
from quant_reference import philox4x32_10

Q = torch.ops.pycomm
STREAM_GAUSSIAN = 0x47415553
STREAM_RADEMACHER = 0x52414445
F32 = np.float32
SEEDS = [0, 1, -7, 2**40 + 3, 2**63 + 11]


# ---- numpy reference of philox_variates.h ------------------------------------------

def _blocks(seed: int, stream: int, first: int, count: int) -> np.ndarray:
    seed &= 2**64 - 1
    idx = np.arange(first, first + count, dtype=np.uint64)
    counter = np.stack([idx & np.uint64(0xFFFFFFFF), idx >> np.uint64(32),
                        np.full(count, stream, dtype=np.uint64), np.zeros(count, dtype=np.uint64)], axis=1)
    return philox4x32_10(counter.astype(np.uint32), seed & 0xFFFFFFFF, seed >> 32)


def _minus_two_log(u: np.ndarray) -> np.ndarray:
    ix = u.view(np.uint32) + np.uint32(0x3F800000 - 0x3F3504F3)
    k = (ix >> np.uint32(23)).astype(np.int32) - np.int32(127)
    ix = (ix & np.uint32(0x007FFFFF)) + np.uint32(0x3F3504F3)
    f = ix.view(np.float32) - F32(1.0)
    s = f / (F32(2.0) + f)
    z = s * s
    p = F32(0.2857142857142857) + z * F32(0.2222222222222222)
    p = F32(0.4) + z * p
    p = F32(0.6666666666666666) + z * p
    ln1p = F32(2.0) * s + (s * z) * p
    kf = k.astype(np.float32)
    ln = kf * F32(0.693145751953125) + (kf * F32(1.428606765330187e-06) + ln1p)
    return F32(-2.0) * ln + F32(0.0)


def _sqrt_newton(a: np.ndarray) -> np.ndarray:
    half = F32(0.5) * a
    y = (np.uint32(0x5F3759DF) - (a.view(np.uint32) >> np.uint32(1))).view(np.float32)
    for _ in range(3):
        y = y * (F32(1.5) - (half * y) * y)
    return a * y


def _cos_sin(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = w >> np.uint32(8)
    qq = (v + np.uint32(0x200000)) >> np.uint32(22)
    d = v.astype(np.int32) - (qq << np.uint32(22)).astype(np.int32)
    q = qq & np.uint32(3)
    x = d.astype(np.float32) * F32(6.28318530717958647692 / 16777216.0)
    x2 = x * x
    ps = F32(-1.984126984126984e-04) + x2 * F32(2.755731922398589e-06)
    ps = F32(8.333333333333333e-03) + x2 * ps
    ps = F32(-0.16666666666666666) + x2 * ps
    sn = x + (x * x2) * ps
    pc = F32(2.48015873015873e-05) + x2 * F32(-2.755731922398589e-07)
    pc = F32(-1.388888888888889e-03) + x2 * pc
    pc = F32(4.1666666666666664e-02) + x2 * pc
    pc = F32(-0.5) + x2 * pc
    cn = F32(1.0) + x2 * pc
    swap = (q & np.uint32(1)) == 1
    c = np.where(swap, sn, cn).view(np.uint32) ^ (((q + np.uint32(1)) & np.uint32(2)) << np.uint32(30))
    s = np.where(swap, cn, sn).view(np.uint32) ^ ((q & np.uint32(2)) << np.uint32(30))
    return c.view(np.float32), s.view(np.float32)


def _box_muller(wr: np.ndarray, wa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u = ((wr >> np.uint32(1)).astype(np.int32).astype(np.float32) + F32(0.5)) * F32(2.0**-31)
    r = _sqrt_newton(_minus_two_log(u))
    c, s = _cos_sin(wa)
    return r * c, r * s


def gaussian_reference(n: int, seed: int, offset: int = 0) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    b0, b1 = offset // 4, (offset + n - 1) // 4 + 1
    w = _blocks(seed, STREAM_GAUSSIAN, b0, b1 - b0)
    c01, s01 = _box_muller(w[:, 0], w[:, 1])
    c23, s23 = _box_muller(w[:, 2], w[:, 3])
    z = np.stack([c01, s01, c23, s23], axis=1).reshape(-1)
    return z[offset - 4 * b0: offset - 4 * b0 + n]


def rademacher_reference(n: int, seed: int, offset: int = 0) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    b0, b1 = offset // 128, (offset + n - 1) // 128 + 1
    w = _blocks(seed, STREAM_RADEMACHER, b0, b1 - b0)  # [B, 4]
    bits = (w[:, :, None] >> np.arange(32, dtype=np.uint32)[None, None, :]) & np.uint32(1)
    z = np.where(bits.reshape(-1) == 1, F32(-1.0), F32(1.0))
    return z[offset - 128 * b0: offset - 128 * b0 + n]


def _tree(v: np.ndarray) -> np.ndarray:
    """Halving tree over the last axis (32 lanes): v[l] = v[l] + v[l + m] for m = 16 .. 1."""
    v = v.copy()
    m = 16
    while m:
        v[..., :m] = v[..., :m] + v[..., m:2 * m]
        m //= 2
    return v[..., 0]


def dot_reference(values: np.ndarray, z: np.ndarray, offset: int) -> float:
    """<values, z> (float32 arrays) summed in the order stated in philox_variates.h."""
    n = values.size
    if n == 0:
        return 0.0
    c0, c1 = offset // 4096, (offset + n - 1) // 4096 + 1
    prods = np.zeros((c1 - c0) * 4096, dtype=np.float64)
    prods[offset - 4096 * c0: offset - 4096 * c0 + n] = values.astype(np.float64) * z.astype(np.float64)
    # [chunk, step, lane, j] -> [chunk, lane, step * 4 + j]: each lane's products in index order.
    per_lane = prods.reshape(c1 - c0, 32, 32, 4).transpose(0, 2, 1, 3).reshape(c1 - c0, 32, 128)
    partials = _tree(np.cumsum(per_lane, axis=2)[:, :, -1])  # cumsum: strictly sequential
    padded = np.zeros(-(-partials.size // 32) * 32)
    padded[:partials.size] = partials
    lanes = np.cumsum(padded.reshape(-1, 32), axis=0)[-1]
    return float(_tree(lanes))


def bits(t: torch.Tensor) -> torch.Tensor:
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype]
    return t.contiguous().view(view)


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    if not torch.equal(bits(a), bits(b)):
        bad = (bits(a) != bits(b)).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(f"{bad.shape[0]} elements differ, first at {i}: {a[i].item()!r} vs {b[i].item()!r}")


def params(sizes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in sizes]


# ---- variates: exact definition, purity, independence of threads / ISA ---------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", [0, 1, 6, 4096 * 3 + 5, 2**34 + 3])
def test_gaussian_matches_reference(seed, offset):
    n = 10_007
    z = ops.philox_normal(n, seed, offset)
    assert z.dtype == torch.float32 and z.shape == (n,)
    assert_bitwise(z, torch.from_numpy(gaussian_reference(n, seed, offset)))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", [0, 3, 127, 129, 2**34 + 3])
def test_rademacher_matches_reference(seed, offset):
    n = 5_003
    z = ops.philox_rademacher(n, seed, offset)
    assert_bitwise(z, torch.from_numpy(rademacher_reference(n, seed, offset)))


def test_variates_are_a_pure_function_of_seed_and_index():
    long = ops.philox_normal(20_000, 9)
    for offset, n in [(0, 1), (1, 3), (5, 700), (4093, 4099), (12_345, 7_655)]:
        assert_bitwise(ops.philox_normal(n, 9, offset), long[offset:offset + n])
    r = ops.philox_rademacher(20_000, 9)
    for offset, n in [(1, 3), (127, 2), (130, 9_000)]:
        assert_bitwise(ops.philox_rademacher(n, 9, offset), r[offset:offset + n])
    assert ops.philox_normal(0, 9).shape == (0,)
    # A 64-bit seed and its int64 spelling are the same key.
    assert_bitwise(ops.philox_normal(100, 2**64 - 1), ops.philox_normal(100, -1))
    assert not torch.equal(ops.philox_normal(100, 1), ops.philox_normal(100, 2))


def test_streams_are_independent():
    n = 200_000
    g = ops.philox_normal(n, 3).double()
    r = ops.philox_rademacher(n, 3).double()
    assert abs((torch.sign(g) * r).mean().item()) < 5 / math.sqrt(n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_variates_low_precision_are_rounded_float32(dtype):
    z = ops.philox_normal(9_999, 4, 17, dtype=dtype)
    assert z.dtype == dtype
    assert_bitwise(z, ops.philox_normal(9_999, 4, 17).to(dtype))
    assert_bitwise(ops.philox_rademacher(999, 4, dtype=dtype), ops.philox_rademacher(999, 4).to(dtype))


def test_independent_of_thread_count():
    xs = params([70_001, 3, 40_000])
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ys = [x.clone() for x in xs]
            ops.philox_axpy_(ys, 5, 0.25, offset=11)
            results.append((ops.philox_normal(300_001, 5, 2), ys, ops.philox_dot(xs, 5, offset=11)))
    finally:
        torch.set_num_threads(before)
    (z1, y1, d1), (z2, y2, d2) = results
    assert_bitwise(z1, z2)
    for a, b in zip(y1, y2):
        assert_bitwise(a, b)
    assert d1 == d2


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_cpu_vector_widths_agree(isa, monkeypatch):
    # The Gaussian tile is compiled for several x86 vector widths (chosen at run time,
    # forced here; a level the CPU lacks falls back to a narrower one).
    expected = torch.from_numpy(gaussian_reference(50_003, 12, 9))
    monkeypatch.setenv("PYCOMM_PHILOX_CPU_ISA", isa)
    assert_bitwise(ops.philox_normal(50_003, 12, 9), expected)


# ---- statistics ------------------------------------------------------------------------

def test_gaussian_moments_and_tails():
    n = 1_000_000
    z = ops.philox_normal(n, 2024).double()
    se = 1 / math.sqrt(n)
    mean = z.mean().item()
    c = z - mean
    var = (c ** 2).mean().item()
    skew = (c ** 3).mean().item() / var ** 1.5
    kurt = (c ** 4).mean().item() / var ** 2
    assert abs(mean) < 5 * se                          # sd of the mean: 1/sqrt(n)
    assert abs(var - 1) < 5 * math.sqrt(2) * se        # sd of the variance: sqrt(2/n)
    assert abs(skew) < 5 * math.sqrt(6) * se           # sd of the skewness: sqrt(6/n)
    assert abs(kurt - 3) < 5 * math.sqrt(24) * se      # sd of the kurtosis: sqrt(24/n)
    # Kolmogorov-Smirnov distance to the normal CDF (1% critical value 1.63/sqrt(n)).
    s, _ = torch.sort(z)
    cdf = torch.special.ndtr(s)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks < 1.63 * se
    # Tail frequencies within 5 binomial standard deviations, up to 5 sigma.
    for k in (1, 2, 3, 4, 5):
        p = math.erfc(k / math.sqrt(2))
        count = (z.abs() > k).sum().item()
        assert abs(count - n * p) < 5 * math.sqrt(n * p * (1 - p)) + 1, (k, count, n * p)
    # |z| <= sqrt(-2 ln 2^-32) = 6.66 by construction.
    assert z.abs().max().item() <= math.sqrt(64 * math.log(2)) + 1e-5


def test_gaussian_extreme_tail_is_reachable():
    # The smallest uniform is 2^-32: the largest radius 6.66 (words with w >> 1 == 0).
    u = np.array([0, 1, 0xFFFFFFFF], dtype=np.uint32)
    zc, zs = _box_muller(u, np.zeros(3, dtype=np.uint32))
    assert abs(float(zc[0]) - math.sqrt(64 * math.log(2))) < 1e-5
    assert float(zc[2]) == 0.0 and zs[2] == 0.0  # u = 1: radius exactly 0


def test_rademacher_exact_and_balanced():
    n = 1_000_000
    r = ops.philox_rademacher(n, 77)
    assert torch.all((r == 1) | (r == -1))
    plus = (r == 1).sum().item()
    assert abs(plus - n / 2) < 5 * math.sqrt(n) / 2
    # Neighbouring signs are uncorrelated (bits of one word, and across words).
    for lag in (1, 31, 32, 128):
        assert abs((r[lag:] * r[:-lag]).mean().item()) < 5 / math.sqrt(n)


# ---- axpy / perturbed copy ----------------------------------------------------------------

@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_axpy_equals_t_plus_alpha_z(distribution):
    sizes = [1000, 1, 0, 4097, 33]
    xs = params(sizes, seed=1)
    total = sum(sizes)
    alpha = -1.2345e-3
    ys = [x.clone() for x in xs]
    ops.philox_axpy_(ys, 42, alpha, distribution, offset=5)
    make = ops.philox_normal if distribution == "gaussian" else ops.philox_rademacher
    z = make(total, 42, 5)
    ref = torch.cat(xs) + torch.tensor(alpha, dtype=torch.float32) * z  # mul, then add: two roundings
    assert_bitwise(torch.cat(ys), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_axpy_low_precision(dtype):
    xs = params([513, 2000], seed=2, dtype=dtype)
    ys = [x.clone() for x in xs]
    ops.philox_axpy_(ys, 3, 0.5)
    z = ops.philox_normal(2513, 3)
    ref = (torch.cat(xs).float() + torch.tensor(0.5, dtype=torch.float32) * z).to(dtype)
    assert all(y.dtype == dtype for y in ys)
    assert_bitwise(torch.cat(ys), ref)


def test_axpy_mixed_dtypes_in_one_list():
    xs = [params([100], 1)[0], params([57], 2, torch.float16)[0], params([300], 3, torch.bfloat16)[0]]
    ys = [x.clone() for x in xs]
    ops.philox_axpy_(ys, 8, 2.0)
    z = ops.philox_normal(457, 8)
    start = 0
    for x, y in zip(xs, ys):
        ref = (x.float() + torch.tensor(2.0) * z[start:start + x.numel()]).to(x.dtype)
        assert_bitwise(y, ref)
        start += x.numel()


def test_independent_of_tensor_split():
    sizes = [1, 2, 3, 4093, 0, 7, 128, 20_000, 5, 4096, 11]
    xs = params(sizes, seed=4)
    flat = torch.cat(xs)
    for distribution in ("gaussian", "rademacher"):
        ys, f = [x.clone() for x in xs], flat.clone()
        ops.philox_axpy_(ys, 6, 0.75, distribution, offset=4090)
        ops.philox_axpy_(f, 6, 0.75, distribution, offset=4090)
        assert_bitwise(torch.cat(ys), f)
        copies = ops.philox_perturbed_copy(xs, 6, 0.75, distribution, offset=4090)
        assert_bitwise(torch.cat(copies), f)
        assert ops.philox_dot(xs, 6, distribution, 4090) == ops.philox_dot(flat, 6, distribution, 4090)
    # Many tiny tensors (more than one CUDA batch of 48) against one.
    tiny = params([3] * 200 + [1] * 100, seed=5)
    cat = torch.cat(tiny)
    assert ops.philox_dot(tiny, 1, offset=4000) == ops.philox_dot(cat, 1, offset=4000)


def test_perturbation_round_trip_is_close_not_exact():
    # SPSA: +eps z, -2 eps z, +eps z returns near, not exactly, to the start.
    x = params([100_000], seed=6)[0]
    y = x.clone()
    for a in (1e-3, -2e-3, 1e-3):
        ops.philox_axpy_(y, 10, a)
    assert torch.allclose(x, y, rtol=0, atol=1e-6)


def test_perturbed_copy():
    xs = params([64, 30], seed=7)
    before = [x.clone() for x in xs]
    out = ops.philox_perturbed_copy(xs, 21, 1e-2, offset=3)
    for x, b in zip(xs, before):
        assert_bitwise(x, b)  # inputs untouched
    ys = [x.clone() for x in xs]
    ops.philox_axpy_(ys, 21, 1e-2, offset=3)
    for o, y in zip(out, ys):
        assert o.shape == y.shape and o.is_contiguous()
        assert_bitwise(o, y)
    # Non-contiguous inputs are numbered in row-major order.
    m = params([12 * 10], seed=8)[0].reshape(12, 10)
    (o,) = ops.philox_perturbed_copy([m.t()], 2, 0.5)
    assert_bitwise(o, ops.philox_perturbed_copy([m.t().contiguous()], 2, 0.5)[0])
    assert ops.philox_perturbed_copy([], 1, 1.0) == []


# ---- dot -----------------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0, 3, 4095, 4096 * 7 + 100])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_dot_matches_stated_order(offset, distribution):
    sizes = [5000, 17, 0, 130_001]
    xs = params(sizes, seed=9)
    total = sum(sizes)
    d = ops.philox_dot(xs, 31, distribution, offset)
    make = ops.philox_normal if distribution == "gaussian" else ops.philox_rademacher
    z = make(total, 31, offset)
    t = torch.cat(xs)
    assert d == dot_reference(t.numpy(), z.numpy(), offset)  # bitwise
    plain = (t.double() * z.double()).sum().item()
    assert math.isclose(d, plain, rel_tol=1e-12, abs_tol=1e-9)
    assert Q.philox_dot(xs, 31, ops.PHILOX_DISTRIBUTIONS[distribution], offset).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dot_low_precision(dtype):
    xs = params([4000, 9000], seed=10, dtype=dtype)
    z = ops.philox_normal(13_000, 2, 1)
    t = torch.cat(xs).float()
    assert ops.philox_dot(xs, 2, offset=1) == dot_reference(t.numpy(), z.numpy(), 1)


def test_dot_spsa_identity():
    # E[<g, z> z] = g: the SPSA estimate of a linear loss recovers the gradient on average.
    g = params([2000], seed=11)[0]
    est = torch.zeros(2000, dtype=torch.float64)
    steps = 400
    for s in range(steps):
        proj = ops.philox_dot([g], s)
        est += proj * ops.philox_normal(2000, s).double()
    cos = torch.nn.functional.cosine_similarity(est, g.double(), dim=0).item()
    assert cos > 0.3  # about sqrt(steps / (steps + 2000)) = 0.41 for Gaussian z


def test_empty_inputs():
    assert ops.philox_dot([], 1) == 0.0
    assert ops.philox_dot([torch.empty(0)], 1) == 0.0
    ops.philox_axpy_([], 1, 1.0)
    ops.philox_axpy_([torch.empty(0)], 1, 1.0)


# ---- K directions in one pass: philox_axpy_multi_, philox_dot_multi ------------------------

MULTI_SEEDS = [3, -9, 2**63 + 1, 77, 0, 12345]


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float16,), (torch.bfloat16,),
                                    (torch.float32, torch.bfloat16, torch.float16)])
def test_axpy_multi_equals_successive_axpy(distribution, dtypes):
    sizes = [1000, 1, 0, 4097, 33, 130]
    xs = [params([n], seed=20 + i, dtype=dtypes[i % len(dtypes)])[0] for i, n in enumerate(sizes)]
    alphas = torch.tensor([1.5e-3, -0.25, 0.0, 2.0, -1e-7, 0.75], dtype=torch.float64)
    multi = [x.clone() for x in xs]
    ops.philox_axpy_multi_(multi, MULTI_SEEDS, alphas, distribution, offset=7)
    single = [x.clone() for x in xs]
    for seed, alpha in zip(MULTI_SEEDS, alphas.tolist()):
        ops.philox_axpy_(single, seed, alpha, distribution, offset=7)
    for m, s in zip(multi, single):
        assert_bitwise(m, s)
    if dtypes == (torch.float32,):
        # Against float64: t + Σ_k alpha_k z_k, up to float32 rounding of each of the K steps.
        make = ops.philox_normal if distribution == "gaussian" else ops.philox_rademacher
        total = sum(sizes)
        ref = torch.cat(xs).double()
        for seed, alpha in zip(MULTI_SEEDS, alphas.tolist()):
            ref += alpha * make(total, seed, 7).double()
        assert torch.allclose(torch.cat(multi).double(), ref, rtol=1e-6, atol=1e-6)
        assert not torch.equal(torch.cat(multi), torch.cat(xs))


def test_axpy_multi_alpha_forms():
    x = params([5000], seed=21)[0]
    seeds = [4, 5, 6]
    ref = x.clone()
    for seed, alpha in zip(seeds, [0.5, -1e-3, 3.0]):
        ops.philox_axpy_(ref, seed, alpha)
    for alphas in ([0.5, -1e-3, 3.0], (0.5, -1e-3, 3), torch.tensor([0.5, -1e-3, 3.0]),
                   torch.tensor([0.5, -1e-3, 3.0], dtype=torch.float64)):
        y = x.clone()
        ops.philox_axpy_multi_(y, seeds, alphas)
        assert_bitwise(y, ref)
    # A one-element tensor alpha in philox_axpy_ is the float alpha.
    for alpha in (torch.tensor(-0.3, dtype=torch.float64), torch.tensor([-0.3])):
        a, b = x.clone(), x.clone()
        ops.philox_axpy_(a, 9, alpha, "rademacher", 3)
        ops.philox_axpy_(b, 9, -0.3, "rademacher", 3)
        assert_bitwise(a, b)
    # More directions than one CUDA launch takes (32).
    seeds = list(range(100, 140))
    alphas = torch.linspace(-1, 1, 40, dtype=torch.float64)
    a, b = x.clone(), x.clone()
    ops.philox_axpy_multi_(a, seeds, alphas)
    for seed, alpha in zip(seeds, alphas.tolist()):
        ops.philox_axpy_(b, seed, alpha)
    assert_bitwise(a, b)


def test_zero_alpha_leaves_tensors_untouched():
    x = torch.tensor([-0.0, 0.0, 1.0, float("nan"), float("-inf"), -2.5] * 50)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = x.to(dtype)
        a = t.clone()
        ops.philox_axpy_(a, 1, 0.0)
        ops.philox_axpy_(a, 1, 1e-60)  # rounds to 0 in float32
        ops.philox_axpy_multi_(a, [1, 2, 3], torch.zeros(3, dtype=torch.float64))
        assert_bitwise(a, t)  # -0 stays -0, NaN bits kept
        (c,) = ops.philox_perturbed_copy([t], 1, 0.0)
        assert_bitwise(c, t)
    # A zero among other directions is skipped, as if absent.
    y = params([300], seed=22)[0]
    a, b = y.clone(), y.clone()
    ops.philox_axpy_multi_(a, [1, 2, 3], [0.5, 0.0, -0.5])
    ops.philox_axpy_multi_(b, [1, 3], [0.5, -0.5])
    assert_bitwise(a, b)


@pytest.mark.parametrize("offset", [0, 3, 4095, 4096 * 7 + 100])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_dot_multi_equals_dot(offset, distribution):
    sizes = [5000, 17, 0, 130_001]
    xs = params(sizes, seed=23)
    d = ops.philox_dot_multi(xs, MULTI_SEEDS, distribution, offset)
    assert d.dtype == torch.float64 and d.shape == (len(MULTI_SEEDS),) and d.device.type == "cpu"
    make = ops.philox_normal if distribution == "gaussian" else ops.philox_rademacher
    t = torch.cat(xs)
    for k, seed in enumerate(MULTI_SEEDS):
        assert d[k].item() == ops.philox_dot(xs, seed, distribution, offset)  # bitwise
        z = make(t.numel(), seed, offset)
        assert d[k].item() == dot_reference(t.numpy(), z.numpy(), offset)
        assert math.isclose(d[k].item(), (t.double() * z.double()).sum().item(), rel_tol=1e-12, abs_tol=1e-9)


def test_dot_multi_mixed_dtypes_split_and_edges():
    xs = [params([100], 1)[0], params([4000], 2, torch.float16)[0], params([3000], 3, torch.bfloat16)[0]]
    seeds = list(range(40))  # more than one CUDA launch group (32)
    d = ops.philox_dot_multi(xs, seeds, offset=4090)
    flat = torch.cat([x.float() for x in xs])
    assert torch.equal(d, ops.philox_dot_multi(flat, seeds, offset=4090))
    assert [ops.philox_dot(xs, s, offset=4090) for s in seeds] == d.tolist()
    assert torch.equal(ops.philox_dot_multi(xs, []), torch.zeros(0, dtype=torch.float64))
    assert torch.equal(ops.philox_dot_multi([], [1, 2]), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(ops.philox_dot_multi([torch.empty(0)], [1, 2]), torch.zeros(2, dtype=torch.float64))
    ops.philox_axpy_multi_([], [1], [1.0])
    ops.philox_axpy_multi_([torch.empty(0)], [1], [1.0])


def test_multi_ops_bad_arguments():
    x = torch.zeros(10)
    with pytest.raises(ValueError, match="one alpha per seed"):
        ops.philox_axpy_multi_(x, [1, 2], [1.0])
    with pytest.raises(ValueError, match="float32 or float64"):
        ops.philox_axpy_multi_(x, [1], torch.ones(1, dtype=torch.float16))
    with pytest.raises(ValueError, match="one alpha per seed"):
        ops.philox_axpy_multi_(x, [1, 2], torch.ones(1, 2))
    with pytest.raises(ValueError, match="one alpha per seed"):
        ops.philox_axpy_(x, 1, torch.ones(2))
    with pytest.raises(ValueError, match="alphas"):
        ops.philox_axpy_multi_(x, [1], torch.ones(1, device="meta"))
    with pytest.raises(ValueError, match="seeds"):
        ops.philox_dot_multi(x, 5)
    with pytest.raises(ValueError, match="seed"):
        ops.philox_dot_multi(x, [1.5])
    with pytest.raises(ValueError, match="real number"):
        ops.philox_axpy_multi_(x, [1], ["a"])
    with pytest.raises(RuntimeError, match="one alpha per seed"):
        Q.philox_axpy_multi_([x], [1, 2], torch.ones(3), 0, 0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        Q.philox_axpy_multi_([x], [1], torch.ones(1, dtype=torch.int32), 0, 0)
    with pytest.raises(RuntimeError, match="overlap"):
        Q.philox_axpy_multi_([x[:6], x[4:]], [1], torch.ones(1), 0, 0)
    with pytest.raises(RuntimeError, match="distribution"):
        Q.philox_dot_multi([x], [1], 5, 0)


# ---- bad inputs -----------------------------------------------------------------------------

def test_bad_arguments_raise():
    x = torch.zeros(10)
    with pytest.raises(ValueError):
        ops.philox_normal(-1, 0)
    with pytest.raises(ValueError):
        ops.philox_normal(10, 0, offset=-1)
    with pytest.raises(ValueError):
        ops.philox_normal(10, 0, dtype=torch.float64)
    with pytest.raises(ValueError):
        ops.philox_normal(10, 2**64)
    with pytest.raises(ValueError):
        ops.philox_normal(10, 1.5)
    with pytest.raises(ValueError):
        ops.philox_normal(10, 0, offset=2**63 - 5)
    with pytest.raises(ValueError):
        ops.philox_axpy_([x], 0, 1.0, distribution="uniform")
    with pytest.raises(ValueError):
        ops.philox_axpy_([x.double()], 0, 1.0)
    with pytest.raises(ValueError):
        ops.philox_axpy_([torch.zeros(10, dtype=torch.int32)], 0, 1.0)
    with pytest.raises(ValueError):
        ops.philox_axpy_([torch.zeros(4, 4).t()], 0, 1.0)  # not contiguous
    with pytest.raises(ValueError):
        ops.philox_axpy_([x, x], 0, 1.0)  # the same memory twice
    with pytest.raises(ValueError):
        ops.philox_axpy_([x, torch.zeros(3, device="meta")], 0, 1.0)  # two devices
    with pytest.raises(ValueError):
        ops.philox_axpy_([x], 0, "1.0")
    with pytest.raises(ValueError):
        ops.philox_dot([x, "y"], 0)
    with pytest.raises(ValueError):
        ops.philox_dot(x, 0, offset=-3)
    with pytest.raises(ValueError):
        ops.philox_perturbed_copy([x], 0, 1.0, "normal")


def test_bad_arguments_raise_in_the_ops():
    x = torch.zeros(10)
    with pytest.raises(RuntimeError, match="distribution"):
        Q.philox_axpy_([x], 0, 1.0, 2, 0)
    with pytest.raises(RuntimeError, match="offset"):
        Q.philox_dot([x], 0, 0, -1)
    with pytest.raises(RuntimeError, match="contiguous"):
        Q.philox_axpy_([torch.zeros(4, 4).t()], 0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="overlap"):
        Q.philox_axpy_([x[:6], x[4:]], 0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        Q.philox_dot([x.double()], 0, 0, 0)
    with pytest.raises(RuntimeError, match="2\\^63"):
        Q.philox_variates(x, 10, 0, 2**63 - 5, 0)


# ---- torch.compile / fake tensors --------------------------------------------------------

def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        xs = [torch.empty(3, 4), torch.empty(5, dtype=torch.bfloat16)]
        assert Q.philox_variates(torch.empty(0, dtype=torch.float16), 9, 0, 0, 0).shape == (9,)
        outs = Q.philox_perturbed_copy(xs, 0, 1.0, 0, 0)
        assert [o.shape for o in outs] == [(3, 4), (5,)] and outs[1].dtype == torch.bfloat16
        assert Q.philox_dot(xs, 0, 0, 0).dtype == torch.float64
        d = Q.philox_dot_multi(xs, [1, 2, 3], 0, 0)
        assert d.dtype == torch.float64 and d.shape == (3,)


def test_axpy_and_autograd():
    p = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match="no_grad"):
        ops.philox_axpy_([p], 1, 1e-3)
    with torch.no_grad():
        version = p._version
        ops.philox_axpy_([p], 1, 1e-3)
    assert p._version > version  # autograd sees the in-place update
    x = torch.randn(10, requires_grad=True)
    y = torch.sigmoid(x)  # saves its output for backward
    ops.philox_axpy_([y], 1, 1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    with torch.inference_mode():
        ops.philox_axpy_(torch.zeros(5), 1, 1.0)
