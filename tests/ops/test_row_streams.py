"""quantize's row_streams: stochastic rounding drawn per bucket from a caller-given Philox start.

Without row_streams, element j of payload bucket k draws Philox index k * B + j, so a layer's bytes
depend on where it sits in the payload. With row_streams[k] the draw is row_streams[k] + j: a caller
that derives the starts from (parameter, element offset) gets bytes that do not change when the
layer's neighbours do. CPU here; tests/ops/test_cuda_ops.py checks CUDA against these bytes.
"""

import math

import numpy as np
import pytest
import torch

from pycomm import ops
from pycomm.ops.quantization import quantize_records
from quant_reference import bucket_units, quantize_reference

Q = torch.ops.pycomm
INT64_MAX = 2**63 - 1


def default_streams(num_buckets: int, bucket_size: int) -> torch.Tensor:
    """The starts the op uses without row_streams: each bucket's position in the payload."""
    return torch.arange(num_buckets, dtype=torch.int64) * bucket_size


def layer_streams(table: torch.Tensor, layers: list[tuple[int, int]], bases: list[int]) -> torch.Tensor:
    """Per-parameter starts: a row inside layer i starts at bases[i] + (its offset inside the layer).
    Padding rows (length 0, outside every layer) get 0."""
    streams = []
    for offset, length, *_ in table.tolist():
        start = 0
        for (lo, n), base in zip(layers, bases):
            if length and lo <= offset < lo + n:
                start = base + (offset - lo)
        streams.append(start)
    return torch.tensor(streams, dtype=torch.int64)


def quantize_both_ways(x, table, bits, bucket, seed, streams, **kw):
    """(payload, residual) without and with row_streams = streams; the residual starts equal."""
    out = []
    for s in (None, streams):
        residual = torch.linspace(-0.01, 0.01, x.numel())
        payload = quantize_records(x, bits=bits, bucket_size=bucket, stochastic=True, seed=seed, residual=residual,
                                   bucket_table=table, row_streams=s, **kw)
        out.append((payload, residual))
    return out


# ---- (1) the default starts reproduce today's bytes ----------------------------------------------

@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_default_streams_give_the_same_bytes_plain(bits):
    B = 64
    x = torch.randn(1000, generator=torch.Generator().manual_seed(bits)) * 2
    for num_buckets, skip in [(-1, (0, 0)), (19, (2, 5))]:  # padded with empty buckets, and a skip range
        nb = num_buckets if num_buckets >= 0 else -(-x.numel() // B)
        (p0, r0), (p1, r1) = quantize_both_ways(x, None, bits, B, 7, default_streams(nb, B), num_buckets=num_buckets,
                                                skip_begin=skip[0], skip_end=skip[1])
        assert torch.equal(p0, p1) and torch.equal(r0, r1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_streams_give_the_same_bytes_table(dtype):
    B = 64
    layers = [(0, 300), (310, 5), (320, 700)]
    table = ops.bucket_table(layers, B, pad_to_multiple=4)
    x = (torch.randn(1100, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    (p0, r0), (p1, r1) = quantize_both_ways(x, table, 4, B, -3, default_streams(table.shape[0], B),
                                            skip_begin=1, skip_end=3)
    assert torch.equal(p0, p1) and torch.equal(r0, r1)


def test_default_streams_give_the_same_bytes_mixed_and_chunk():
    B, world = 64, 3
    layers = [(0, 300), (310, 5), (320, 700), (1020, 64)]
    table = ops.bucket_table(layers, B, pad_to_multiple=world, bits=[2, 8, 5, 3])
    x = torch.randn(1100, generator=torch.Generator().manual_seed(2))
    nb = table.shape[0]
    (p0, r0), (p1, r1) = quantize_both_ways(x, table, 0, B, 11, default_streams(nb, B), skip_begin=2, skip_end=4)
    assert torch.equal(p0, p1) and torch.equal(r0, r1)
    # A reduced chunk: bucket k of the chunk is elements [k*B, (k+1)*B) with the bits of row first + k.
    per = nb // world
    chunk = torch.randn(per * B, generator=torch.Generator().manual_seed(3))
    for c in range(world):
        (p0, r0), (p1, r1) = quantize_both_ways(chunk, table, 0, B, 5, default_streams(per, B), num_buckets=per,
                                                host_table=table, chunk_row_begin=c * per)
        assert torch.equal(p0, p1) and torch.equal(r0, r1), c


# ---- exact Philox indices against the numpy reference ----------------------------------------------

@pytest.mark.parametrize("bits", [2, 5, 8])
def test_bucket_k_draws_philox_indices_from_its_stream(bits):
    B = 64
    x = torch.randn(5 * B - 9, generator=torch.Generator().manual_seed(bits)) + 0.3
    nb = 5
    streams = torch.tensor([8, 0, 2**40 + 24, INT64_MAX - B - 7, 3 * B], dtype=torch.int64)
    assert all(s % 8 == 0 for s in streams.tolist())
    payload = quantize_records(x, bits=bits, bucket_size=B, stochastic=True, seed=2**62 + 5, row_streams=streams)
    for k in range(nb):
        expected = quantize_reference(x[k * B:(k + 1) * B], bits, B, True, 2**62 + 5,
                                      stream_start=int(streams[k]))
        assert np.array_equal(payload[k].numpy(), expected[0]), k


# ---- (2) a layer's records do not depend on its neighbours -------------------------------------

def records_by_offset(payload: torch.Tensor, table: torch.Tensor, lo: int, n: int, bucket: int) -> dict:
    """{offset inside layer [lo, lo + n): record bytes} for the table rows that hold the layer
    (a mixed table may interleave layers' rows to balance its chunks)."""
    flat = payload.reshape(-1)
    out = {}
    for k, row in enumerate(table.tolist()):
        offset, length = row[0], row[1]
        if length == 0 or not lo <= offset < lo + n:
            continue
        if len(row) == 4:
            start, size = row[3], ops.record_bytes(row[2], bucket)
        else:
            size = payload.shape[1]
            start = k * size
        out[offset - lo] = flat[start:start + size]
    return out


@pytest.mark.parametrize("mixed", [False, True], ids=["table", "mixed"])
def test_layer_records_do_not_depend_on_neighbours(mixed):
    B, seed = 64, 21
    a, b = 200, 333                      # layer A: elements [0, a); layer B: [a, a + b)
    bases = [0, 2**33]                   # per-parameter stream starts (multiples of 8)
    gen = torch.Generator().manual_seed(4)
    xa, xb = torch.randn(a, generator=gen), torch.randn(b, generator=gen) * 5
    x = torch.cat([xa, xb])
    # Two chunks: the mixed table interleaves A's and B's rows, so B's rows move inside the payload.
    table = ops.bucket_table([(0, a), (a, b)], B, pad_to_multiple=2, **(dict(bits=[3, 5]) if mixed else {}))
    table_b = ops.bucket_table([(0, b)], B, pad_to_multiple=1, **(dict(bits=[5]) if mixed else {}))
    streams = layer_streams(table, [(0, a), (a, b)], bases)
    streams_b = layer_streams(table_b, [(0, b)], bases[1:])
    bits = 0 if mixed else 4

    def run(use_streams):
        res = torch.full((a + b,), 0.003)
        res_b = torch.full((b,), 0.003)
        joint = quantize_records(x, bits=bits, bucket_size=B, stochastic=True, seed=seed, residual=res,
                                 bucket_table=table, row_streams=streams if use_streams else None)
        alone = quantize_records(xb, bits=bits, bucket_size=B, stochastic=True, seed=seed, residual=res_b,
                                 bucket_table=table_b, row_streams=streams_b if use_streams else None)
        return (records_by_offset(joint, table, a, b, B), records_by_offset(alone, table_b, 0, b, B),
                res[a:], res_b)

    joint, alone, res_joint, res_alone = run(use_streams=True)
    assert sorted(joint) == sorted(alone) == list(range(0, b, B))
    for offset in joint:
        assert torch.equal(joint[offset], alone[offset]), offset
    assert torch.equal(res_joint, res_alone)
    # Without row_streams B's draws follow its place in the payload, so its bytes change with A:
    # the comparison above is not vacuous.
    joint0, alone0, res_joint0, res_alone0 = run(use_streams=False)
    assert any(not torch.equal(joint0[o], alone0[o]) for o in joint0)
    assert not torch.equal(res_joint0, res_alone0)


# ---- (3) bad row_streams -----------------------------------------------------------------------------

def test_bad_row_streams_raise_clear_errors():
    B = 64
    x = torch.randn(300)
    nb = -(-300 // B)

    def q(streams, **kw):
        return quantize_records(x, bits=4, bucket_size=B, stochastic=True, seed=0, row_streams=streams, **kw)

    good = default_streams(nb, B)
    with pytest.raises(RuntimeError, match="row_streams must be a contiguous 1-D int64"):
        q(good.to(torch.int32))
    with pytest.raises(RuntimeError, match="row_streams must be a contiguous 1-D int64"):
        q(good.view(1, -1))
    with pytest.raises(RuntimeError, match="row_streams must be a contiguous 1-D int64"):
        q((torch.arange(2 * nb, dtype=torch.int64) * B)[::2])
    with pytest.raises(RuntimeError, match=f"row_streams has {nb - 1} entries but the payload has {nb} buckets"):
        q(good[:-1])
    with pytest.raises(RuntimeError, match=f"row_streams has {nb} entries but the payload has {nb + 2} buckets"):
        q(good, num_buckets=nb + 2)
    for bad, k in [(-8, 1), (12, 2)]:
        s = good.clone()
        s[k] = bad
        with pytest.raises(RuntimeError, match=rf"row_streams\[{k}\] = {bad}; entries must be non-negative "
                                               "multiples of 8"):
            q(s)
    # Overflow: the last entry that fits is the largest multiple of 8 at most 2^63 - 1 - B.
    last_ok = (INT64_MAX - B) // 8 * 8
    s = good.clone()
    s[3] = last_ok
    q(s)
    s[3] = last_ok + 8
    with pytest.raises(RuntimeError, match=r"row_streams\[3\] = .* overflows int64 with bucket_size 64"):
        q(s)
    # The checks hold for round-to-nearest too (the values are ignored there, the argument is still wrong).
    with pytest.raises(RuntimeError, match="non-negative multiples of 8"):
        quantize_records(x, bits=4, bucket_size=B, stochastic=False, seed=0, row_streams=torch.full((nb,), 4))
    # Mixed tables count payload buckets: table rows, or the chunk's buckets.
    table = ops.bucket_table([(0, 100), (100, 200)], B, pad_to_multiple=2, bits=[3, 6])
    with pytest.raises(RuntimeError, match=f"but the payload has {table.shape[0]} buckets"):
        quantize_records(x, bits=0, bucket_size=B, stochastic=True, seed=0, bucket_table=table,
                         row_streams=default_streams(table.shape[0] + 1, B))
    per = table.shape[0] // 2
    with pytest.raises(RuntimeError, match=f"row_streams has {table.shape[0]} entries but the payload has {per}"):
        quantize_records(torch.randn(per * B), bits=0, bucket_size=B, stochastic=True, seed=0, bucket_table=table,
                         num_buckets=per, chunk_row_begin=per, row_streams=default_streams(table.shape[0], B))


def test_round_to_nearest_ignores_row_streams():
    x = torch.randn(500, generator=torch.Generator().manual_seed(8))
    plain = quantize_records(x, bits=3, bucket_size=64, stochastic=False, seed=0)
    streams = torch.arange(8, dtype=torch.int64) * 1000 * 8
    assert torch.equal(plain, quantize_records(x, bits=3, bucket_size=64, stochastic=False, seed=0,
                                               row_streams=streams))


# ---- (4) unbiased with streams ------------------------------------------------------------------------

def test_stochastic_rounding_with_streams_is_unbiased():
    # As test_quantize_ops.test_stochastic_rounding_is_unbiased: 5 sigma per element and for the mean.
    S, n, bits, B = 300, 2048, 2, 512
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    streams = torch.tensor([2**40, 8, 2**20 + 64, 5 * B], dtype=torch.int64)
    acc = torch.zeros(n, dtype=torch.float64)
    out = torch.empty(n)
    for seed in range(S):
        payload = quantize_records(x, bits=bits, bucket_size=B, stochastic=True, seed=seed, row_streams=streams)
        Q.dequantize_into(payload, out, None, bits, B)
        acc += out.double()
    err = acc / S - x.double()
    sigma = bucket_units(x.double(), bits, B) / (2 * math.sqrt(S))
    assert torch.all(err.abs() <= 5 * sigma + 1e-7)
    assert abs(err.mean().item()) <= 5 * sigma.mean().item() / math.sqrt(n)
    # The streams change the draws (not a relabelled copy of the default ones).
    default = quantize_records(x, bits=bits, bucket_size=B, stochastic=True, seed=0)
    assert not torch.equal(default, quantize_records(x, bits=bits, bucket_size=B, stochastic=True, seed=0,
                                                     row_streams=streams))
