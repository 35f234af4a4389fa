"""``pycomm demo``: the end-to-end benchmark (:mod:`pycomm.bench.e2e`) on the demo's small language model.

The demo trains :class:`~pycomm.bench.models.CharTransformer` (model ``lm``) on the
Python standard library's source with 4 Gloo workers, once per method of
:data:`DEMO_METHODS`, over a link shaped to :data:`DEMO_BANDWIDTH` where shaping
is allowed (root on Linux; unshaped otherwise, and the table says so), and
prints the comparison table. Everything else (methods, models, shaping,
measurement, reports) lives in the other modules of :mod:`pycomm.bench`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable, Mapping, Optional, TextIO, Union

from pycomm.bench.config import BenchConfig
from pycomm.bench.e2e import run_e2e
from pycomm.bench.methods import MethodSpec

__all__ = ["DEMO_METHODS", "DEMO_STEPS", "DEMO_BANDWIDTH", "DemoConfig", "run_demo"]

#: Methods of ``pycomm demo`` when none are named: the built-in fp32 and fp16 hooks, pycomm's methods, the SGD
#: pair for DGC and zeroth-order SPSA (lgreco rows report "unavailable" until that method is registered).
#: PyTorch's powerSGD_hook and quantization_perchannel_hook are left to ``pycomm bench e2e``: the first keeps
#: the demo short (it runs on Gloo with one DDP bucket only, docs/benchmarks.md), the second crashes on Gloo.
DEMO_METHODS: tuple[str, ...] = (
    "allreduce", "fp16", "quant8", "quant4", "quant2", "allreduce-sgd", "dgc", "lgreco-quant", "lgreco-topk",
    "spsa-projection", "spsa",
)

#: Steps per method of ``pycomm demo``.
DEMO_STEPS: int = 100

#: Link rate of ``pycomm demo`` where shaping is allowed.
DEMO_BANDWIDTH: str = "1gbit"

#: The demo's configuration is the benchmark's, on the ``lm`` model.
DemoConfig = BenchConfig


def run_demo(
    methods: Union[Iterable[str], Mapping[str, MethodSpec]] = DEMO_METHODS,
    workers: int = 4,
    steps: int = DEMO_STEPS,
    *,
    config: Optional[BenchConfig] = None,
    json_path: Optional[str] = None,
    out: Optional[TextIO] = None,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Run the demo comparison and return its result rows (see :func:`pycomm.bench.e2e.run_e2e`).

    Args:
        methods: names in :data:`~pycomm.bench.methods.METHODS`, or a mapping from name to :class:`MethodSpec`.
        workers: DDP worker processes.
        steps: training steps per method.
        config: further settings (default: model ``lm`` over :data:`DEMO_BANDWIDTH`); its
            ``workers`` and ``steps`` are replaced by the arguments above.
        json_path: write ``{"config", "network", "results"}`` there.
        out: stream for the progress lines and the table (default stdout).
        verbose: print progress lines and the table.
    """
    cfg = replace(config or BenchConfig(model="lm", bandwidth=DEMO_BANDWIDTH), workers=workers, steps=steps)
    report = run_e2e(methods, cfg, json_path=json_path, out=out, verbose=verbose, title="pycomm demo")
    return report["results"]
