"""pycomm: compressed gradient communication for PyTorch data-parallel training.

One line on a DDP model::

    state = pycomm.register(ddp_model, "quant", bits=4)

Kernels are in :mod:`pycomm.ops`, collectives in :mod:`pycomm.distributed`,
DDP hooks in :mod:`pycomm.hooks`.
"""

from pycomm import ops  # noqa: F401  (loads the kernels)
from pycomm import (checkpoint, codec, compressors, distributed, fsdp, hooks, hsdp, kernels,  # noqa: F401
                    lgreco, topology, traffic, zo)
from pycomm.registry import available_methods, register, register_method
from pycomm.version import __version__

register_method("quant", hooks.QuantState, hooks.quantized_allreduce_hook,
                "bucketed max-min quantization (1-8 bits), scatter-reduce-allgather, error feedback")
register_method("dgc", hooks.DGCState, hooks.dgc_hook,
                "Deep Gradient Compression: top-k with momentum correction, clipping, masking, warm-up")
register_method("spsa-projection", hooks.ProjectionState, hooks.projection_hook,
                "shared-seed random projection: K one-byte coefficients per bucket per rank")

register_method("lgreco", hooks.LGreCoState, hooks.lgreco_hook,
                "L-GreCo: per-layer bits (family='quant') or top-k densities (family='topk') by an optimal DP solver")

__all__ = ["register", "register_method", "available_methods", "ops", "checkpoint", "codec", "compressors", "distributed", "fsdp", "hooks", "hsdp", "kernels", "lgreco", "topology", "traffic", "zo"]
