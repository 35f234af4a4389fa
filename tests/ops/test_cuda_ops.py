"""CUDA quantization ops against the CPU ops: identical bytes, residuals and values.

The CPU kernels (csrc/cpu/quantize_cpu.cpp) are the reference; the CUDA kernels
(csrc/cuda/) must give the same payload bytes and residual updates for the same
input and seed, and the same decoded values and sums. Float outputs are compared
bit for bit (so -0.0 != +0.0); only where both sides are NaN may the NaN bits
differ. Runs only on a machine with a GPU and a CUDA build of pycomm.
"""

import pytest
import torch

import pycomm
from pycomm import ops

from cuda_support import REQUIRES_CUDA, assert_identical

pytestmark = REQUIRES_CUDA

Q = torch.ops.pycomm
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 513, 1000003]
SEEDS = [0, 7, -3, 2**62 + 5]


# ---- helpers -------------------------------------------------------------------

def make_input(n: int, dtype: torch.dtype, bucket_size: int, seed: int) -> torch.Tensor:
    """Random values plus buckets that stress the edge cases: signed zeros as minimum and
    maximum, a constant bucket, NaN, +-Inf, all zeros, a huge range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 2 + 0.5
    B = bucket_size

    def bucket(k):
        lo, hi = k * B, min((k + 1) * B, n)
        return (lo, hi) if lo < hi else None

    def signed_zeros(lo, hi):
        idx = torch.arange(lo, hi)
        z = idx[torch.rand(hi - lo, generator=g) < 0.25]
        x[z] = 0.0
        x[z[torch.rand(z.numel(), generator=g) < 0.5]] = -0.0

    specials = [
        lambda lo, hi: (x.__setitem__(slice(lo, hi), x[lo:hi].abs()), signed_zeros(lo, hi)),   # min is +-0
        lambda lo, hi: (x.__setitem__(slice(lo, hi), -x[lo:hi].abs()), signed_zeros(lo, hi)),  # max is +-0
        lambda lo, hi: x.__setitem__(slice(lo, hi), 1.5),                                      # constant
        lambda lo, hi: x.__setitem__((lo + hi) // 2, float("nan")),
        lambda lo, hi: x.__setitem__(hi - 1, float("inf")),
        lambda lo, hi: x.__setitem__(lo, float("-inf")),
        lambda lo, hi: (x.__setitem__(slice(lo, hi), 0.0), signed_zeros(lo, hi)),              # all zeros
        lambda lo, hi: x.__setitem__(slice(lo, hi), x[lo:hi] * 1e30),                          # huge range
    ]
    for k, special in enumerate(specials, start=1):
        r = bucket(k)
        if r is not None:
            special(*r)
    return x.to(dtype)


def misaligned(t: torch.Tensor, shift: int = 1) -> torch.Tensor:
    """A contiguous copy of t whose data pointer is off the 16-byte alignment."""
    base = torch.empty(t.numel() + shift, dtype=t.dtype, device=t.device)
    view = base[shift:]
    view.copy_(t.reshape(-1))
    return view


def segments_for(n: int, bucket_size: int, seed: int):
    """Layer-like segments of a flat tensor, with gaps and odd offsets (unaligned buckets)."""
    g = torch.Generator().manual_seed(seed)
    segs, pos = [], 0
    while pos < n:
        gap = int(torch.randint(0, 3, (1,), generator=g))
        length = int(torch.randint(1, max(2, 3 * bucket_size), (1,), generator=g))
        if pos + gap >= n:
            break
        length = min(length, n - pos - gap)
        segs.append((pos + gap, length))
        pos += gap + length
    return segs


def quantize_both(x, residual, table, num_buckets, bits, bucket_size, stochastic, seed, skip=(0, 0),
                  row_streams=None):
    """Runs quantize on CPU and CUDA; returns (payload_cpu, payload_gpu, residual_cpu, residual_gpu)."""
    res_c = residual.clone() if residual is not None else None
    res_g = residual.cuda() if residual is not None else None
    p_c = Q.quantize(x, res_c, table, num_buckets, bits, bucket_size, stochastic, seed, *skip, None, -1, row_streams)
    p_g = Q.quantize(x.cuda(), res_g, table.cuda() if table is not None else None, num_buckets, bits,
                     bucket_size, stochastic, seed, *skip, None, -1,
                     row_streams.cuda() if row_streams is not None else None)
    return p_c, p_g, res_c, res_g


def random_row_streams(num_buckets: int, seed: int) -> torch.Tensor:
    """Valid row_streams (multiples of 8, room for a bucket below 2^63), small and huge, in any order."""
    g = torch.Generator().manual_seed(seed)
    streams = torch.randint(0, 2**59, (num_buckets,), generator=g, dtype=torch.int64) * 8
    streams[::3] = torch.randint(0, 1000, (streams[::3].numel(),), generator=g, dtype=torch.int64) * 8
    return streams


def check_decoders(p_c, p_g, n, table, bits, bucket_size, what):
    """dequantize_into (every output dtype) and dequantize_sum from the same payloads."""
    t_g = table.cuda() if table is not None else None
    for out_dtype in DTYPES:
        out_c = torch.full((n,), -7.0, dtype=out_dtype)  # uncovered elements must stay untouched
        out_g = out_c.cuda()
        Q.dequantize_into(p_c, out_c, table, bits, bucket_size)
        Q.dequantize_into(p_g, out_g, t_g, bits, bucket_size)
        assert_identical(out_c, out_g, f"{what} dequantize_into->{out_dtype}")
        if n:
            out_m = misaligned(torch.full((n,), -7.0, dtype=out_dtype, device="cuda"))
            Q.dequantize_into(p_g, out_m, t_g, bits, bucket_size)
            assert_identical(out_c, out_m, f"{what} dequantize_into->{out_dtype} (unaligned out)")
    stacked_c = p_c.unsqueeze(0)
    s_c = Q.dequantize_sum(stacked_c, None, None, 0, bits, bucket_size)
    s_g = Q.dequantize_sum(p_g.unsqueeze(0), None, None, 0, bits, bucket_size)
    assert_identical(s_c, s_g, f"{what} dequantize_sum")


# ---- the main matrix ---------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("use_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("use_table", [False, True], ids=["identity", "table"])
def test_quantize_matches_cpu(bits, dtype, stochastic, use_residual, use_table):
    B = 512
    for n in SIZES:
        seed = SEEDS[(n + bits) % len(SEEDS)]
        x = make_input(n, dtype, B, seed=n * 31 + bits)
        residual = None
        if use_residual:
            residual = torch.randn(n, generator=torch.Generator().manual_seed(n + 1)) * 0.01
            if n > 3 * B:
                residual[3 * B + 5] = float("nan")  # that bucket is non-finite: residual must stay as it was
        if use_table:
            table = ops.bucket_table(segments_for(n, B, seed=n + bits), B, pad_to_multiple=4)
            num_buckets = table.shape[0]
        else:
            table, num_buckets = None, -1 if n % 2 else -(-n // B) + 2  # sometimes padded with empty buckets
        total = num_buckets if num_buckets >= 0 else -(-n // B)
        skips = [(0, 0), (1, min(3, total)), (total - 1, total + 5)] if total else [(0, 0)]
        decoded = None
        for skip in skips:
            what = f"n={n} bits={bits} {dtype} stochastic={stochastic} residual={use_residual} " \
                   f"table={use_table} skip={skip}"
            p_c, p_g, r_c, r_g = quantize_both(x, residual, table, num_buckets, bits, B, stochastic, seed, skip)
            assert_identical(p_c, p_g, f"{what} payload")
            if use_residual:
                assert_identical(r_c, r_g, f"{what} residual")
            if decoded is None:
                decoded = (p_c, p_g, what)
            # Per-bucket Philox starts (row_streams): the same bytes and residuals as the CPU too.
            streams = random_row_streams(total, seed=n + bits)
            p_c, p_g, r_c, r_g = quantize_both(x, residual, table, num_buckets, bits, B, stochastic, seed, skip,
                                               row_streams=streams)
            assert_identical(p_c, p_g, f"{what} row_streams payload")
            if use_residual:
                assert_identical(r_c, r_g, f"{what} row_streams residual")
        check_decoders(decoded[0], decoded[1], n, table, bits, B, decoded[2])


@pytest.mark.parametrize("bucket_size", [8, 64, 1024, 2048, 4096, 16384, 65536])
@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_bucket_sizes_match_cpu(bucket_size, bits):
    # Covers every threads-per-bucket configuration (1 to 8 warps, register-cached
    # or streaming) and buckets far larger than a warp's share.
    for dtype in DTYPES:
        n = 3 * bucket_size + 77
        x = make_input(n, dtype, bucket_size, seed=bucket_size + bits)
        residual = torch.randn(n, generator=torch.Generator().manual_seed(bits)) * 0.1
        for stochastic in (False, True):
            what = f"B={bucket_size} bits={bits} {dtype} stochastic={stochastic}"
            p_c, p_g, r_c, r_g = quantize_both(x, residual, None, -1, bits, bucket_size, stochastic, 99)
            assert_identical(p_c, p_g, f"{what} payload")
            assert_identical(r_c, r_g, f"{what} residual")
        check_decoders(p_c, p_g, n, None, bits, bucket_size, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_inputs_match_cpu(dtype):
    # Tensors whose storage starts off a 16-byte boundary take the scalar paths.
    n, B, bits = 10007, 512, 5
    x = make_input(n, dtype, B, seed=5)
    residual = torch.randn(n) * 0.05
    for shift in (1, 2, 3):
        x_g, r_g = misaligned(x.cuda(), shift), misaligned(residual.cuda(), shift)
        r_c = residual.clone()
        p_c = Q.quantize(x, r_c, None, -1, bits, B, True, 1234, 0, 0)
        p_g = Q.quantize(x_g, r_g, None, -1, bits, B, True, 1234, 0, 0)
        assert_identical(p_c, p_g, f"shift={shift} payload")
        assert_identical(r_c, r_g, f"shift={shift} residual")


@pytest.mark.parametrize("bits", [2, 4, 7, 8])
@pytest.mark.parametrize("init_dtype", [None] + DTYPES, ids=str)
@pytest.mark.parametrize("use_table", [False, True], ids=["identity", "table"])
def test_dequantize_sum_matches_cpu(bits, init_dtype, use_table):
    # The scatter-reduce step: W sources' payloads for a chunk of buckets, plus this
    # rank's own full-precision chunk (init) read through the table from init_bucket_begin.
    B, n, W = 512, 40000 + 13, 4
    table = ops.bucket_table(segments_for(n, B, seed=bits), B, pad_to_multiple=W) if use_table else None
    nb = table.shape[0] if use_table else -(-n // B)
    chunk = nb // W
    for rank in range(W):
        begin = rank * chunk
        payloads_c = []
        for s in range(W):
            x = make_input(n, torch.float32, B, seed=100 * s + bits)
            skip_end = begin + chunk if s == rank else begin  # a rank's own chunk travels as zero records
            p = Q.quantize(x, None, table, nb if use_table else -1, bits, B, True, s, begin, skip_end)
            payloads_c.append(p[begin:begin + chunk])
        stacked_c = torch.stack(payloads_c)
        init_c = None if init_dtype is None else make_input(n, init_dtype, B, seed=rank + 17)
        t_c = table if (use_table and init_c is not None) else None
        begin_arg = begin if init_c is not None else 0
        out_c = Q.dequantize_sum(stacked_c, init_c, t_c, begin_arg, bits, B)
        out_g = Q.dequantize_sum(stacked_c.cuda(), init_c.cuda() if init_c is not None else None,
                                 t_c.cuda() if t_c is not None else None, begin_arg, bits, B)
        assert_identical(out_c, out_g, f"rank={rank} init={init_dtype} table={use_table}")
        # A sub-view of the stacked payloads (storage offset, odd record alignment).
        if chunk > 1:
            sub_c = stacked_c[1:]
            out_c = Q.dequantize_sum(sub_c, None, None, 0, bits, B)
            out_g = Q.dequantize_sum(stacked_c.cuda()[1:], None, None, 0, bits, B)
            assert_identical(out_c, out_g, f"rank={rank} sub-view")


def test_empty_and_padded():
    for dtype in DTYPES:
        x = torch.empty(0, dtype=dtype)
        for nb in (-1, 0, 3):
            p_c, p_g, _, _ = quantize_both(x, None, None, nb, 4, 64, True, 1)
            assert_identical(p_c, p_g, f"empty nb={nb}")
            assert not p_g.any()
    empty = torch.empty((0, 0, 40), dtype=torch.uint8)
    assert_identical(Q.dequantize_sum(empty, None, None, 0, 4, 64),
                     Q.dequantize_sum(empty.cuda(), None, None, 0, 4, 64), "dequantize_sum of nothing")
    none = torch.empty((0, 5, 40), dtype=torch.uint8)
    assert_identical(Q.dequantize_sum(none, None, None, 0, 4, 64),
                     Q.dequantize_sum(none.cuda(), None, None, 0, 4, 64), "dequantize_sum of zero sources")


# ---- the Python wrappers -------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ops_wrappers_match_cpu(dtype):
    x = make_input(97 * 1031, dtype, 512, seed=3).reshape(97, 1031)
    for bits in (1, 4, 8):
        q_c = ops.quantize(x, bits=bits, bucket_size=512, stochastic=True, seed=42)
        q_g = ops.quantize(x.cuda(), bits=bits, bucket_size=512, stochastic=True, seed=42)
        assert q_g.payload.is_cuda
        assert_identical(q_c.payload, q_g.payload, f"ops.quantize bits={bits}")
        y_c, y_g = ops.dequantize(q_c), ops.dequantize(q_g)
        assert y_g.is_cuda and y_g.shape == x.shape and y_g.dtype == dtype
        assert_identical(y_c, y_g, f"ops.dequantize bits={bits}")

        r_c = torch.randn(x.shape) * 0.01
        r_g = r_c.cuda()
        e_c = ops.quantize_with_error_feedback(x, r_c, bits=bits, bucket_size=512, seed=5)
        e_g = ops.quantize_with_error_feedback(x.cuda(), r_g, bits=bits, bucket_size=512, seed=5)
        assert_identical(e_c.payload, e_g.payload, f"error feedback payload bits={bits}")
        assert_identical(r_c, r_g, f"error feedback residual bits={bits}")

        qs_c = [ops.quantize(x * (i + 1), bits=bits, seed=i) for i in range(3)]
        qs_g = [ops.quantize(x.cuda() * (i + 1), bits=bits, seed=i) for i in range(3)]
        for a, b in zip(qs_c, qs_g):
            assert_identical(a.payload, b.payload, "ops.quantize of scaled x")
        init = torch.randn(x.numel()).to(dtype)
        assert_identical(ops.dequantize_sum(qs_c, init=init), ops.dequantize_sum(qs_g, init=init.cuda()),
                         f"ops.dequantize_sum bits={bits}")


# ---- streams, devices, validation ------------------------------------------------------

def test_runs_on_the_current_stream():
    x = make_input(1 << 20, torch.float32, 512, seed=8)
    expected = Q.quantize(x, None, None, -1, 4, 512, True, 3, 0, 0)
    x_g = x.cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        p = Q.quantize(x_g, None, None, -1, 4, 512, True, 3, 0, 0)
        y = torch.empty_like(x_g)
        Q.dequantize_into(p, y, None, 4, 512)
        s = Q.dequantize_sum(p.unsqueeze(0), y, None, 0, 4, 512)
    stream.synchronize()
    assert_identical(expected, p, "payload on a side stream")
    y_c = torch.empty_like(x)
    Q.dequantize_into(expected, y_c, None, 4, 512)
    assert_identical(y_c, y, "dequantize_into on a side stream")
    assert_identical(Q.dequantize_sum(expected.unsqueeze(0), y_c, None, 0, 4, 512), s, "dequantize_sum on a side stream")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    x = make_input(5000, torch.float16, 512, seed=9)
    p_c = Q.quantize(x, None, None, -1, 3, 512, True, 1, 0, 0)
    p_g = Q.quantize(x.to("cuda:1"), None, None, -1, 3, 512, True, 1, 0, 0)
    assert p_g.device == torch.device("cuda:1")
    assert_identical(p_c, p_g, "payload on cuda:1")


def _error(fn):
    with pytest.raises(RuntimeError) as info:
        fn()
    return str(info.value).split("\n")[0]


def test_validation_matches_cpu():
    x = torch.randn(1000)
    p = Q.quantize(x, None, None, -1, 4, 512, False, 0, 0, 0)
    table = torch.tensor([[0, 100], [100, 500], [700, 300]])
    cases = [
        lambda d: Q.quantize(x.to(d), None, None, -1, 0, 512, False, 0, 0, 0),
        lambda d: Q.quantize(x.to(d), None, None, -1, 4, 500, False, 0, 0, 0),
        lambda d: Q.quantize(x.to(d).long(), None, None, -1, 4, 512, False, 0, 0, 0),
        lambda d: Q.quantize(x.to(d), None, table.to(d), 5, 4, 512, False, 0, 0, 0),
        lambda d: Q.quantize(x.to(d), None, None, 1, 4, 512, False, 0, 0, 0),
        lambda d: Q.quantize(x.to(d), torch.zeros(10, device=d), None, -1, 4, 512, False, 0, 0, 0),
        lambda d: Q.quantize(x.to(d), None, None, -1, 4, 512, True, 0, 0, 0, None, -1,
                             torch.zeros(2, dtype=torch.int32, device=d)),
        lambda d: Q.quantize(x.to(d), None, None, -1, 4, 512, True, 0, 0, 0, None, -1,
                             torch.zeros(3, dtype=torch.int64, device=d)),
        lambda d: Q.dequantize_into(p.to(d), torch.empty(1000, device=d), None, 3, 512),
        lambda d: Q.dequantize_into(p.to(d), torch.empty(1100, device=d), None, 4, 512),
        lambda d: Q.dequantize_into(p.to(d), torch.empty(1000, device=d), table.to(d), 4, 512),
        lambda d: Q.dequantize_sum(p.to(d)[None], None, table.to(d), 0, 4, 512),
        lambda d: Q.dequantize_sum(p.to(d)[None], x.to(d), table.to(d), 2, 4, 512),
    ]
    for i, case in enumerate(cases):
        assert _error(lambda: case("cpu")) == _error(lambda: case("cuda")), f"case {i}"
    # Mixed devices are rejected, not silently read across.
    assert "residual" in _error(lambda: Q.quantize(x.cuda(), torch.zeros(1000), None, -1, 4, 512, False, 0, 0, 0))
    assert "bucket_table" in _error(lambda: Q.quantize(x.cuda(), None, table, -1, 4, 512, False, 0, 0, 0))
    assert "out" in _error(lambda: Q.dequantize_into(p.cuda(), torch.empty(1000), None, 4, 512))
    assert "row_streams" in _error(lambda: Q.quantize(x.cuda(), None, None, -1, 4, 512, True, 0, 0, 0, None, -1,
                                                      torch.zeros(2, dtype=torch.int64)))


def test_any_row_streams_value_is_memory_safe():
    # CUDA does not read row_streams on the host (that would wait); values the CPU op rejects are
    # only RNG counters there: the kernel runs, the bytes are deterministic and decode within the bucket.
    x = torch.randn(1000, device="cuda")
    hostile = torch.tensor([-1, 2**63 - 1], dtype=torch.int64, device="cuda")
    a = Q.quantize(x, None, None, -1, 4, 512, True, 9, 0, 0, None, -1, hostile)
    b = Q.quantize(x, None, None, -1, 4, 512, True, 9, 0, 0, None, -1, hostile)
    torch.cuda.synchronize()
    assert torch.equal(a, b)
    out = torch.empty(1000, device="cuda")
    Q.dequantize_into(a, out, None, 4, 512)
    assert (out - x).abs().max().item() <= (x.max() - x.min()).item() / 15 * 1.001


# ---- mixed bit widths (4-column bucket tables) ------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("bucket_size", [8, 64, 512, 4096])
def test_mixed_tables_match_cpu(dtype, stochastic, bucket_size):
    n = 40 * bucket_size + 13
    x = make_input(n, dtype, bucket_size, seed=bucket_size)
    segs = segments_for(n, bucket_size, seed=bucket_size + 1)
    bits = [1 + (7 * i + bucket_size) % 8 for i in range(len(segs))]
    for world in [1, 3, 4]:
        host = ops.bucket_table(segs, bucket_size, pad_to_multiple=world, bits=bits)
        table = host.cuda()
        for use_host in [True, False]:
            extra = (host,) if use_host else (None,)
            r_c = torch.randn(n, generator=torch.Generator().manual_seed(5)) * 0.01
            r_g = r_c.cuda()
            p_c = Q.quantize(x, r_c, host, -1, 0, bucket_size, stochastic, 11, 1, 3)
            p_g = Q.quantize(x.cuda(), r_g, table, -1, 0, bucket_size, stochastic, 11, 1, 3, *extra)
            what = f"mixed {dtype} B={bucket_size} W={world}"
            assert_identical(p_c, p_g, f"{what} payload")
            assert_identical(r_c, r_g, f"{what} residual")
            streams = random_row_streams(host.shape[0], seed=world)
            rs_c, rs_g = r_c.clone(), r_g.clone()
            q_c = Q.quantize(x, rs_c, host, -1, 0, bucket_size, stochastic, 11, 1, 3, None, -1, streams)
            q_g = Q.quantize(x.cuda(), rs_g, table, -1, 0, bucket_size, stochastic, 11, 1, 3, *extra, -1,
                             streams.cuda())
            assert_identical(q_c, q_g, f"{what} row_streams payload")
            assert_identical(rs_c, rs_g, f"{what} row_streams residual")
            for out_dtype in DTYPES:
                o_c = torch.full((n,), 7.0, dtype=out_dtype)
                o_g = o_c.cuda()
                Q.dequantize_into(p_c, o_c, host, 0, bucket_size)
                Q.dequantize_into(p_g, o_g, table, 0, bucket_size, *extra)
                assert_identical(o_c, o_g, f"{what} dequantize_into->{out_dtype}")
            per = host.shape[0] // world
            chunk = ops.mixed_payload_bytes(host, bucket_size) // world
            stacked = torch.stack([p_c, Q.quantize(x * 2, None, host, -1, 0, bucket_size, True, 4, 0, 0)])
            for c in range(world):
                part = stacked[:, c * chunk:(c + 1) * chunk].contiguous()
                s_c = Q.dequantize_sum(part, x, host, c * per, 0, bucket_size)
                s_g = Q.dequantize_sum(part.cuda(), x.cuda(), table, c * per, 0, bucket_size, *extra)
                assert_identical(s_c, s_g, f"{what} dequantize_sum chunk {c}")
                server_c = torch.zeros(per * bucket_size)
                server_g = server_c.cuda()
                q_c = Q.quantize(s_c, server_c, host, per, 0, bucket_size, stochastic, 3, 0, 0, host, c * per)
                q_g = Q.quantize(s_g, server_g, table, per, 0, bucket_size, stochastic, 3, 0, 0, *extra, c * per) \
                    if use_host else Q.quantize(s_g, server_g, table, per, 0, bucket_size, stochastic, 3, 0, 0,
                                                None, c * per)
                assert_identical(q_c, q_g, f"{what} chunk re-quantize {c}")
                assert_identical(server_c, server_g, f"{what} server residual {c}")
                streams = random_row_streams(per, seed=c)
                q_c = Q.quantize(s_c, server_c, host, per, 0, bucket_size, stochastic, 3, 0, 0, host, c * per,
                                 streams)
                q_g = Q.quantize(s_g, server_g, table, per, 0, bucket_size, stochastic, 3, 0, 0,
                                 host if use_host else None, c * per, streams.cuda())
                assert_identical(q_c, q_g, f"{what} chunk re-quantize {c} row_streams")
                assert_identical(server_c, server_g, f"{what} server residual {c} row_streams")


def test_mixed_validation_matches_cpu():
    x = torch.randn(1000)
    host = ops.bucket_table([(0, 300), (300, 700)], 64, pad_to_multiple=2, bits=[3, 7])
    p = Q.quantize(x, None, host, -1, 0, 64, False, 0, 0, 0)
    bad_bits = host.clone()
    bad_bits[1, 2] = 9
    bad_offset = host.clone()
    bad_offset[2, 3] += 1
    cases = [
        lambda d: Q.quantize(x.to(d), None, bad_bits.to(d), -1, 0, 64, False, 0, 0, 0),
        lambda d: Q.quantize(x.to(d), None, bad_offset.to(d), -1, 0, 64, False, 0, 0, 0),
        lambda d: Q.quantize(x.to(d), None, host.to(d), -1, 4, 64, False, 0, 0, 0),
        lambda d: Q.quantize(x.to(d), None, host.to(d), -1, 0, 64, False, 0, 0, 0, host[:-1].contiguous()),
        lambda d: Q.dequantize_into(p.to(d)[:-1], torch.empty(1000, device=d), host.to(d), 0, 64),
        lambda d: Q.dequantize_sum(p.to(d)[None, :-5], None, host.to(d), 0, 0, 64),
        lambda d: Q.dequantize_sum(p.to(d)[None], None, host.to(d), 1, 0, 64),
    ]
    for i, case in enumerate(cases):
        assert _error(lambda: case("cpu")) == _error(lambda: case("cuda")), f"case {i}"
    # A host copy that disagrees with the device table (smaller records) cannot make the
    # kernels write outside the payload: rows whose records would leave it are skipped.
    lying = host.clone()
    lying[:, 2] = 1
    lying[:, 3] = torch.arange(host.shape[0]) * ops.record_bytes(1, 64)
    out = Q.quantize(x.cuda(), None, host.cuda(), -1, 0, 64, False, 0, 0, 0, lying)
    assert out.numel() == ops.mixed_payload_bytes(lying, 64)
    torch.cuda.synchronize()
