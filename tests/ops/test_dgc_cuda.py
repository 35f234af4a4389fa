"""CUDA DGC ops against the CPU ops: identical selections, state updates and sums.

The CPU kernels (csrc/cpu/dgc_cpu.cpp) are the reference. topk_magnitude must select the same
set in the same layout (values bit for bit, indices, index dtype), dgc_compensate must update u
and v bit for bit, dgc_mask must zero the same elements and densify must produce the same float32
sums, duplicates included. Float outputs are compared bit for bit (so -0.0 != +0.0); only where
both sides are NaN may the NaN bits differ. An index out of range must raise the CPU's error and
write nothing. Runs only on a machine with a GPU and a CUDA build of pycomm.

Clipping: the CUDA op sums each segment's squares in double in a fixed order that differs from
the CPU's, so the double norms may differ in their last bits; the float scale (clip / norm) then
differs only if the quotient lies within that error of a float rounding boundary (odds of about
1e-6 per segment), so u and v are still expected to be bit-identical here.
"""

import itertools

import pytest
import torch

import pycomm  # noqa: F401  (loads the ops)
from pycomm import ops

from cuda_support import REQUIRES_CUDA, assert_identical

pytestmark = REQUIRES_CUDA

Q = torch.ops.pycomm
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 1000, (1 << 20) + 3]
DENSITIES = [1.0, 0.25, 0.01, 0.001]
KINDS = ["random", "ties", "nan"]


# ---- helpers -------------------------------------------------------------------

def make_input(n: int, dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))
    if n and kind == "ties":
        # Few distinct magnitudes: long runs of equal keys, signed zeros, a zero-only stretch.
        x = torch.randint(-3, 4, (n,), generator=g).float() * 0.5
        x[torch.rand(n, generator=g) < 0.2] = -0.0
        x[: n // 4] = 0.0
    elif n and kind == "nan":
        for value, every in [(float("nan"), 500), (float("inf"), 700), (-float("inf"), 900), (-float("nan"), 1100)]:
            x[torch.randint(0, n, (max(1, n // every),), generator=g)] = value
    return x.to(dtype)


def segment_tables(n: int, seed: int):
    """None (one segment), plus layer-like tables with empty segments, gaps, and (for large n)
    segments of exactly one tile, one element more, and a single element."""
    tables = [None]
    if n == 0:
        return tables + [ops.segment_table([(0, 0), (0, 0)]), ops.segment_table([])]
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(set(torch.randint(0, n + 1, (6,), generator=g).tolist() + [0, n]))
    rows = []
    for a, b in zip(cuts, cuts[1:]):
        rows += [(a, b - a), (b, 0)]  # each piece followed by an empty segment
    tables.append(ops.segment_table(rows))
    half = n // 2
    tables.append(ops.segment_table([(0, 0), (0, half), (half + 1, max(0, n - half - 1)), (n, 0)]))  # a gap
    if n > 10_000:
        tables.append(ops.segment_table([(0, 4096), (4096, 4097), (8193, 1), (8194, n - 8194)]))
    return tables


def on_gpu(t):
    return t.cuda() if t is not None else None


def assert_topk_matches_cpu(x, x_g, table, table_g, density, exact, rank, what, host=None):
    """topk_magnitude of x_g (x on the GPU) selects the same indices and values as on the CPU; returns
    the CPU and the GPU (values, indices)."""
    v_c, i_c = Q.topk_magnitude(x, table, density, exact, 0.01, rank)
    v_g, i_g = Q.topk_magnitude(x_g, table_g, density, exact, 0.01, rank, host)
    assert_identical(i_c, i_g, what + " indices")
    assert_identical(v_c, v_g, what + " values")
    return (v_c, i_c), (v_g, i_g)


# ---- topk_magnitude --------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_topk_matches_cpu(n, dtype, kind):
    x = make_input(n, dtype, kind, seed=n + 17)
    x_g = x.cuda()
    for t, table in enumerate(segment_tables(n, seed=n)):
        table_g = on_gpu(table)
        for density, exact in itertools.product(DENSITIES, [True, False]):
            what = f"n={n} {dtype} {kind} table#{t} density={density} exact={exact}"
            _, (v_g, i_g) = assert_topk_matches_cpu(x, x_g, table, table_g, density, exact, 3, what)
            assert v_g.is_cuda and i_g.is_cuda
            assert i_g.dtype == torch.int32


def test_topk_with_host_copy_of_the_table():
    # The DGC hook passes a CPU copy of the table so the op does not wait for the GPU.
    x = make_input(100_003, torch.float32, KINDS[0], seed=5)
    table = ops.segment_table([(0, 40_000), (40_000, 0), (50_000, 50_003)])
    assert_topk_matches_cpu(x, x.cuda(), table, table.cuda(), 0.01, False, 0, "host_segments", host=table)
    with pytest.raises(RuntimeError, match="host_segments"):
        Q.topk_magnitude(x.cuda(), table.cuda(), 0.01, False, 0.01, 0, table[:1].clone())


def test_topk_ties_nan_and_misaligned_input():
    x = torch.ones(70_000)
    x[123] = float("nan")
    x[50_000:] = 2.0
    for density in [0.001, 0.3]:
        v_c, i_c = Q.topk_magnitude(x, None, density, False, 0.01, 0)
        base = torch.empty(x.numel() + 1, device="cuda")
        x_m = base[1:]  # data pointer off the 8-byte alignment
        x_m.copy_(x)
        v_g, i_g = Q.topk_magnitude(x_m, None, density, False, 0.01, 0)
        assert_identical(i_c, i_g, f"ties density={density}")
        assert_identical(v_c, v_g, f"ties density={density}")
        assert i_g[0].item() == 123 or density == 0.3  # NaN ranks first
    _, idx = Q.topk_magnitude(torch.zeros(1000, device="cuda"), None, 0.01, True, 0.01, 0)
    assert idx.tolist() == list(range(10))


def test_topk_is_deterministic_and_overlapping_segments():
    x = make_input(300_000, torch.float32, "ties", seed=4).cuda()
    table = ops.segment_table([(0, 300_000), (1000, 50_000), (299_999, 1), (7, 3)])
    first = Q.topk_magnitude(x, table.cuda(), 0.01, True, 0.01, 0)
    for _ in range(3):
        again = Q.topk_magnitude(x, table.cuda(), 0.01, True, 0.01, 0)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    v_c, i_c = Q.topk_magnitude(x.cpu(), table, 0.01, True, 0.01, 0)
    assert_identical(i_c, first[1], "overlapping segments indices")
    assert_identical(v_c, first[0], "overlapping segments values")


def count_tables(n: int, seed: int):
    """3-column tables over n elements: counts of 0, 1, the whole segment and random ones, empty and
    one-element segments, segments of one tile and one element more (for large n)."""
    g = torch.Generator().manual_seed(seed)
    if n == 0:
        return [ops.segment_table([(0, 0)], counts=[0]), ops.segment_table([], counts=[])]
    cuts = sorted(set(torch.randint(0, n + 1, (6,), generator=g).tolist() + [0, n]))
    rows = []
    for a, b in zip(cuts, cuts[1:]):
        rows += [(a, b - a), (b, 0)]
    tables = []
    for pick in ["random", "zero", "whole", "one"]:
        counts = []
        for _, length in rows:
            if pick == "random" and length:
                counts.append(int(torch.randint(0, length + 1, (1,), generator=g)))
            else:
                counts.append({"zero": 0, "whole": length, "one": min(1, length)}.get(pick, 0))
        tables.append(ops.segment_table(rows, counts=counts))
    if n > 10_000:
        tables.append(ops.segment_table([(0, 4096), (4096, 4097), (8193, 1), (8194, n - 8194)],
                                        counts=[4095, 1, 0, max(0, (n - 8194) // 1000)]))
    return tables


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_topk_with_counts_matches_cpu(n, dtype, kind):
    x = make_input(n, dtype, kind, seed=n + 29)
    x_g = x.cuda()
    for t, table in enumerate(count_tables(n, seed=n + 3)):
        for exact, host in itertools.product([True, False], [None, table]):
            what = f"n={n} {dtype} {kind} count table#{t} exact={exact} host_copy={host is not None}"
            (_, i_c), _ = assert_topk_matches_cpu(x, x_g, table, table.cuda(), 0.5, exact, 3, what, host=host)
            assert i_c.numel() == int(table[:, 2].sum())


def test_bad_counts_raise_like_cpu():
    x = torch.randn(10_000)
    for row in [(0, 100, -1), (0, 100, 101), (9990, 100, 11)]:
        table = torch.tensor([(0, 10, 1), row], dtype=torch.int64)
        with pytest.raises(RuntimeError) as cpu_error:
            Q.topk_magnitude(x, table, 0.1, True, 0.01, 0)
        for host in [None, table]:
            with pytest.raises(RuntimeError) as gpu_error:
                Q.topk_magnitude(x.cuda(), table.cuda(), 0.1, True, 0.01, 0, host)
            assert str(cpu_error.value).splitlines()[0] == str(gpu_error.value).splitlines()[0]


def test_compensate_with_count_table_matches_cpu():
    grad = make_input(100_003, torch.float32, "random", seed=8)
    table = ops.segment_table([(0, 50_000), (50_000, 3), (50_003, 50_000)], counts=[10, 0, 3])
    u_c, v_c = torch.zeros(100_003), torch.zeros(100_003)
    u_g, v_g = u_c.cuda(), v_c.cuda()
    Q.dgc_compensate(grad, u_c, v_c, table, 0.9, False, 1.0)
    Q.dgc_compensate(grad.cuda(), u_g, v_g, table.cuda(), 0.9, False, 1.0)
    assert_identical(u_c, u_g, "u")
    assert_identical(v_c, v_g, "v")


# ---- dgc_compensate --------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_compensate_matches_cpu(n, dtype, kind):
    clips = [0.0, 1.0, 1e-3, 1e6] if n < 100_000 else [0.0, 1.0]
    for t, table in enumerate(segment_tables(n, seed=n + 1)):
        table_g = on_gpu(table)
        for nesterov, clip in itertools.product([False, True], clips):
            g = torch.Generator().manual_seed(n + t)
            u_c, v_c = torch.randn(n, generator=g), torch.randn(n, generator=g)
            u_g, v_g = u_c.cuda(), v_c.cuda()
            for step in range(2):  # the second step starts from the first one's state
                grad = make_input(n, dtype, kind if step == 0 else "random", seed=n + step)
                Q.dgc_compensate(grad, u_c, v_c, table, 0.9, nesterov, clip)
                Q.dgc_compensate(grad.cuda(), u_g, v_g, table_g, 0.9, nesterov, clip)
                what = f"n={n} {dtype} {kind} table#{t} nesterov={nesterov} clip={clip} step={step}"
                assert_identical(u_c, u_g, what + " u")
                assert_identical(v_c, v_g, what + " v")


def test_compensate_clips_per_segment():
    grad = torch.cat([torch.full((1000,), 3.0), torch.full((10,), 1e-3)]).cuda()
    table = ops.segment_table([(0, 1000), (1000, 10)], device="cuda")
    u, v = torch.zeros(1010, device="cuda"), torch.zeros(1010, device="cuda")
    Q.dgc_compensate(grad, u, v, table, 0.0, False, 1.0)
    assert abs(u[:1000].double().norm().item() - 1.0) < 1e-5  # clipped to norm 1
    assert torch.equal(u[1000:], grad[1000:])  # below the clip: unchanged


# ---- dgc_mask ----------------------------------------------------------------------------

@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("with_u", [False, True], ids=["v", "v+u"])
def test_mask_matches_cpu(index_dtype, with_u):
    for n, k in [(1, 1), (7, 3), (1000, 250), ((1 << 20) + 3, 20_000)]:
        g = torch.Generator().manual_seed(n)
        v_c = torch.randn(n, generator=g)
        u_c = torch.randn(n, generator=g) if with_u else None
        idx = torch.randint(0, n, (k,), generator=g).to(index_dtype)  # duplicates too
        v_g, u_g = v_c.cuda(), on_gpu(u_c)
        Q.dgc_mask(v_c, u_c, idx)
        Q.dgc_mask(v_g, u_g, idx.cuda())
        assert_identical(v_c, v_g, f"mask n={n} v")
        if with_u:
            assert_identical(u_c, u_g, f"mask n={n} u")
    Q.dgc_mask(torch.ones(5, device="cuda"), None, torch.empty(0, dtype=index_dtype, device="cuda"))


@pytest.mark.parametrize("bad", [-1, 1000, 2**31 - 1])
def test_mask_out_of_range_writes_nothing(bad):
    v = torch.randn(1000, device="cuda")
    u = torch.randn(1000, device="cuda")
    v0, u0 = v.clone(), u.clone()
    idx = torch.arange(0, 1000, 7, dtype=torch.int64)
    idx[5] = bad
    idx[9] = bad
    with pytest.raises(RuntimeError) as cpu_error:
        Q.dgc_mask(v.cpu(), u.cpu(), idx)
    with pytest.raises(RuntimeError) as gpu_error:
        Q.dgc_mask(v, u, idx.cuda())
    assert f"holds index {bad} at position 5" in str(gpu_error.value)
    assert str(cpu_error.value).splitlines()[0] == str(gpu_error.value).splitlines()[0]
    assert torch.equal(v, v0) and torch.equal(u, u0)


# ---- densify ------------------------------------------------------------------------------

@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_densify_matches_cpu(dtype, index_dtype):
    for w, k, numel in [(1, 1, 1), (3, 7, 10), (4, 1000, 1500), (2, 5000, 5000), (8, 20_000, (1 << 20) + 3)]:
        g = torch.Generator().manual_seed(w * k)
        values = (torch.randn(w, k, generator=g) * torch.exp(torch.randn(w, k, generator=g) * 4)).to(dtype)
        indices = torch.randint(0, numel, (w, k), generator=g)
        indices[:, : k // 2] = indices[0, : k // 2]  # the same indices in every payload
        if k > 3:
            indices[0, 1] = indices[0, 2]  # a duplicate within one payload
            values[w - 1, 0] = float("nan")
            values[0, 3] = -0.0
        indices = indices.to(index_dtype)
        out_c = Q.densify(values, indices, numel)
        out_g = Q.densify(values.cuda(), indices.cuda(), numel)
        assert out_g.dtype == torch.float32 and out_g.is_cuda
        assert_identical(out_c, out_g, f"densify {w}x{k} -> {numel}")
        # Flat payloads of another shape, and the same result twice (deterministic).
        again = Q.densify(values.cuda().reshape(-1), indices.cuda().reshape(-1), numel)
        assert_identical(out_c, again, f"densify flat {w}x{k}")
    empty = Q.densify(torch.empty(0, 5, dtype=dtype, device="cuda"),
                      torch.empty(0, 5, dtype=index_dtype, device="cuda"), 3)
    assert torch.equal(empty.cpu(), torch.zeros(3))


def test_densify_roundtrip_with_topk():
    x = make_input(200_003, torch.float32, "random", seed=9)
    table = ops.segment_table([(0, 100_000), (100_000, 0), (100_000, 100_003)])
    payloads = [Q.topk_magnitude((x * (r + 1)).cuda(), table.cuda(), 0.01, False, 0.01, r) for r in range(4)]
    values = torch.stack([p[0] for p in payloads])
    indices = torch.stack([p[1] for p in payloads])
    out_g = Q.densify(values, indices, x.numel())
    out_c = Q.densify(values.cpu(), indices.cpu(), x.numel())
    assert_identical(out_c, out_g, "densify of topk payloads")


@pytest.mark.parametrize("bad", [-3, 500])
def test_densify_out_of_range_raises(bad):
    values = torch.randn(2, 100)
    indices = torch.randint(0, 500, (2, 100))
    indices[1, 42] = bad
    indices[1, 60] = bad
    with pytest.raises(RuntimeError) as cpu_error:
        Q.densify(values, indices, 500)
    with pytest.raises(RuntimeError) as gpu_error:
        Q.densify(values.cuda(), indices.cuda(), 500)
    assert f"holds index {bad} at position 142" in str(gpu_error.value)
    assert str(cpu_error.value).splitlines()[0] == str(gpu_error.value).splitlines()[0]
    with pytest.raises(RuntimeError, match="outside \\[0, 0\\)"):
        Q.densify(values.cuda(), indices.cuda(), 0)


# ---- argument validation -------------------------------------------------------------------

def test_same_validation_as_cpu():
    x = torch.randn(100)
    cases = [
        lambda d: Q.topk_magnitude(x.to(d), None, 0.0, True, 0.01, 0),
        lambda d: Q.topk_magnitude(x.to(d), None, 0.1, True, 1.5, 0),
        lambda d: Q.topk_magnitude(x.to(d).int(), None, 0.1, True, 0.01, 0),
        lambda d: Q.dgc_compensate(x.to(d), torch.zeros(100, device=d), torch.zeros(99, device=d), None, 0.9,
                                   False, 0.0),
        lambda d: Q.dgc_compensate(x.to(d), torch.zeros(100, device=d), torch.zeros(100, device=d), None, 1.0,
                                   False, 0.0),
        lambda d: Q.dgc_compensate(x.to(d), torch.zeros(100, device=d), torch.zeros(100, device=d), None, 0.9,
                                   False, -1.0),
        lambda d: Q.dgc_mask(x.to(d).half(), None, torch.zeros(1, dtype=torch.int64, device=d)),
        lambda d: Q.densify(x.to(d), torch.zeros(99, dtype=torch.int64, device=d), 100),
        lambda d: Q.densify(x.to(d), torch.zeros(100, dtype=torch.int64, device=d), -1),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(RuntimeError) as cpu_error:
            case("cpu")
        with pytest.raises(RuntimeError) as gpu_error:
            case("cuda")
        assert str(cpu_error.value).splitlines()[0] == str(gpu_error.value).splitlines()[0], f"case {i}"
    with pytest.raises(RuntimeError, match="segments is on cpu"):
        Q.topk_magnitude(x.cuda(), ops.segment_table([(0, 100)]), 0.1, True, 0.01, 0)


# ---- first_bad: no host wait, the CPU's outcome --------------------------------------------------

@pytest.mark.parametrize("bad", [False, True])
def test_first_bad_paths_do_not_wait_and_match_cpu(bad):
    torch.manual_seed(0)
    values = torch.randn(4, 300)
    indices = torch.randint(0, 5000, (4, 300), dtype=torch.int32)
    if bad:
        indices[2, 17] = 5000
        indices[3, 0] = -1
    v, u = torch.randn(5000), torch.randn(5000)
    own = torch.randperm(5000)[:300].to(torch.int32)
    if bad:
        own[9] = 6000
    flags_c = torch.empty(2, dtype=torch.int64)
    dense_c = ops.densify(values, indices, 5000, first_bad=flags_c[1:2])
    v_c, u_c = v.clone(), u.clone()
    ops.dgc_mask(v_c, own, u_c, first_bad=flags_c[0:1])
    values_g, indices_g, own_g = values.cuda(), indices.cuda(), own.cuda()
    v_g, u_g = v.cuda(), u.cuda()
    flags_g = torch.empty(2, dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host wait raises
    try:
        dense_g = ops.densify(values_g, indices_g, 5000, first_bad=flags_g[1:2])
        ops.dgc_mask(v_g, own_g, u_g, first_bad=flags_g[0:1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert flags_c.tolist() == flags_g.tolist() == ([9, 2 * 300 + 17] if bad else [-1, -1])
    assert_identical(dense_c, dense_g, "densify with first_bad")
    assert_identical(v_c, v_g, "dgc_mask v with first_bad")
    assert_identical(u_c, u_g, "dgc_mask u with first_bad")


def test_dgc_pack_does_not_wait():
    from pycomm.hooks.dgc import _pack

    values, indices = torch.randn(7, device="cuda"), torch.arange(7, device="cuda", dtype=torch.int32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        payload = _pack(values, indices, 1, torch.float16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(payload.cpu(), _pack(values.cpu(), indices.cpu(), 1, torch.float16))
