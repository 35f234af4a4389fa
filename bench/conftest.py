"""Shared fixtures of the kernel benchmarks: the devices and a synchronising runner."""

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def run(device):
    """``run(benchmark, fn)``: time ``fn`` with pytest-benchmark, waiting for the GPU each round."""

    def runner(benchmark, fn, rounds=15):
        def call():
            fn()
            if device == "cuda":
                torch.cuda.synchronize()

        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=2)

    return runner
