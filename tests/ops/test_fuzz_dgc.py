"""Property-based (hypothesis) fuzzing of the DGC ops that take indices from a peer or a
caller, and of the bounds of the other DGC and Philox raw ops.

densify and dgc_mask get (values, indices) with indices anywhere in int32 / int64 (negative,
``numel``, near 2**31 and 2**63), as views into larger tensors whose surroundings hold poison
(out-of-range indices, huge values), and non-contiguous. Each test asserts that the op raises
exactly when an index is out of range or an argument is malformed, and otherwise matches a
pure-numpy reference: densify sums in payload order in float32; dgc_mask zeroes exactly the
indexed elements of v (and u), which are views into canary-filled tensors whose canaries must
survive, and writes nothing at all when it raises.

Profiles (tests/fuzz_profiles.py): by default ``pycomm-ci``, about 60 examples per test, no
deadline; ``pytest tests/ops/test_fuzz_dgc.py --hypothesis-profile=long`` runs thousands.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import pycomm  # noqa: F401  (registers torch.ops.pycomm)
from fuzz_reference import FLOAT_DTYPES, assert_same_values, bits_of, embed

OPS = torch.ops.pycomm
ERRORS = (RuntimeError, ValueError, TypeError, IndexError, OverflowError)
CANARY = -4242.0
INDEX_EDGES = [-(2**63), -(2**31), -1, 2**31 - 1, 2**31, 2**62, 2**63 - 1]


def index_st(numel: int, index_dtype: torch.dtype) -> st.SearchStrategy:
    """Mostly in [0, numel), sometimes just outside or at an integer edge of the dtype."""
    edges = [e for e in INDEX_EDGES + [numel, numel + 1] if index_dtype == torch.int64 or -(2**31) <= e < 2**31]
    inside = st.integers(0, numel - 1) if numel > 0 else st.nothing()
    return st.one_of(inside, inside, inside, st.sampled_from(edges))


@st.composite
def index_tensor_st(draw, count: int, numel: int, index_dtype: torch.dtype, shape_2d: bool):
    """(indices as passed, the same indices as a flat list): a contiguous view into a buffer
    padded with invalid indices, or a strided view."""
    values = draw(st.lists(index_st(numel, index_dtype), min_size=count, max_size=count))
    flat = torch.tensor(values, dtype=index_dtype)
    layout = draw(st.sampled_from(["embedded", "strided"]))
    if layout == "embedded":
        view = embed(flat, draw(st.integers(0, 4)), draw(st.integers(0, 4)), -1)[1]
    else:
        big = torch.full((2 * count,), -1, dtype=index_dtype)
        big[::2] = flat
        view = big[::2]
    if shape_2d and count % 2 == 0 and layout == "embedded":
        view = view.view(2, count // 2)
    return view, values


@given(data=st.data(), count=st.integers(0, 24), numel=st.one_of(st.integers(0, 40), st.sampled_from([-1, -(2**63)])),
       value_dtype=st.sampled_from(FLOAT_DTYPES), index_dtype=st.sampled_from([torch.int32, torch.int64]),
       mutation=st.sampled_from([None] * 6 + ["value_dtype", "index_dtype", "shape"]))
def test_densify(data, count, numel, value_dtype, index_dtype, mutation):
    indices, index_list = data.draw(index_tensor_st(count, max(numel, 0), index_dtype, data.draw(st.booleans())))
    raw_values = data.draw(st.lists(st.floats(-1e4, 1e4, width=16), min_size=count, max_size=count))
    values_flat = torch.tensor(raw_values, dtype=torch.float32).to(value_dtype)
    if data.draw(st.booleans()):
        values = embed(values_flat, data.draw(st.integers(0, 4)), data.draw(st.integers(0, 4)), 6e4)[1]
    else:
        big = torch.full((2 * count,), 6e4, dtype=value_dtype)
        big[::2] = values_flat
        values = big[::2]
    values = values.view(indices.shape) if values.is_contiguous() else values.reshape(indices.shape)
    valid = mutation is None and numel >= 0 and all(0 <= i < numel for i in index_list)
    if mutation == "value_dtype":
        values = values.to(data.draw(st.sampled_from([torch.float64, torch.int64])))
    elif mutation == "index_dtype":
        indices = indices.to(data.draw(st.sampled_from([torch.int16, torch.float32, torch.uint8])))
    elif mutation == "shape":
        values = torch.cat([values.reshape(-1), values.new_zeros(1)])
    note(f"valid={valid} numel={numel} indices={index_list} values={values_flat.tolist()}")
    if not valid:
        with pytest.raises(ERRORS):
            OPS.densify(values, indices, numel)
        return
    out = OPS.densify(values, indices, numel)
    expected = np.zeros(numel, dtype=np.float32)
    for i, v in zip(index_list, values_flat.float().tolist()):  # in payload order, float32 adds
        expected[i] = np.float32(expected[i] + np.float32(v))
    assert_same_values(out, torch.from_numpy(expected))


@given(data=st.data(), count=st.integers(0, 16), numel=st.integers(0, 40),
       index_dtype=st.sampled_from([torch.int32, torch.int64]), with_u=st.booleans(),
       mutation=st.sampled_from([None] * 6 + ["v_dtype", "v_strided", "u_numel", "u_dtype", "index_dtype"]))
def test_dgc_mask(data, count, numel, index_dtype, with_u, mutation):
    indices, index_list = data.draw(index_tensor_st(count, numel, index_dtype, data.draw(st.booleans())))
    pads = [data.draw(st.integers(0, 6)) for _ in range(4)]
    v_init = torch.arange(1, numel + 1, dtype=torch.float32)
    big_v, v = embed(v_init, pads[0], pads[1], CANARY)
    big_u, u = embed(-v_init, pads[2], pads[3], CANARY) if with_u else (None, None)
    valid = mutation is None and all(0 <= i < numel for i in index_list)
    if mutation == "v_dtype":
        v = v.to(data.draw(st.sampled_from([torch.float16, torch.float64])))
        big_v = v
    elif mutation == "v_strided":
        big_v = torch.full((2 * numel + 2,), CANARY)
        v = big_v[::2][:numel]
        valid = numel <= 1 and all(0 <= i < numel for i in index_list)
        if valid:  # one element: a contiguous view after all
            pads[0], pads[1] = 0, big_v.numel() - numel
            v_init = v.clone()
    elif mutation == "u_numel":
        big_u = torch.full((numel + 3,), CANARY)
        u = big_u[:numel + 1]
    elif mutation == "u_dtype":
        u = torch.zeros(numel, dtype=torch.float64)
        big_u = u
    elif mutation == "index_dtype":
        indices = indices.to(torch.int16)
    note(f"valid={valid} numel={numel} indices={index_list}")
    watched = [big_v] + ([big_u] if big_u is not None else [])
    snapshots = [bits_of(t) for t in watched]
    if not valid:
        with pytest.raises(ERRORS):
            OPS.dgc_mask(v, u, indices)
        for t, s in zip(watched, snapshots):
            assert torch.equal(bits_of(t), s), "dgc_mask raised but wrote"
        return
    OPS.dgc_mask(v, u, indices)
    expected_big_v = torch.from_numpy(np.frombuffer(snapshots[0].numpy().tobytes(), dtype=np.float32).copy())
    for i in index_list:
        expected_big_v[pads[0] + i] = 0.0
    assert_same_values(big_v, expected_big_v)
    if u is not None:
        expected_big_u = torch.from_numpy(np.frombuffer(snapshots[1].numpy().tobytes(), dtype=np.float32).copy())
        for i in index_list:
            expected_big_u[pads[2] + i] = 0.0
        assert_same_values(big_u, expected_big_u)


# ---------------------------------------------------------------------------------------------
# Bounds of the remaining raw ops: topk_magnitude, dgc_compensate and the Philox ops.

SEGMENT_EDGES = [-(2**63), -1, 2**62, 2**63 - 1]


@given(data=st.data(), numel=st.integers(0, 64), dtype=st.sampled_from(FLOAT_DTYPES),
       density=st.one_of(st.floats(0.01, 1.0), st.sampled_from([0.0, -0.5, 1.5, float("nan"), float("inf")])),
       exact=st.booleans(), columns=st.sampled_from([0, 2, 3]))
def test_topk_magnitude_bounds(data, numel, dtype, density, exact, columns):
    """Any segment rows are clamped into x; keep outside [0, clamped length] raises; the result of
    a segment is its exact top-k, read only from inside x (x is a view into huge poison values)."""
    x_flat = torch.tensor(data.draw(st.lists(st.floats(-100, 100, width=16), min_size=numel, max_size=numel)),
                          dtype=torch.float32).to(dtype)
    x = embed(x_flat, data.draw(st.integers(0, 4)), data.draw(st.integers(0, 4)), 6e4)[1]
    segments = None
    rows = []
    if columns:
        count = data.draw(st.integers(0, 4))
        for _ in range(count):
            row = [data.draw(st.one_of(st.integers(0, numel + 2), st.sampled_from(SEGMENT_EDGES))),
                   data.draw(st.one_of(st.integers(0, numel + 2), st.sampled_from(SEGMENT_EDGES)))]
            if columns == 3:
                row.append(data.draw(st.one_of(st.integers(0, numel), st.sampled_from(SEGMENT_EDGES))))
            rows.append(row)
        segments = torch.tensor(rows, dtype=torch.int64).reshape(-1, columns)
    clamped = []
    for row in rows:
        offset = min(max(row[0], 0), numel)
        length = max(min(row[1], numel - offset), 0)
        clamped.append((offset, length))
    if not columns:
        clamped = [(0, numel)]
    valid = 0.0 < density <= 1.0
    if columns == 3:
        valid = valid and all(0 <= row[2] <= length for row, (_, length) in zip(rows, clamped))
    note(f"valid={valid} rows={rows}")
    if not valid:
        with pytest.raises(ERRORS):
            OPS.topk_magnitude(x, segments, density, exact, 0.5, 0, None)
        return
    values, indices = OPS.topk_magnitude(x, segments, density, exact, 0.5, 0, None)
    assert indices.dtype == torch.int32
    at = 0
    xs = x_flat.float()
    for s, (offset, length) in enumerate(clamped):
        if columns == 3:
            keep = rows[s][2]
        else:
            keep = 0 if length == 0 else min(length, max(1, math.ceil(length * density)))
        idx = indices[at:at + keep].long()
        assert torch.all((idx >= offset) & (idx < offset + length))
        assert torch.equal(values[at:at + keep], x_flat[idx])
        if keep and keep < length:  # every kept magnitude >= every dropped one
            mask = torch.ones(length, dtype=torch.bool)
            mask[idx - offset] = False
            assert xs[idx].abs().min() >= xs[offset:offset + length][mask].abs().max()
        at += keep
    assert at == values.numel()


@given(data=st.data(), n=st.one_of(st.integers(0, 64), st.sampled_from([-1, -(2**63), 2**63 - 1])),
       offset=st.one_of(st.integers(0, 2**40), st.sampled_from([-1, -(2**63), 2**63 - 64, 2**63 - 1])),
       seed=st.integers(-(2**63), 2**64 - 1), distribution=st.sampled_from([0, 1, 0, 1, 2, -1]),
       dtype=st.sampled_from(FLOAT_DTYPES))
def test_philox_variates_bounds(data, n, offset, seed, distribution, dtype):
    """offset + n may not pass 2**63 - 1; a valid call equals the matching slice of a longer one."""
    valid = n >= 0 and offset >= 0 and offset + n <= 2**63 - 1 and distribution in (0, 1)
    valid = valid and n <= 2**40  # 2**63 - 1 variates are a valid range but no allocator can hold them
    signed_seed = seed - 2**64 if seed >= 2**63 else seed
    like = torch.zeros(1, dtype=dtype)
    if not valid:
        with pytest.raises(ERRORS):
            OPS.philox_variates(like, n, signed_seed, offset, distribution)
        return
    z = OPS.philox_variates(like, n, signed_seed, offset, distribution)
    assert z.shape == (n,) and z.dtype == dtype
    if n > 1:
        tail = OPS.philox_variates(like, n - 1, signed_seed, offset + 1, distribution)
        assert torch.equal(bits_of(z[1:]), bits_of(tail))


@given(data=st.data(), sizes=st.lists(st.integers(0, 20), min_size=1, max_size=3),
       offset=st.one_of(st.integers(0, 1000), st.sampled_from([-1, 2**63 - 30, 2**63 - 1])),
       alpha=st.sampled_from([0.0, 0.5, -3.0, 1e-30]), distribution=st.sampled_from([0, 1]),
       dtype=st.sampled_from(FLOAT_DTYPES))
def test_philox_axpy_views(data, sizes, offset, alpha, distribution, dtype):
    """philox_axpy_ updates contiguous views in place and nothing around them; perturbed_copy and
    dot read non-contiguous views exactly as their contiguous copies."""
    total = sum(sizes)
    valid = offset >= 0 and offset + total <= 2**63 - 1
    big = torch.full((total + 2 * len(sizes) + 2,), CANARY, dtype=dtype)
    views, at = [], 1
    for n in sizes:
        views.append(big[at:at + n])
        big[at:at + n] = torch.linspace(-1, 1, n, dtype=torch.float32).to(dtype)
        at += n + 2
    snapshot = big.clone()
    if not valid:
        with pytest.raises(ERRORS):
            OPS.philox_axpy_(views, 7, alpha, distribution, offset)
        assert torch.equal(bits_of(big), bits_of(snapshot))
        with pytest.raises(ERRORS):
            OPS.philox_dot(views, 7, distribution, offset)
        return
    copies = OPS.philox_perturbed_copy([v.clone() for v in views], 7, alpha, distribution, offset)
    strided = [torch.stack([v, v], dim=1)[:, 0] for v in views]  # non-contiguous views
    copies_strided = OPS.philox_perturbed_copy(strided, 7, alpha, distribution, offset)
    dot = OPS.philox_dot([v.clone() for v in views], 7, distribution, offset)
    dot_strided = OPS.philox_dot(strided, 7, distribution, offset)
    OPS.philox_axpy_(views, 7, alpha, distribution, offset)
    at = 1
    for n, v, c, cs in zip(sizes, views, copies, copies_strided):
        assert torch.equal(bits_of(v), bits_of(c)) and torch.equal(bits_of(cs), bits_of(c))
        assert torch.equal(bits_of(big[at - 1:at]), bits_of(snapshot[at - 1:at]))
        at += n + 2
    assert torch.equal(bits_of(big[at - 1:]), bits_of(snapshot[at - 1:])), "wrote after the last view"
    assert torch.equal(bits_of(dot), bits_of(dot_strided))
    # Overlapping views may not be updated in place.
    if sizes[0] >= 2:
        with pytest.raises(ERRORS):
            OPS.philox_axpy_([views[0], views[0][1:]], 7, alpha, distribution, offset)


@given(numel=st.integers(0, 40), momentum=st.sampled_from([0.0, 0.9, 0.999, 1.0, -0.1, float("nan")]),
       clip=st.sampled_from([0.0, 1.0, -1.0, float("nan")]), mutation=st.sampled_from([None, None, "u_numel", "v_dtype"]))
def test_dgc_compensate_bounds(numel, momentum, clip, mutation):
    """momentum in [0, 1), clip_norm >= 0; u and v are views whose canaries must survive."""
    grad = torch.linspace(-2, 2, numel)
    big_u, u = embed(torch.zeros(numel), 3, 3, CANARY)
    big_v, v = embed(torch.zeros(numel), 2, 5, CANARY)
    valid = 0.0 <= momentum < 1.0 and clip >= 0.0 and mutation is None
    if mutation == "u_numel":
        u = big_u[:numel + 1]
    elif mutation == "v_dtype":
        v = v.double()
    snap_u, snap_v = bits_of(big_u), bits_of(big_v)
    if not valid:
        with pytest.raises(ERRORS):
            OPS.dgc_compensate(grad, u, v, None, momentum, False, clip)
        assert torch.equal(bits_of(big_u), snap_u) and torch.equal(bits_of(big_v), snap_v)
        return
    OPS.dgc_compensate(grad, u, v, None, momentum, False, clip)
    for big, snap, before in ((big_u, snap_u, 3), (big_v, snap_v, 2)):
        after = bits_of(big)
        assert torch.equal(after[:before * 4], snap[:before * 4])
        assert torch.equal(after[(before + numel) * 4:], snap[(before + numel) * 4:])


@pytest.mark.parametrize("offset", [2**63 - 128, 2**63 - 64, 2**63 - 3])
def test_philox_ops_reach_the_last_index(offset):
    """Global indices up to 2**63 - 2 are valid. Found by test_philox_variates_bounds: in the last
    tile below 2**63, base + 128 overflowed, so the CPU ops skipped it: philox_variates and
    philox_perturbed_copy returned uninitialised memory, philox_axpy_ left the tensor as it was
    and philox_dot left those indices out."""
    n = 2
    like = torch.zeros(1)
    pair = OPS.philox_variates(like, n, 7, offset, 0)
    singles = torch.cat([OPS.philox_variates(like, 1, 7, offset + j, 0) for j in range(n)])
    small = OPS.philox_variates(like, n, 7, 5, 0)  # same distribution, low indices
    assert torch.equal(pair, singles)
    assert torch.isfinite(pair).all() and pair.abs().max() < 10 and not torch.equal(pair, torch.zeros(n))
    assert not torch.equal(pair, small)
    t = torch.tensor([1.0, -2.0])
    copy = OPS.philox_perturbed_copy([t], 7, 0.5, 0, offset)[0]
    assert torch.equal(copy, t + 0.5 * pair)
    in_place = t.clone()
    OPS.philox_axpy_([in_place], 7, 0.5, 0, offset)
    assert torch.equal(in_place, copy)
    dot = OPS.philox_dot([t], 7, 0, offset)
    assert dot.item() == pytest.approx(float((t.double() * pair.double()).sum()), rel=1e-12)
