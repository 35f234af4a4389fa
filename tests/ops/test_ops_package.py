"""Where the ops' pieces live: schemas in csrc/ops.cpp, wrappers and fakes in pycomm/ops/, and no
positional ``torch.ops.pycomm.*`` call outside that package."""

import pathlib
import re

import pycomm

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pycomm"
PUBLIC = {
    "QuantizedTensor", "quantize", "quantize_with_error_feedback", "dequantize", "dequantize_sum", "record_bytes",
    "num_buckets", "bucket_table", "mixed_payload_bytes", "SUPPORTED_DTYPES", "segment_table", "topk_count", "topk",
    "densify", "dgc_compensate", "dgc_mask", "PHILOX_DISTRIBUTIONS", "philox_normal", "philox_rademacher",
    "philox_axpy_", "philox_perturbed_copy", "philox_dot", "philox_axpy_multi_", "philox_dot_multi",
}


def test_public_names_are_re_exported():
    assert set(pycomm.ops.__all__) == PUBLIC and len(pycomm.ops.__all__) == len(PUBLIC)
    for name in PUBLIC:
        assert getattr(pycomm.ops, name) is not None


def test_every_schema_is_in_ops_cpp():
    defs = {path.relative_to(ROOT).as_posix(): re.findall(r'm\.def\(\s*"(\w+)\(', path.read_text())
            for path in (ROOT / "csrc").rglob("*.c*")}
    outside = {path: names for path, names in defs.items() if names and path != "csrc/ops.cpp"}
    assert not outside
    assert "lgreco_solve" in defs["csrc/ops.cpp"]


def test_raw_op_calls_only_in_the_ops_package():
    call = re.compile(r"torch\.ops\.pycomm\.\w+\(")
    offenders = [path.relative_to(ROOT).as_posix() for path in PACKAGE.rglob("*.py")
                 if "ops" not in path.relative_to(PACKAGE).parts[:1] and call.search(path.read_text())]
    assert not offenders


def test_modules_under_500_lines():
    for path in (PACKAGE / "ops").glob("*.py"):
        assert len(path.read_text().splitlines()) < 500, path
