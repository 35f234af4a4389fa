"""pytest plugin of ``make gpu-check``: keep only the tests marked ``cuda_support.REQUIRES_CUDA``.

Every such test uses the ``cuda_kernels_present`` fixture (tests/conftest.py), so that is what
selects them. Use: ``PYTHONPATH=.:bench python -m pytest -p cuda_only_plugin tests/...``.
"""

CUDA_FIXTURE = "cuda_kernels_present"


def pytest_collection_modifyitems(config, items):
    selected = [item for item in items if CUDA_FIXTURE in getattr(item, "fixturenames", ())]
    deselected = [item for item in items if CUDA_FIXTURE not in getattr(item, "fixturenames", ())]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected
