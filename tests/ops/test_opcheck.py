"""torch.library.opcheck for every pycomm op, on every device this build supports, from one table.

opcheck checks the schema (mutation annotations included), the autograd registration, the fake kernel
against the real one, and AOT dispatch. Each case builds its arguments for a device; the CPU always
runs, CUDA where a GPU and the CUDA kernels are present (a GPU without the kernels fails, as in every
CUDA test). A new op must get a case here: ``test_every_op_has_a_case`` fails otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

from pycomm import kernels, ops

from cuda_support import cuda_skip_reason, fail_if_kernels_missing

Q = torch.ops.pycomm
# Ops whose output size depends on the data (mixed tables, chunk rows) cannot run AOT dispatch with
# dynamic shapes: they check the rest.
STATIC_ONLY = ("test_schema", "test_autograd_registration", "test_faketensor")


@dataclass(frozen=True)
class Case:
    name: str
    op: Callable
    args: Callable[[str], tuple]           # device -> arguments
    test_utils: Optional[tuple] = None     # None: opcheck's defaults (all)
    cpu_only: bool = False


def _payload(x: torch.Tensor, table=None, bits: int = 4, bucket_size: int = 512) -> torch.Tensor:
    return Q.quantize(x, None, table, -1, bits, bucket_size, False, 0, 0, 0)


def _mixed_table(device: str) -> torch.Tensor:
    return ops.bucket_table([(0, 100), (100, 300)], 64, pad_to_multiple=2, bits=[3, 6]).to(device)


def _xs(device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(12)
    return [torch.randn(100, generator=g).to(device), torch.randn(7, generator=g).to(device)]


def _i32(values, device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


CASES = [
    Case("quantize", Q.quantize.default,
         lambda d: (torch.randn(1000, device=d), torch.zeros(1000, device=d), None, -1, 4, 512, False, 0, 0, 0)),
    Case("quantize mixed", Q.quantize.default,
         lambda d: (torch.randn(400, device=d), torch.zeros(400, device=d), _mixed_table(d), -1, 0, 64, True, 0, 0, 0),
         STATIC_ONLY),
    Case("quantize row_streams", Q.quantize.default,
         lambda d: (torch.randn(1000, device=d), torch.zeros(1000, device=d), None, -1, 4, 512, True, 0, 0, 0, None,
                    -1, torch.tensor([2**40, 8], device=d))),
    Case("quantize mixed row_streams", Q.quantize.default,
         lambda d: (torch.randn(400, device=d), None, _mixed_table(d), -1, 0, 64, True, 0, 0, 0, None, -1,
                    torch.arange(_mixed_table(d).shape[0], device=d) * 1024),
         STATIC_ONLY),
    Case("dequantize_into", Q.dequantize_into.default,
         lambda d: (_payload(torch.randn(1000, device=d)), torch.empty(1000, device=d), None, 4, 512)),
    Case("dequantize_into mixed", Q.dequantize_into.default,
         lambda d: (_payload(torch.randn(400, device=d), _mixed_table(d), 0, 64), torch.empty(400, device=d),
                    _mixed_table(d), 0, 64)),
    Case("dequantize_sum", Q.dequantize_sum.default,
         lambda d: (torch.stack([_payload(torch.randn(1000, device=d))] * 2), torch.randn(1000, device=d),
                    None, 0, 4, 512)),
    Case("dequantize_sum mixed", Q.dequantize_sum.default,
         lambda d: (torch.stack([_payload(torch.randn(400, device=d), _mixed_table(d), 0, 64)] * 2),
                    torch.randn(400, device=d), _mixed_table(d), 0, 0, 64),
         STATIC_ONLY),
    Case("dgc_compensate", Q.dgc_compensate.default,
         lambda d: (torch.randn(5000, device=d), torch.zeros(5000, device=d), torch.zeros(5000, device=d), None,
                    0.9, False, 0.0)),
    Case("topk_magnitude", Q.topk_magnitude.default,
         lambda d: (torch.randn(5000, device=d), None, 0.01, False, 0.01, 0)),
    Case("topk_magnitude counts", Q.topk_magnitude.default,
         lambda d: (torch.randn(5000, device=d), ops.segment_table([(0, 3000), (3000, 2000)], counts=[7, 0]).to(d),
                    0.01, False, 0.01, 0)),
    Case("dgc_mask", Q.dgc_mask.default,
         lambda d: (torch.randn(100, device=d), torch.randn(100, device=d), _i32([1, 2], d))),
    Case("dgc_mask first_bad", Q.dgc_mask.default,
         lambda d: (torch.randn(100, device=d), torch.randn(100, device=d), _i32([1, 2], d),
                    torch.zeros(1, dtype=torch.int64, device=d))),
    Case("densify", Q.densify.default,
         lambda d: (torch.randn(2, 5, device=d), torch.randint(0, 100, (2, 5), dtype=torch.int32, device=d), 100)),
    Case("densify first_bad", Q.densify.default,
         lambda d: (torch.randn(2, 5, device=d), torch.randint(0, 100, (2, 5), dtype=torch.int32, device=d), 100,
                    torch.zeros(1, dtype=torch.int64, device=d))),
    Case("philox_variates", Q.philox_variates.default, lambda d: (torch.empty(0, device=d), 50, 1, 3, 0)),
    Case("philox_axpy_", Q.philox_axpy_.default, lambda d: (_xs(d), 1, 0.5, 0, 0)),
    Case("philox_perturbed_copy", Q.philox_perturbed_copy.default, lambda d: (_xs(d), 1, 0.5, 1, 2)),
    Case("philox_dot", Q.philox_dot.default, lambda d: (_xs(d), 1, 0, 2)),
    Case("philox_axpy_multi_", Q.philox_axpy_multi_.default,
         lambda d: (_xs(d), [1, -2, 3], torch.tensor([0.5, 0.0, -1.0], device=d), 1, 4)),
    Case("philox_dot_multi", Q.philox_dot_multi.default, lambda d: (_xs(d), [1, 2, 2**40], 0, 2)),
    Case("lgreco_solve", Q.lgreco_solve.default,
         lambda d: (torch.tensor([[0.0, 1.0, 3.0], [0.5, 2.0, 4.0]], dtype=torch.float64),
                    torch.tensor([[30.0, 20.0, 10.0], [60.0, 40.0, 20.0]], dtype=torch.float64), 4.0, 10000),
         cpu_only=True),
    Case("lgreco_solve infeasible", Q.lgreco_solve.default,
         lambda d: (torch.tensor([[0.5, 1.0]], dtype=torch.float64), torch.tensor([[2.0, 1.0]], dtype=torch.float64),
                    0.1, 100),
         cpu_only=True),
]

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(bool(cuda_skip_reason()),
                                                                  reason=cuda_skip_reason() or "a GPU is present"))]


def test_every_op_has_a_case():
    covered = {case.op.name() for case in CASES}
    assert set(kernels.pycomm_ops()) <= covered, sorted(set(kernels.pycomm_ops()) - covered)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_opcheck(case: Case, device: str):
    if device == "cuda":
        fail_if_kernels_missing()
        if case.cpu_only:
            pytest.skip(f"{case.op.name()} is CPU-only by design (pycomm.kernels.CPU_ONLY_OPS)")
    kwargs = {} if case.test_utils is None else {"test_utils": case.test_utils}
    torch.library.opcheck(case.op, case.args(device), **kwargs)
