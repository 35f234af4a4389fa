"""Property-based (hypothesis) fuzzing of the quantization ops' decoders and bounds.

Every raw op (torch.ops.pycomm.quantize / dequantize_into / dequantize_sum, uniform and mixed
4-column bucket tables) gets arguments that are mostly valid, with one mutation now and then
(wrong dtype, shape, contiguity, bit width, bucket size, table row, byte offset, host_table, an
int near 2**63, ...). Each test asserts that the op raises exactly when the input is invalid, and
that it touches no memory it should not:

* inputs are views into larger tensors whose surroundings hold poison values (so a read outside
  the view changes the result), and the result is compared with the pure-numpy reference decoder
  of tests/fuzz_reference.py, written from the byte format (quant_format.h, bucket_layout.h);
* output buffers (``out``, ``residual``) are views into larger canary-filled tensors, and the
  canaries are compared bit for bit afterwards (on a raise, nothing at all may have changed).

Profiles (tests/fuzz_profiles.py): by default ``pycomm-ci``, about 60 examples per test, no
deadline; ``pytest tests/ops/test_fuzz_quantize.py --hypothesis-profile=long`` runs thousands.
"""

from __future__ import annotations

import struct
from typing import Optional

import numpy as np
import pytest
import torch
from hypothesis import assume, given, note
from hypothesis import strategies as st

import pycomm  # noqa: F401  (registers torch.ops.pycomm)
from pycomm import ops
from fuzz_reference import (FLOAT_DTYPES, assert_same_values, bits_of, clamp_range, decode_records, dequantize_into_ref,
                            dequantize_sum_ref, embed, mixed_dequantize_into_ref, mixed_dequantize_sum_ref,
                            mixed_rows_spanning, mixed_total_bytes, packed_mixed_table, record_bytes)
from quant_reference import quantize_reference

OPS = torch.ops.pycomm
ERRORS = (RuntimeError, ValueError, TypeError, IndexError, OverflowError)
CANARY = -4242.0  # exactly representable in float32, float16 and bfloat16
POISON = 6.0e4  # large, and representable in float16 too

# Ints where bounds checks break: around 0, int32 limits and 2**63.
EDGE_INTS = [-(2**63), -(2**63) + 1, -(2**31), -1, 2**31 - 1, 2**31, 2**62, 2**63 - 9, 2**63 - 2, 2**63 - 1]
bits_st = st.integers(1, 8)
bucket_st = st.sampled_from([8, 16, 24, 64])
dtype_st = st.sampled_from(FLOAT_DTYPES)
edge_int_st = st.sampled_from(EDGE_INTS)


@st.composite
def header_st(draw) -> bytes:
    """8 header bytes: usually a plausible (min, unit), sometimes any bit pattern (NaN, Inf, denormals)."""
    if draw(st.booleans()):
        return draw(st.binary(min_size=8, max_size=8))
    mn = draw(st.floats(-1e4, 1e4, width=32))
    unit = draw(st.one_of(st.just(0.0), st.floats(0.0, 1e3, width=32)))
    return struct.pack("<ff", mn, unit)


@st.composite
def records_st(draw, count: int, bits_list: list[int], bucket_size: int) -> np.ndarray:
    """Flat uint8 records, record k with bits_list[k]; some records are all-zero (skipped records)."""
    parts = []
    for k in range(count):
        size = record_bytes(bits_list[k], bucket_size)
        if draw(st.integers(0, 5)) == 0:
            parts.append(bytes(size))
        else:
            parts.append(draw(header_st()) + draw(st.binary(min_size=size - 8, max_size=size - 8)))
    return np.frombuffer(b"".join(parts), dtype=np.uint8).copy()


def as_payload(flat: np.ndarray, shape: tuple[int, ...], before: int, after: int) -> torch.Tensor:
    """The bytes as a contiguous view into a larger buffer of poison bytes (0xA5: a header of
    poison decodes to large nonzero values, so a stray read shows)."""
    big, view = embed(torch.from_numpy(flat.copy()), before, after, 0xA5)
    return view.view(shape)


def table_view(rows: np.ndarray, poison_rows: int, columns: int) -> torch.Tensor:
    """The table as a contiguous view after `poison_rows` rows that point at real data."""
    poison = np.tile(np.array([[0, 8, 8, 0][:columns]], dtype=np.int64), (poison_rows, 1))
    big = torch.from_numpy(np.concatenate([poison, rows.reshape(-1, columns), poison]).reshape(-1).copy())
    return big[poison_rows * columns:poison_rows * columns + rows.size].view(-1, columns)


def row_st(numel: int, bucket_size: int) -> st.SearchStrategy:
    """(offset, length) rows: mostly inside [0, numel), sometimes wild (the kernels clamp them)."""
    offset = st.one_of(st.integers(0, numel + bucket_size), st.integers(-3, -1), edge_int_st)
    length = st.one_of(st.integers(0, bucket_size), st.integers(-3, -1), edge_int_st)
    return st.tuples(offset, length)


def run_checked(valid: bool, call, watched: list[torch.Tensor]):
    """Calls `call`; it must raise exactly when not valid, and change nothing in `watched` if it does."""
    before = [bits_of(t) for t in watched]
    if valid:
        return call()
    with pytest.raises(ERRORS):
        call()
    for t, b in zip(watched, before):
        assert torch.equal(bits_of(t), b), "an op that raised wrote to its output"
    return None


def assert_canaries(big: torch.Tensor, snapshot: torch.Tensor, begin: int, end: int) -> None:
    after = bits_of(big)
    item = big.element_size()
    assert torch.equal(after[:begin * item], snapshot[:begin * item]), "wrote before the output view"
    assert torch.equal(after[end * item:], snapshot[end * item:]), "wrote after the output view"


# ---------------------------------------------------------------------------------------------
# dequantize_into


@given(data=st.data(), bits=bits_st, bucket_size=bucket_st, num_buckets=st.integers(0, 5), dtype=dtype_st,
       mutation=st.sampled_from([None] * 8 + ["bits", "bucket_size", "payload_dtype", "payload_3d", "payload_strided",
                                              "record_size", "out_dtype", "out_strided", "too_small", "table_rows",
                                              "table_dtype", "table_strided", "host_table"]))
def test_dequantize_into_uniform(data, bits, bucket_size, num_buckets, dtype, mutation):
    rec = record_bytes(bits, bucket_size)
    flat = data.draw(records_st(num_buckets, [bits] * num_buckets, bucket_size))
    payload = as_payload(flat, (num_buckets, rec), data.draw(st.integers(0, 16)), data.draw(st.integers(0, 16)))
    use_table = data.draw(st.booleans())
    capacity = num_buckets * bucket_size
    numel = data.draw(st.integers(0, capacity + 3 * bucket_size if use_table else capacity))
    table = None
    if use_table:
        rows = np.array(data.draw(st.lists(row_st(numel, bucket_size), min_size=num_buckets, max_size=num_buckets)),
                        dtype=np.int64).reshape(-1, 2)
        table = table_view(rows, data.draw(st.integers(0, 3)), 2)
    before, after = data.draw(st.integers(0, 8)), data.draw(st.integers(0, 8))
    big_out = torch.full((before + numel + after,), CANARY, dtype=dtype)
    out = big_out[before:before + numel]
    host_table = None
    valid = mutation is None
    if mutation == "bits":
        bits = data.draw(st.sampled_from([0, 9, -1, 2**63 - 1]))
    elif mutation == "bucket_size":
        bucket_size = data.draw(st.sampled_from([0, 4, 12, -8, 2**25, 2**63 - 8]))
    elif mutation == "payload_dtype":
        payload = payload.to(torch.int8)
    elif mutation == "payload_3d":
        payload = payload.reshape(1, num_buckets, rec)
    elif mutation == "payload_strided":
        valid = num_buckets <= 1  # a [0 or 1, rec] tensor with a row stride is still contiguous
        payload = torch.cat([payload, payload], dim=1)[:, :rec]
    elif mutation == "record_size":
        payload = torch.zeros(num_buckets, rec + data.draw(st.sampled_from([-1, 1, 8])), dtype=torch.uint8)
    elif mutation == "out_dtype":
        out = out.to(data.draw(st.sampled_from([torch.float64, torch.int32, torch.uint8])))
    elif mutation == "out_strided":
        big_out = torch.full((2 * numel + 2,), CANARY, dtype=dtype)
        out = big_out[::2][:numel]
        before = 0
        valid = numel <= 1
    elif mutation == "too_small":
        if use_table:
            table = table_view(np.zeros((num_buckets + 1, 2), dtype=np.int64), 1, 2)
        else:
            numel = capacity + data.draw(st.integers(1, 9))
            big_out = torch.full((numel,), CANARY, dtype=dtype)
            out = big_out
    elif mutation == "table_rows":
        table = table_view(np.zeros((num_buckets + data.draw(st.sampled_from([-1, 1, 2])), 2), dtype=np.int64)
                           if num_buckets else np.zeros((1, 2), dtype=np.int64), 0, 2)
    elif mutation == "table_dtype":
        table = torch.zeros(num_buckets, 2, dtype=data.draw(st.sampled_from([torch.int32, torch.float64])))
    elif mutation == "table_strided":
        table = torch.zeros(num_buckets, 4, dtype=torch.int64)[:, ::2]
        valid = num_buckets == 0  # columns with stride 2: contiguous only when empty
    elif mutation == "host_table":
        host_table = torch.zeros(num_buckets, 2, dtype=torch.int64)
    note(f"valid={valid} numel={numel} table={None if table is None else table.tolist()}")

    def call():
        OPS.dequantize_into(payload, out, table, bits, bucket_size, host_table)

    snapshot = bits_of(big_out)
    expected = (dequantize_into_ref(payload.numpy(), out, None if table is None else table.numpy(), bits, bucket_size)
                if valid else None)
    run_checked(valid, call, [big_out])
    if valid:
        assert_same_values(out, expected)
        assert_canaries(big_out, snapshot, before, before + numel)


@st.composite
def mixed_rows_st(draw, numel: int, bucket_size: int, count: int) -> np.ndarray:
    rows = []
    for _ in range(count):
        offset = draw(st.one_of(st.integers(0, numel + bucket_size), st.sampled_from([2**62, 2**63 - 1])))
        length = draw(st.integers(0, bucket_size))
        rows.append((offset, length, draw(bits_st)))
    return packed_mixed_table(rows, bucket_size)


MIXED_TABLE_MUTATIONS = ["row_bits", "row_offset", "row_length", "byte_offset", "host_changed", "host_shape",
                         "host_dtype", "table_dtype", "bits_arg", "bucket_size"]


def mutate_mixed_table(data, table: np.ndarray, mutation: Optional[str], bucket_size: int):
    """Applies a table mutation (if it is one and the table has rows). Returns (table as passed,
    its rows as numpy, host_table, bits argument, whether a mutation was applied)."""
    table = table.copy()
    host = torch.from_numpy(table.copy()) if data.draw(st.booleans()) else None
    if mutation not in MIXED_TABLE_MUTATIONS or mutation == "bucket_size" or not table.shape[0]:
        return torch.from_numpy(table), table, host, 0, False
    r = data.draw(st.integers(0, table.shape[0] - 1))
    bits_arg = 0
    passed = None
    if mutation == "row_bits":
        table[r, 2] = data.draw(st.sampled_from([0, 9, -1, 2**63 - 1]))
    elif mutation == "row_offset":
        table[r, 0] = data.draw(st.sampled_from([-1, -(2**63)]))
    elif mutation == "row_length":
        table[r, 1] = data.draw(st.sampled_from([-1, bucket_size + 1, 2**63 - 1, -(2**63)]))
    elif mutation == "byte_offset":
        table[r, 3] += data.draw(st.sampled_from([-1, 1, 2**62, -(2**62)]))
    elif mutation == "host_changed":
        # A host_table that disagrees with the table (issue 11, defect 2): must raise.
        host = torch.from_numpy(table.copy())
        host[r, 2] = 1 + host[r, 2] % 8
        host[:, 3] = torch.from_numpy(packed_mixed_table(host[:, :3].tolist(), bucket_size)[:, 3])
    elif mutation == "host_shape":
        host = torch.from_numpy(table.copy())[:-1]
    elif mutation == "host_dtype":
        host = torch.from_numpy(table.copy()).int()
    elif mutation == "table_dtype":
        passed = torch.from_numpy(table.copy()).int()
    elif mutation == "bits_arg":
        bits_arg = data.draw(st.sampled_from([1, 4, 8, -1]))
    if host is not None and mutation in ("row_bits", "row_offset", "row_length", "byte_offset"):
        host = torch.from_numpy(table.copy())  # host_table mirrors the (mutated) table
    return (torch.from_numpy(table) if passed is None else passed), table, host, bits_arg, True


@given(data=st.data(), bucket_size=bucket_st, count=st.integers(0, 5), dtype=dtype_st,
       mutation=st.sampled_from([None] * 6 + MIXED_TABLE_MUTATIONS + ["payload_len", "payload_2d", "out_strided"]))
def test_dequantize_into_mixed(data, bucket_size, count, dtype, mutation):
    numel = data.draw(st.integers(0, (count + 2) * bucket_size))
    table_np = data.draw(mixed_rows_st(numel, bucket_size, count))
    total = mixed_total_bytes(table_np, bucket_size)
    flat = data.draw(records_st(count, [int(b) for b in table_np[:, 2]], bucket_size))
    passed, table_np, host, bits_arg, applied = mutate_mixed_table(data, table_np, mutation, bucket_size)
    valid = mutation is None or (mutation in MIXED_TABLE_MUTATIONS and mutation != "bucket_size" and not applied)
    bucket_size_arg = data.draw(st.sampled_from([0, 12, 2**25])) if mutation == "bucket_size" else bucket_size
    if mutation == "payload_len":
        flat = np.concatenate([flat, np.zeros(1, np.uint8)]) if data.draw(st.booleans()) or not total else flat[:-1]
    payload = as_payload(flat, (flat.size,), data.draw(st.integers(0, 16)), data.draw(st.integers(0, 16)))
    if mutation == "payload_2d":
        payload = payload.view(1, -1)
    table = table_view(table_np, data.draw(st.integers(0, 2)), 4) if passed.dtype == torch.int64 else passed
    before, after = data.draw(st.integers(0, 8)), data.draw(st.integers(0, 8))
    big_out = torch.full((before + numel + after,), CANARY, dtype=dtype)
    out = big_out[before:before + numel]
    if mutation == "out_strided":
        big_out = torch.full((2 * numel + 2,), CANARY, dtype=dtype)
        out = big_out[::2][:numel]
        before = 0
        valid = numel <= 1
    note(f"valid={valid} table={table_np.tolist()} host={None if host is None else host.tolist()}")

    expected = mixed_dequantize_into_ref(payload.numpy(), out, table_np, bucket_size) if valid else None
    snapshot = bits_of(big_out)
    run_checked(valid, lambda: OPS.dequantize_into(payload, out, table, bits_arg, bucket_size_arg, host), [big_out])
    if valid:
        assert_same_values(out, expected)
        assert_canaries(big_out, snapshot, before, before + numel)


# ---------------------------------------------------------------------------------------------
# dequantize_sum


def init_view(data, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """init as a view into poison (contiguous) or as a strided view (the op copies it)."""
    values = torch.tensor(data.draw(st.lists(st.floats(-100, 100, width=16), min_size=numel, max_size=numel)),
                          dtype=torch.float32).to(dtype)
    if data.draw(st.booleans()):
        return embed(values, data.draw(st.integers(0, 9)), data.draw(st.integers(0, 9)), POISON)[1]
    big = torch.full((2 * numel,), POISON, dtype=dtype)
    big[::2] = values
    return big[::2]


@given(data=st.data(), bits=bits_st, bucket_size=bucket_st, sources=st.integers(1, 3), num_buckets=st.integers(0, 4),
       mutation=st.sampled_from([None] * 8 + ["bits", "bucket_size", "payload_2d", "payload_strided", "record_size",
                                              "init_dtype", "table_without_init", "begin_negative", "begin_past_rows",
                                              "begin_overflow", "table_strided", "host_table"]))
def test_dequantize_sum_uniform(data, bits, bucket_size, sources, num_buckets, mutation):
    rec = record_bytes(bits, bucket_size)
    flat = data.draw(records_st(sources * num_buckets, [bits] * (sources * num_buckets), bucket_size))
    payloads = as_payload(flat, (sources, num_buckets, rec), data.draw(st.integers(0, 16)), data.draw(st.integers(0, 16)))
    use_init = data.draw(st.booleans())
    use_table = use_init and data.draw(st.booleans())
    init_numel = data.draw(st.integers(0, (num_buckets + 2) * bucket_size))
    init = init_view(data, init_numel, data.draw(dtype_st)) if use_init else None
    table, table_np, begin = None, None, 0
    if use_table:
        rows = data.draw(st.integers(num_buckets, num_buckets + 3))
        table_np = np.array(data.draw(st.lists(row_st(init_numel, bucket_size), min_size=rows, max_size=rows)),
                            dtype=np.int64).reshape(-1, 2)
        table = table_view(table_np, data.draw(st.integers(0, 3)), 2)
        begin = data.draw(st.integers(0, rows - num_buckets))
    elif use_init:
        # Without a table init is read in the identity layout: buckets past its end read nothing.
        begin = data.draw(st.one_of(st.integers(0, 4), st.sampled_from([2**40, 2**59, 2**60, 2**61, 2**62, 2**63 - 1])))
    else:
        begin = data.draw(st.one_of(st.integers(-4, 4), edge_int_st))  # unused without init
    host_table = None
    valid = mutation is None
    if mutation == "bits":
        bits = data.draw(st.sampled_from([0, 9, 2**63 - 1, -(2**63)]))
    elif mutation == "bucket_size":
        bucket_size = data.draw(st.sampled_from([0, 4, 2**25]))
    elif mutation == "payload_2d":
        payloads = payloads.reshape(sources * num_buckets, rec)
    elif mutation == "payload_strided":
        payloads = torch.cat([payloads, payloads], dim=2)[:, :, :rec]
        valid = sources * num_buckets <= 1
    elif mutation == "record_size":
        payloads = torch.zeros(sources, num_buckets, rec + 1, dtype=torch.uint8)
    elif mutation == "init_dtype":
        init = torch.zeros(init_numel, dtype=data.draw(st.sampled_from([torch.float64, torch.int64])))
        valid = False
    elif mutation == "table_without_init":
        init, table = None, torch.zeros(num_buckets, 2, dtype=torch.int64)
    elif mutation == "begin_negative":
        begin = data.draw(st.sampled_from([-1, -(2**63)]))
        valid = not use_init
    elif mutation == "begin_past_rows":
        valid = not use_table
        if use_table:
            begin = table_np.shape[0] - num_buckets + 1
    elif mutation == "begin_overflow":
        # init_bucket_begin + num_buckets overflows int64 (issue 11, defect 1): must raise.
        valid = not use_table
        if use_table:
            begin = 2**63 - data.draw(st.integers(1, 3))
    elif mutation == "table_strided":
        table = torch.zeros(max(num_buckets, 1) + 1, 4, dtype=torch.int64)[:, ::2] if use_init else None
        valid = not use_init
    elif mutation == "host_table":
        host_table = torch.zeros(num_buckets, 2, dtype=torch.int64)
    if valid and init is not None and table is None and begin > (2**63 - 1) // bucket_size - num_buckets:
        valid = False  # element positions (begin + k) * bucket_size would pass 2^63 - 1: the op refuses
    note(f"valid={valid} begin={begin} init={None if init is None else init.tolist()} "
         f"table={None if table is None else table.tolist()}")

    expected = (dequantize_sum_ref(payloads.numpy(), init, table_np, begin, bits, bucket_size) if valid else None)
    result = run_checked(valid, lambda: OPS.dequantize_sum(payloads, init, table, begin, bits, bucket_size, host_table),
                         [])
    if valid:
        assert result.dtype == torch.float32
        assert_same_values(result, torch.from_numpy(expected))


@given(data=st.data(), bucket_size=bucket_st, count=st.integers(0, 6), sources=st.integers(1, 3),
       mutation=st.sampled_from([None] * 6 + MIXED_TABLE_MUTATIONS + ["payload_len", "begin", "begin_overflow",
                                                                      "payload_3d"]))
def test_dequantize_sum_mixed(data, bucket_size, count, sources, mutation):
    use_init = data.draw(st.booleans())
    init_numel = data.draw(st.integers(0, (count + 2) * bucket_size))
    table_np = data.draw(mixed_rows_st(init_numel, bucket_size, count))
    begin = data.draw(st.integers(0, count))
    span = data.draw(st.integers(0, count - begin))
    first = int(table_np[begin, 3]) if begin < count else mixed_total_bytes(table_np, bucket_size)
    end = int(table_np[begin + span, 3]) if begin + span < count else mixed_total_bytes(table_np, bucket_size)
    bits_list = [int(b) for b in table_np[begin:begin + span, 2]]
    per_source = [data.draw(records_st(span, bits_list, bucket_size)) for _ in range(sources)]
    flat = np.concatenate(per_source) if per_source else np.zeros(0, np.uint8)
    assert flat.size == sources * (end - first)
    passed, table_np, host, bits_arg, applied = mutate_mixed_table(data, table_np, mutation, bucket_size)
    valid = mutation is None or (mutation in MIXED_TABLE_MUTATIONS and mutation != "bucket_size" and not applied)
    bucket_size_arg = data.draw(st.sampled_from([0, 12, 2**25])) if mutation == "bucket_size" else bucket_size
    shape = (sources, end - first)
    if mutation == "payload_len":
        extra = data.draw(st.sampled_from([1, -1, 8]))
        if end - first + extra < 0:
            extra = 1
        # A length that ends on another row boundary is valid (it spans more or fewer rows).
        valid = mixed_rows_spanning(table_np, begin, end - first + extra, bucket_size) is not None
        flat = np.concatenate([np.zeros((sources, end - first + extra), np.uint8)]).reshape(-1)
        shape = (sources, end - first + extra)
    elif mutation == "begin":
        begin = data.draw(st.sampled_from([-1, count + 1, -(2**63)]))
    elif mutation == "begin_overflow":
        begin = 2**63 - data.draw(st.integers(1, 2))
    payloads = as_payload(flat, shape, data.draw(st.integers(0, 16)), data.draw(st.integers(0, 16)))
    if mutation == "payload_3d":
        payloads = payloads.view(sources, 1, -1)
    init = init_view(data, init_numel, data.draw(dtype_st)) if use_init else None
    table = table_view(table_np, data.draw(st.integers(0, 2)), 4) if passed.dtype == torch.int64 else passed
    note(f"valid={valid} begin={begin} span={span} table={table_np.tolist()}")

    expected = mixed_dequantize_sum_ref(payloads.numpy(), init, table_np, begin, bucket_size) if valid else None
    result = run_checked(valid, lambda: OPS.dequantize_sum(payloads, init, table, begin, bits_arg, bucket_size_arg,
                                                           host), [])
    if valid:
        assert_same_values(result, torch.from_numpy(expected))


# ---------------------------------------------------------------------------------------------
# quantize (the encoder: its bounds, and that it reads and writes nothing outside its tensors)


def quantize_rows_ref(v: torch.Tensor, residual: Optional[torch.Tensor], ranges: list[tuple[int, int]],
                      bits_list: list[int], bucket_size: int, stochastic: bool, seed: int,
                      skipped: list[bool]) -> tuple[np.ndarray, Optional[torch.Tensor]]:
    """Flat payload and new residual of quantizing the buckets `ranges` (clamped (offset, length))
    of x, in order, bucket k with bits_list[k]: the format's encoder (quant_reference) per bucket."""
    x = v.detach().reshape(-1).float().clone()
    res = None if residual is None else residual.detach().reshape(-1).clone()
    records = []
    for k, ((offset, length), bits) in enumerate(zip(ranges, bits_list)):
        if skipped[k] or length == 0:
            records.append(np.zeros(record_bytes(bits, bucket_size), np.uint8))
            continue
        values = x[offset:offset + length].clone()
        if res is not None:
            values = values + res[offset:offset + length]
        record = quantize_reference(values, bits, bucket_size, stochastic, seed, first_bucket=k).reshape(-1)
        records.append(record)
        if res is not None and torch.isfinite(values).all():
            decoded = torch.from_numpy(decode_records(record, bits, bucket_size)[0, :length])
            res[offset:offset + length] = values - decoded
    flat = np.concatenate(records) if records else np.zeros(0, np.uint8)
    return flat, res


@given(data=st.data(), bucket_size=bucket_st, dtype=dtype_st, stochastic=st.booleans(),
       seed=st.one_of(st.integers(0, 2**32), edge_int_st), layout=st.sampled_from(["identity", "table", "mixed", "chunk"]),
       mutation=st.sampled_from([None] * 8 + ["bits", "bucket_size", "x_dtype", "residual_dtype", "residual_numel",
                                              "residual_strided", "num_buckets_small", "num_buckets_huge",
                                              "chunk_overflow", "host_changed", "table_strided"]))
def test_quantize_bounds(data, bucket_size, dtype, stochastic, seed, layout, mutation):
    numel = data.draw(st.integers(0, 4 * bucket_size))
    values = torch.tensor(data.draw(st.lists(st.floats(-1e4, 1e4, width=16), min_size=numel, max_size=numel)),
                          dtype=torch.float32).to(dtype)
    if data.draw(st.booleans()):
        x = embed(values, data.draw(st.integers(0, 9)), data.draw(st.integers(0, 9)), POISON)[1]
    else:
        big = torch.full((2 * numel,), POISON, dtype=dtype)
        big[::2] = values
        x = big[::2]  # non-contiguous: the op copies it
    bits = data.draw(bits_st)
    needed = -(-numel // bucket_size)
    table = host = None
    chunk_row_begin = -1
    skip_begin, skip_end = data.draw(st.one_of(st.tuples(st.integers(-2, 6), st.integers(-2, 6)),
                                               st.tuples(edge_int_st, edge_int_st)))
    if layout == "identity":
        num_buckets = data.draw(st.sampled_from([-1, needed, needed + 1, needed + 3]))
        count = needed if num_buckets < 0 else num_buckets
        ranges = [(min(k * bucket_size, numel), max(0, min(bucket_size, numel - k * bucket_size))) for k in range(count)]
        bits_list = [bits] * count
    elif layout == "table":
        count = data.draw(st.integers(0, 5))
        rows = np.array(data.draw(st.lists(row_st(numel, bucket_size), min_size=count, max_size=count)),
                        dtype=np.int64).reshape(-1, 2)
        table = table_view(rows, data.draw(st.integers(0, 2)), 2)
        num_buckets = data.draw(st.sampled_from([-1, count]))
        ranges = [clamp_range(int(o), int(n), numel, bucket_size) for o, n in rows]
        bits_list = [bits] * count
    else:
        count = data.draw(st.integers(0, 5)) + (needed if layout == "chunk" else 0)
        table_np = data.draw(mixed_rows_st(numel, bucket_size, count))
        host = torch.from_numpy(table_np.copy()) if data.draw(st.booleans()) else None
        table = table_view(table_np, data.draw(st.integers(0, 2)), 4)
        bits = 0
        if layout == "mixed":
            num_buckets = data.draw(st.sampled_from([-1, count]))
            ranges = [clamp_range(int(o), int(n), numel, bucket_size) for o, n, _, _ in table_np]
            bits_list = [int(b) for b in table_np[:, 2]]
        else:
            chunk_row_begin = data.draw(st.integers(0, count - needed))
            num_buckets = data.draw(st.sampled_from([-1] + list(range(needed, count - chunk_row_begin + 1))))
            nb = needed if num_buckets < 0 else num_buckets
            rows = table_np[chunk_row_begin:chunk_row_begin + nb]
            ranges = [clamp_range(k * bucket_size, int(rows[k, 1]), numel, bucket_size) for k in range(nb)]
            bits_list = [int(b) for b in rows[:, 2]]
    residual, big_res = None, None
    res_before = res_after = 0
    if data.draw(st.booleans()):
        res_before, res_after = data.draw(st.integers(0, 8)), data.draw(st.integers(0, 8))
        init_res = torch.tensor(data.draw(st.lists(st.floats(-1, 1, width=32), min_size=numel, max_size=numel)),
                                dtype=torch.float32)
        big_res, residual = embed(init_res, res_before, res_after, CANARY)
    valid = mutation is None
    mixed = layout in ("mixed", "chunk")
    if mutation == "bits":
        bits = data.draw(st.sampled_from([-1, 9, 2**63 - 1] + ([] if mixed else [0])))
    elif mutation == "bucket_size":
        bucket_size = data.draw(st.sampled_from([0, 4, 2**25]))
    elif mutation == "x_dtype":
        x = x.to(data.draw(st.sampled_from([torch.float64, torch.int32])))
    elif mutation == "residual_dtype":
        residual = None if residual is None else residual.double()
        valid = residual is None
    elif mutation == "residual_numel":
        big_res = torch.full((numel + 3,), CANARY)
        residual = big_res[:numel + 1]
    elif mutation == "residual_strided":
        big_res = torch.full((2 * numel + 2,), CANARY)
        residual = big_res[::2][:numel]
        res_before, res_after = 0, 0
        valid = numel <= 1
    elif mutation == "num_buckets_small":
        valid = not (layout in ("identity", "chunk") and needed > 0) and not (layout in ("table", "mixed") and count > 0)
        if layout in ("identity", "chunk"):
            num_buckets = needed - 1 if needed > 0 else num_buckets
        else:
            num_buckets = count - 1 if count > 0 else num_buckets
    elif mutation == "num_buckets_huge":
        num_buckets = data.draw(st.sampled_from([2**62, 2**63 - 1]))
    elif mutation == "chunk_overflow":
        # chunk_row_begin + num_buckets overflows int64 (issue 11, defect 1): must raise.
        valid = False
        chunk_row_begin = 2**63 - data.draw(st.integers(1, 2))
    elif mutation == "host_changed":
        # A CPU host_table that disagrees with bucket_table (issue 11, defect 2): must raise.
        valid = False
        if mixed and count:
            host = table.clone()
            host[0, 2] = 1 + host[0, 2] % 8
            host[:, 3] = torch.from_numpy(packed_mixed_table(host[:, :3].tolist(), bucket_size)[:, 3])
        elif mixed:
            valid = True
        else:
            host = torch.zeros(1, 4, dtype=torch.int64)
    elif mutation == "table_strided":
        if table is None:
            table = torch.zeros(needed + 1, 4, dtype=torch.int64)[:, ::2]
            num_buckets = -1
        else:
            table = torch.cat([table, table], dim=1)[:, ::2] if table.shape[0] > 1 else table
            valid = table.shape[0] <= 1
    note(f"valid={valid} layout={layout} x={x.tolist()} table={None if table is None else table.tolist()} "
         f"num_buckets={num_buckets} chunk_row_begin={chunk_row_begin} skip=({skip_begin}, {skip_end})")

    expected = expected_res = None
    if valid:
        skipped = [skip_begin <= k < skip_end for k in range(len(ranges))]
        expected, expected_res = quantize_rows_ref(x, residual, ranges, bits_list, bucket_size, stochastic, seed,
                                                   skipped)
    res_snapshot = None if big_res is None else bits_of(big_res)
    payload = run_checked(valid, lambda: OPS.quantize(x, residual, table, num_buckets, bits, bucket_size, stochastic,
                                                      seed, skip_begin, skip_end, host, chunk_row_begin),
                          [] if big_res is None else [big_res])
    if valid:
        np.testing.assert_array_equal(payload.reshape(-1).numpy(), expected)
        if residual is not None:
            assert_same_values(residual, expected_res)
            assert_canaries(big_res, res_snapshot, res_before, res_before + numel)


@given(dtype=dtype_st, bits=bits_st, bucket_size=bucket_st, stochastic=st.booleans(),
       values=st.lists(st.sampled_from([3.4028234663852886e38, -3.4028234663852886e38, 3.0e38, -1.0e38, 65504.0,
                                        -65504.0, 3.3895313892515355e38, -3.3895313892515355e38, 0.0, 1.0, -1.0]),
                       min_size=1, max_size=40))
def test_extreme_finite_values_decode_finite(dtype, bits, bucket_size, stochastic, values):
    """Issue 11, defect 3: a bucket of finite values whose range overflows float32 decodes finite."""
    x = torch.tensor(values, dtype=torch.float32)
    x = x.clamp(torch.finfo(dtype).min, torch.finfo(dtype).max).to(dtype)
    q = ops.quantize(x, bits=bits, bucket_size=bucket_size, stochastic=stochastic, seed=1)
    y = ops.dequantize(q)
    assert torch.isfinite(y).all(), f"{x.tolist()} decoded to {y.tolist()}"
    total = ops.dequantize_sum([q], bits=bits, bucket_size=bucket_size, numel=x.numel())
    assert torch.isfinite(total).all()


@given(name=st.sampled_from(["quantize", "record_bytes", "dequantize_sum", "bucket_table"]),
       which=st.sampled_from(["bits", "bucket_size"]), flag=st.booleans())
def test_public_api_rejects_bools(name, which, flag):
    """Issue 11, item 7: a bool is not a bit width (nor a bucket size) in the public wrappers."""
    kwargs = {"bits": 4, "bucket_size": 8}
    kwargs[which] = flag
    x = torch.ones(16)
    with pytest.raises(ValueError):
        if name == "quantize":
            ops.quantize(x, **kwargs)
        elif name == "record_bytes":
            ops.record_bytes(kwargs["bits"], kwargs["bucket_size"])
        elif name == "dequantize_sum":
            ops.dequantize_sum(torch.zeros(1, 2, 8 + int(kwargs["bits"]), dtype=torch.uint8), numel=16, **kwargs)
        else:
            ops.bucket_table([(0, 16)], kwargs["bucket_size"], bits=[kwargs["bits"]])


@pytest.mark.parametrize("begin", [2**40, 2**59, 2**60, 2**61 + 1, 2**63 - 1])
def test_identity_layout_huge_init_bucket_begin(begin):
    """Without a bucket_table, bucket k of init starts at (init_bucket_begin + k) * bucket_size:
    past init's end init adds nothing, and where that position passes 2^63 - 1 the op refuses.
    Found by test_dequantize_sum_uniform: the product (and the sum) wrapped around in int64, and
    the op read init's first elements instead."""
    init = torch.tensor([1.0, 2.0, 3.0])
    zero_payloads = torch.zeros(1, 2, record_bytes(1, 8), dtype=torch.uint8)
    if (begin + 2) * 8 > 2**63 - 1:
        with pytest.raises(RuntimeError, match=r"past 2\^63 - 1"):
            OPS.dequantize_sum(zero_payloads, init, None, begin, 1, 8)
        return
    out = OPS.dequantize_sum(zero_payloads, init, None, begin, 1, 8)
    assert torch.equal(out, torch.zeros(16))
