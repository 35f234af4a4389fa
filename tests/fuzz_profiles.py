"""Hypothesis profiles of the fuzz tests (tests/ops/test_fuzz_*.py).

``pycomm-ci`` (loaded by conftest.py, so the default): about 60 examples per test and no
deadline, so the whole fuzz suite stays well under a minute on a 2-core CI machine. No example
database is written, so a run leaves no files behind.

``long``: thousands of examples per test, for a deliberate search:
``pytest tests/ops/test_fuzz_*.py --hypothesis-profile=long``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

settings.register_profile("pycomm-ci", max_examples=60, **_COMMON)
settings.register_profile("long", max_examples=3000, **_COMMON)
settings.load_profile("pycomm-ci")
