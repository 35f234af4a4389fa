"""DDP communication hooks, one file per method.

Each hook is ``hook(state, bucket) -> Future[Tensor]`` for
``DistributedDataParallel.register_comm_hook``; :func:`pycomm.register` does it in one line.
"""

from pycomm.hooks.agreement import RankDisagreementError
from pycomm.hooks.dgc import DGCState, dgc_hook
from pycomm.hooks.lgreco import LGreCoState, lgreco_hook
from pycomm.hooks.quantized_allreduce import QuantState, quantized_allreduce_hook
from pycomm.hooks.spsa_projection import ProjectionState, projection_hook

__all__ = ["QuantState", "quantized_allreduce_hook", "DGCState", "dgc_hook", "ProjectionState", "projection_hook",
           "LGreCoState", "lgreco_hook", "RankDisagreementError"]
