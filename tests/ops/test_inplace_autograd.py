"""Every op that writes into an argument tells autograd, as torch's own in-place ops do (issue 11, item 4).

Policy (csrc/ops.cpp): with grad mode on, writing into a leaf that requires grad raises ValueError;
every written tensor's version counter is bumped, so a backward that saved it raises instead of
silently computing a gradient from the new values. Raw ``torch.ops.pycomm.*`` calls included.
"""

import pytest
import torch

import pycomm  # noqa: F401  (registers torch.ops.pycomm)
from pycomm import ops

Q = torch.ops.pycomm


def _table():
    return ops.bucket_table([(0, 16)], 8)


# name -> (build the arguments around the tensor `t` under test, call the op, which arguments are written)
# Each builder gets a float32 tensor `t` of 16 elements and returns the call.
def _quantize(t):
    return lambda: Q.quantize(torch.randn(16), t, None, -1, 4, 8, False, 0, 0, 0)


def _dequantize_into(t):
    payload = Q.quantize(torch.randn(16), None, None, -1, 4, 8, False, 0, 0, 0)
    return lambda: Q.dequantize_into(payload, t, None, 4, 8)


def _compensate_u(t):
    return lambda: Q.dgc_compensate(torch.randn(16), t, torch.zeros(16), None, 0.9, False, 0.0)


def _compensate_v(t):
    return lambda: Q.dgc_compensate(torch.randn(16), torch.zeros(16), t, None, 0.9, False, 0.0)


def _mask_v(t):
    return lambda: Q.dgc_mask(t, None, torch.tensor([0, 1], dtype=torch.int32))


def _mask_u(t):
    return lambda: Q.dgc_mask(torch.ones(16), t, torch.tensor([0, 1], dtype=torch.int32))


def _axpy(t):
    return lambda: Q.philox_axpy_([torch.zeros(3), t], 1, 0.5, 0, 0)


def _axpy_multi(t):
    return lambda: Q.philox_axpy_multi_([t], [1, 2], torch.tensor([0.5, -0.25]), 0, 0)


WRITES = {"quantize.residual": _quantize, "dequantize_into.out": _dequantize_into,
          "dgc_compensate.u": _compensate_u, "dgc_compensate.v": _compensate_v, "dgc_mask.v": _mask_v,
          "dgc_mask.u": _mask_u, "philox_axpy_.tensors": _axpy, "philox_axpy_multi_.tensors": _axpy_multi}


def test_the_silent_wrong_gradient_of_the_report():
    """dgc_mask under no_grad after a forward that saved w: backward used to return [0, 0, 10]
    (2 * the masked w) instead of [6, 8, 10]; now the version check raises."""
    w = torch.tensor([3.0, 4.0, 5.0], requires_grad=True)
    y = (w * w).sum()  # saves w
    with torch.no_grad():
        ops.dgc_mask(w, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    # Under grad mode the write into a leaf that requires grad is refused before anything is written.
    w = torch.tensor([3.0, 4.0, 5.0], requires_grad=True)
    with pytest.raises(ValueError, match=r"pycomm::dgc_mask writes into `v` in place, a leaf tensor that requires"):
        Q.dgc_mask(w, None, torch.tensor([0, 1]))
    assert w.tolist() == [3.0, 4.0, 5.0] and w._version == 0


@pytest.mark.parametrize("name", sorted(WRITES))
def test_leaf_that_requires_grad_is_refused(name):
    t = torch.zeros(16, requires_grad=True)
    with pytest.raises(ValueError, match="leaf tensor that requires grad.*torch.no_grad"):
        WRITES[name](t)()
    assert t.eq(0).all() and t._version == 0


@pytest.mark.parametrize("name", sorted(WRITES))
def test_written_tensor_version_is_bumped_and_saved_tensors_raise(name):
    t = torch.zeros(16)
    before = t._version
    WRITES[name](t)()
    assert t._version > before, "the write must be visible to autograd"
    # A parameter updated under no_grad, after a forward that saved it: backward raises.
    p = torch.zeros(16, requires_grad=True)
    loss = (p * p).sum()
    with torch.no_grad():
        WRITES[name](p)()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_read_only_arguments_keep_their_version():
    x, table = torch.randn(16), _table()
    versions = (x._version, table._version)
    payload = Q.quantize(x, None, table, -1, 4, 8, False, 0, 0, 0)
    Q.dequantize_sum(payload.unsqueeze(0), x, table, 0, 4, 8)
    ops.topk(x, 0.25)
    idx = torch.tensor([1, 2], dtype=torch.int32)
    Q.densify(torch.ones(2), idx, 16)
    assert (x._version, table._version, payload._version, idx._version) == (*versions, 0, 0)


def test_first_bad_flags_are_written_tensors_too():
    flag = torch.empty(1, dtype=torch.int64)
    before = flag._version
    Q.densify(torch.ones(2), torch.tensor([1, 2]), 16, flag)
    assert flag.item() == -1 and flag._version > before
    Q.dgc_mask(torch.ones(16), None, torch.tensor([1, 99]), flag)
    assert flag.item() == 1


def test_every_mutating_op_has_the_autograd_kernel():
    """A new op with a `Tensor(a!)` argument must be added to the list in csrc/ops.cpp."""
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("pycomm::")]
    mutating = []
    for name in names:
        schema = torch._C._get_schema(name, "")
        if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
            mutating.append(name)
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd"), name
    assert sorted(mutating) == sorted(f"pycomm::{n}" for n in (
        "quantize", "dequantize_into", "dgc_compensate", "dgc_mask", "densify", "philox_axpy_",
        "philox_axpy_multi_"))


def test_non_leaf_and_inference_tensors():
    """A non-leaf keeps torch's in-place behaviour (version check); inference tensors need none."""
    x = torch.randn(16, requires_grad=True)
    y = torch.sigmoid(x)  # saves its output
    Q.dgc_mask(y, None, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    with torch.inference_mode():
        t = torch.zeros(16)
        Q.philox_axpy_([t], 1, 1.0, 0, 0)
        Q.dgc_mask(t, None, torch.tensor([0]))
    assert t[0] == 0 and t[1] != 0
