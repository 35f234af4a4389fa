"""DGC ops on CPU: top-k selection (exact and sampled), momentum correction, masking, densify."""

import math

import pytest
import torch

import pycomm
from pycomm import ops


def reference_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest |x|, ties to the lower index (float64 sort), ascending."""
    mag = x.double().abs()
    mag = torch.where(torch.isnan(mag), torch.full_like(mag, math.inf), mag)
    order = sorted(range(x.numel()), key=lambda i: (-mag[i].item(), i)) if x.numel() < 5000 else None
    if order is not None:
        return torch.tensor(sorted(order[:k]), dtype=torch.long)
    # Large inputs here have distinct magnitudes: torch.topk is exact.
    return torch.topk(mag, k).indices.sort().values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_exact_topk_matches_reference(dtype):
    for n, density in [(1, 0.001), (7, 0.5), (1000, 0.01), (4099, 0.3), (200_003, 0.001)]:
        x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
        values, indices = ops.topk(x, density, exact=True)
        k = math.ceil(n * density)
        assert values.numel() == k and indices.dtype == torch.int32 and values.dtype == dtype
        if dtype == torch.float32:
            assert torch.equal(indices.long(), reference_topk(x, k))
        assert torch.equal(values, x[indices.long()])


@pytest.mark.parametrize("distribution", ["gaussian", "heavy_tailed"])
@pytest.mark.parametrize("density", [0.001, 0.01])
def test_sampled_topk_quality(distribution, density):
    gen = torch.Generator().manual_seed(5)
    n = 2_000_000
    if distribution == "gaussian":
        x = torch.randn(n, generator=gen)
    else:  # Student-t with 1.5 degrees of freedom: heavy tails
        x = torch.distributions.StudentT(1.5).sample((n,))
    _, exact_idx = ops.topk(x, density, exact=True)
    _, idx = ops.topk(x, density, exact=False, sample_ratio=0.01, seed=3)
    assert idx.numel() == exact_idx.numel() == math.ceil(n * density)
    assert torch.unique(idx).numel() == idx.numel()
    captured = x[idx.long()].double().pow(2).sum()
    best = x[exact_idx.long()].double().pow(2).sum()
    assert captured >= 0.95 * best  # the bound
    # The candidates contain every element above the k-th, so the set is in fact exact.
    assert torch.equal(idx, exact_idx)


def test_ties_go_to_lower_index_and_nan_first():
    x = torch.ones(100)
    _, idx = ops.topk(x, 0.05, exact=True)
    assert idx.tolist() == [0, 1, 2, 3, 4]
    _, idx = ops.topk(torch.zeros(70_000), 0.001, exact=False)
    assert idx.tolist() == list(range(70))
    y = torch.randn(1000)
    y[321] = float("nan")
    _, idx = ops.topk(y, 0.002)
    assert 321 in idx.tolist()


def test_segments_keep_their_own_k():
    x = torch.randn(10_000)
    table = ops.segment_table([(0, 1000), (1000, 0), (2000, 5000), (9990, 10)])
    values, indices = ops.topk(x, 0.01, segments=table)
    assert torch.equal(ops.topk(x, 0.01, segments=table, host_segments=table)[1], indices)  # CPU ignores the copy
    ks = [10, 0, 50, 1]
    assert indices.numel() == sum(ks)
    start = 0
    for (off, length), k in zip([(0, 1000), (1000, 0), (2000, 5000), (9990, 10)], ks):
        part = indices[start:start + k].long()
        assert torch.equal(part, reference_topk(x[off:off + length], k) + off)
        start += k


def torch_compensate(g, u, v, m, nesterov, clip):
    if clip:
        norm = g.double().norm()
        if norm > clip:
            g = g * float(clip / norm)
    if nesterov:
        u = m * (u + g)
        v = v + u + g
    else:
        u = m * u + g
        v = v + u
    return u, v


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("clip", [0.0, 5.0])
def test_compensate_matches_pure_torch(nesterov, clip):
    g = torch.randn(3000)
    u0, v0 = torch.randn(3000), torch.randn(3000)
    table = ops.segment_table([(0, 1000), (1000, 2000)])
    u, v = u0.clone(), v0.clone()
    ops.dgc_compensate(g, u, v, 0.9, nesterov, clip, table)
    for off, n in [(0, 1000), (1000, 2000)]:
        eu, ev = torch_compensate(g[off:off + n], u0[off:off + n], v0[off:off + n], 0.9, nesterov, clip)
        assert torch.allclose(u[off:off + n], eu, atol=1e-6) and torch.allclose(v[off:off + n], ev, atol=1e-6)


def test_mask_and_densify():
    v, u = torch.randn(100), torch.randn(100)
    idx = torch.tensor([3, 50, 99], dtype=torch.int32)
    ops.dgc_mask(v, idx, u)
    assert v[idx.long()].eq(0).all() and u[idx.long()].eq(0).all() and v.ne(0).sum() == 97
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float16)
    indices = torch.tensor([[5, 7], [7, 0]], dtype=torch.int32)
    dense = ops.densify(values, indices, 10)
    assert dense.dtype == torch.float32 and dense.tolist() == [4, 0, 0, 0, 0, 1, 0, 5, 0, 0]


def test_out_of_range_indices_raise_and_write_nothing():
    with pytest.raises(RuntimeError, match="outside"):
        ops.densify(torch.ones(3), torch.tensor([0, 10, 1]), 10)
    with pytest.raises(RuntimeError, match="outside"):
        ops.densify(torch.ones(2), torch.tensor([-1, 1]), 10)
    v = torch.ones(10)
    with pytest.raises(RuntimeError, match="nothing was written"):
        ops.dgc_mask(v, torch.tensor([1, 2, 11]))
    assert v.eq(1).all()
    with pytest.raises(ValueError, match="same shape"):
        ops.densify(torch.ones(3), torch.tensor([0, 1]), 10)
    with pytest.raises(ValueError, match="density"):
        ops.topk(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="int32 or int64"):
        ops.densify(torch.ones(2), torch.tensor([0.0, 1.0]), 10)


def assert_follows_reference_dgc(dgc, n: int, m: float, steps: int, compress, select) -> None:
    """``steps`` calls of ``compress`` (the stateful compressor ``dgc`` on n elements) against a pure-torch
    DGC (ALGORITHMS.md section 1) with momentum m: momentum correction, then ``select(v)`` (the
    reference top-k indices) are sent and leave u and v."""
    u, v = torch.zeros(n), torch.zeros(n)
    for _ in range(steps):
        g = torch.randn(n)
        values, indices = compress(g)
        u = m * u + g
        v = v + u
        idx = select(v)
        assert torch.equal(indices.long(), idx)
        assert torch.allclose(values, v[idx], atol=1e-5)
        v[idx] = 0
        u[idx] = 0
        assert torch.allclose(dgc.u, u, atol=1e-5) and torch.allclose(dgc.v, v, atol=1e-5)


def test_dgc_compressor_matches_reference_algorithm():
    """Several steps of the stateful compressor against a pure-torch DGC (ALGORITHMS.md section 1)."""
    torch.manual_seed(0)
    n, density, m = 50_000, 0.01, 0.9
    dgc = pycomm.compressors.DGC(density=density, momentum=m, exact=True)
    k = math.ceil(n * density)
    assert_follows_reference_dgc(dgc, n, m, steps=5, compress=dgc.compress, select=lambda v: reference_topk(v, k))


# ---- per-segment counts: a third column (offset, length, count) -------------------------

def stable_reference_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest |x| (NaN first, ties to the lower index), ascending: a stable float64 sort."""
    mag = x.double().abs()
    mag = torch.where(torch.isnan(mag), torch.full_like(mag, math.inf), mag)
    return torch.sort(mag, descending=True, stable=True).indices[:k].sort().values


# A 300k-element buffer: layer-like rows with empty and tiny segments, counts of 0 and of the
# whole segment, and large segments that take the sampled path (length >= 32768, 4k <= length).
COUNT_ROWS = [(0, 100_000, 100), (100_000, 0, 0), (100_000, 1, 0), (100_001, 1, 1), (100_002, 7, 3),
              (100_009, 50_000, 0), (150_009, 1000, 1000), (151_009, 148_991, 5000)]


def count_table(rows=COUNT_ROWS):
    return ops.segment_table([(o, n) for o, n, _ in rows], counts=[c for _, _, c in rows])


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_segment_counts_match_reference(dtype, exact):
    x = (torch.randn(300_000, generator=torch.Generator().manual_seed(11)) * 3).to(dtype)  # fp16/bf16: ties
    table = count_table()
    assert table.shape == (len(COUNT_ROWS), 3)
    values, indices = ops.topk(x, 0.5, exact=exact, seed=4, segments=table)
    assert indices.numel() == sum(c for _, _, c in COUNT_ROWS)
    assert values.dtype == dtype and indices.dtype == torch.int32
    start = 0
    for off, n, c in COUNT_ROWS:
        part = indices[start:start + c].long()
        assert torch.equal(part, stable_reference_topk(x[off:off + n], c) + off), (off, n, c)
        start += c
    assert torch.equal(values, x[indices.long()])


def test_segment_counts_sampled_quality():
    gen = torch.Generator().manual_seed(6)
    x = torch.cat([torch.randn(1_000_000, generator=gen), torch.distributions.StudentT(1.5).sample((1_000_000,))])
    rows = [(0, 1_000_000, 1000), (1_000_000, 1_000_000, 20_000)]
    _, idx = ops.topk(x, 0.001, exact=False, sample_ratio=0.01, seed=2, segments=count_table(rows))
    assert idx.numel() == 21_000
    for (off, n, c), part in zip(rows, idx.split([1000, 20_000])):
        best = stable_reference_topk(x[off:off + n], c) + off
        captured = x[part.long()].double().pow(2).sum()
        assert captured >= 0.95 * x[best].double().pow(2).sum()
        assert torch.equal(part.long(), best)  # the candidates hold every element above the k-th


def test_segment_counts_equal_densities_and_ignore_density_argument():
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(3))
    rows = [(o, n) for o, n, _ in COUNT_ROWS]
    for density in [0.001, 0.3, 1.0]:
        two = ops.topk(x, density, segments=ops.segment_table(rows))
        counts = [ops.topk_count(n, density) for _, n in rows]
        for other in [density, 1.0, 1e-6]:  # the density argument is not used with counts
            three = ops.topk(x, other, segments=ops.segment_table(rows, counts=counts))
            assert torch.equal(two[0], three[0]) and torch.equal(two[1], three[1])
    with pytest.raises(ValueError, match="density"):
        ops.topk(x, 0.0, segments=count_table())  # still validated


def test_bad_count_rows_are_rejected():
    x = torch.randn(10_000)
    raw = torch.ops.pycomm.topk_magnitude
    for row in [(0, 100, -1), (0, 100, 101), (9990, 100, 11), (10_000, 5, 1), (-5, 3, 4)]:
        # (9990, 100) and (10_000, 5) are clamped to lengths 10 and 0; (-5, 3) to offset 0, length 3.
        table = torch.tensor([(0, 10, 1), row], dtype=torch.int64)
        with pytest.raises(RuntimeError, match=r"segment 1 .* keep must be in \[0, length\]"):
            raw(x, table, 0.1, True, 0.01, 0)
    assert raw(x, torch.tensor([(9990, 100, 10)]), 0.1, True, 0.01, 0)[1].tolist() == list(range(9990, 10_000))
    with pytest.raises(RuntimeError, match=r"\[num_segments, 3\]"):
        raw(x, torch.zeros(2, 4, dtype=torch.int64), 0.1, True, 0.01, 0)
    with pytest.raises(ValueError, match="counts must be in"):
        ops.segment_table([(0, 5)], counts=[6])
    with pytest.raises(ValueError, match="counts must be in"):
        ops.segment_table([(0, 5)], counts=[-1])
    with pytest.raises(ValueError, match="2 entries for 1 segments"):
        ops.segment_table([(0, 5)], counts=[1, 2])


def test_compensate_accepts_count_tables():
    g = torch.randn(3000)
    rows = [(0, 1000), (1000, 2000)]
    results = []
    for table in [ops.segment_table(rows), ops.segment_table(rows, counts=[3, 0])]:
        u, v = torch.zeros(3000), torch.zeros(3000)
        ops.dgc_compensate(g, u, v, 0.9, False, 1.0, table)
        results.append((u, v))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_dgc_compressor_with_per_segment_counts_matches_reference():
    torch.manual_seed(1)
    rows = [(0, 40_000), (40_000, 5), (40_005, 60_000)]
    counts = [400, 0, 6000]
    n, m = 100_005, 0.9
    table = ops.segment_table(rows, counts=counts)
    dgc = pycomm.compressors.DGC(density=0.001, momentum=m)

    def select(v):
        return torch.cat([stable_reference_topk(v[o:o + ln], c) + o for (o, ln), c in zip(rows, counts)])

    assert_follows_reference_dgc(dgc, n, m, steps=4, compress=lambda g: dgc.compress(g, segments=table),
                                 select=select)


# ---- first_bad: index errors recorded on the device instead of raised (no host wait) ----------

def test_first_bad_records_instead_of_raising():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    good = torch.tensor([[5, 7], [7, 0]], dtype=torch.int32)
    flag = torch.full((1,), 123, dtype=torch.int64)
    assert torch.equal(ops.densify(values, good, 10, first_bad=flag), ops.densify(values, good, 10))
    assert flag.item() == -1
    bad = torch.tensor([[5, 7], [10, -1]], dtype=torch.int32)
    out = ops.densify(values, bad, 10, first_bad=flag)
    assert flag.item() == 2 and out.eq(0).all() and out.shape == (10,)  # nothing written, no raise
    flags = torch.full((2,), 123, dtype=torch.int64)  # the DGC hook's layout: one word per op
    v, u = torch.randn(10), torch.randn(10)
    v0, u0 = v.clone(), u.clone()
    ops.dgc_mask(v, torch.tensor([1, 2, 11, -3]), u, first_bad=flags[0:1])
    assert flags.tolist() == [2, 123] and torch.equal(v, v0) and torch.equal(u, u0)
    ops.dgc_mask(v, torch.tensor([1, 2]), u, first_bad=flags[1:2])
    assert flags.tolist() == [2, -1] and v[1:3].eq(0).all() and u[1:3].eq(0).all() and v[3:].ne(0).all()
    ops.densify(torch.ones(0), torch.zeros(0, dtype=torch.int64), 4, first_bad=flag)
    assert flag.item() == -1


def test_first_bad_is_validated():
    x, idx = torch.ones(2), torch.tensor([0, 1])
    for bad in (torch.zeros(1, dtype=torch.int32), torch.zeros(2, dtype=torch.int64), torch.zeros(2, 2)[:, :1],
                torch.zeros((), dtype=torch.int64)[None].expand(1, 1)[0, 0:0]):
        with pytest.raises(ValueError, match="first_bad"):
            ops.densify(x, idx, 4, first_bad=bad)
        with pytest.raises(ValueError, match="first_bad"):
            ops.dgc_mask(torch.ones(4), idx, first_bad=bad)
    with pytest.raises(RuntimeError, match="first_bad must be a contiguous int64"):
        torch.ops.pycomm.densify(x, idx, 4, torch.zeros(1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="first_bad must be a contiguous int64"):
        torch.ops.pycomm.dgc_mask(torch.ones(4), None, idx, torch.zeros(3, dtype=torch.int64))


