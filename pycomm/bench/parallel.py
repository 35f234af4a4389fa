"""Sharded data parallelism in the benchmark: FSDP2 (``fully_shard``) and HSDP, and how their methods attach.

``pycomm bench e2e --parallel fsdp`` shards the model over all workers; ``--parallel hsdp`` splits the workers
into ``replicas`` groups of ``workers // replicas`` consecutive ranks (one node each with ``--nodes``), shards
inside a group and averages across groups (see :func:`build_mesh`). The model is wrapped the same way for every
method (:func:`shard_model`): ``fully_shard`` on each child of the model's ``nn.ModuleList`` attributes (the
transformer blocks of ``lm``, the hidden layers of ``large``), then on the root (embeddings, head and the rest).

A sharded method's :attr:`~pycomm.bench.methods.MethodSpec.attach` is ``attach(model, mesh, config)``: it
applies ``fully_shard`` itself (on the mesh, or for the compressed HSDP rows on its ``"shard"`` dimension only)
and installs its compression, returning the state to keep alive.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from pycomm.bench.config import BenchConfig

__all__ = ["MESH_DIMS", "shard_units", "shard_model", "build_mesh", "hsdp_unavailable_reason", "attach_fsdp",
           "attach_fsdp_quant", "attach_hsdp", "attach_hsdp_quant"]

#: Dimension names of the HSDP mesh: replicas (outer), shards inside a replica (inner, consecutive ranks).
MESH_DIMS: tuple[str, str] = ("replicate", "shard")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules that get a ``fully_shard`` of their own (each one all-gathers and reduce-scatters as a unit):
    every child of the model's direct ``nn.ModuleList`` attributes, in order."""
    return [unit for child in model.children() if isinstance(child, nn.ModuleList) for unit in child]


def shard_model(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """``fully_shard`` each of :func:`shard_units` then the root, on ``mesh`` (1-D: FSDP; 2-D: PyTorch's HSDP,
    replicate on dimension 0, shard on 1), with FSDP2's defaults (``reshard_after_forward=True``, no mixed
    precision). Returns ``model`` (now an ``FSDPModule``)."""
    from torch.distributed.fsdp import fully_shard

    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def build_mesh(cfg: BenchConfig, world: int, device: torch.device) -> DeviceMesh:
    """The device mesh of ``cfg.parallel``: 1-D over all ``world`` ranks for ``"fsdp"``, 2-D
    ``(replicas, world // replicas)`` named :data:`MESH_DIMS` for ``"hsdp"`` (replica ``i`` is ranks
    ``i * shards .. (i + 1) * shards - 1``). A collective: every rank calls it."""
    if cfg.parallel == "fsdp":
        return init_device_mesh(device.type, (world,))
    if cfg.parallel == "hsdp":
        replicas = cfg.hsdp_replicas
        return init_device_mesh(device.type, (replicas, world // replicas), mesh_dim_names=MESH_DIMS)
    raise ValueError(f"no device mesh for parallel={cfg.parallel!r} (only 'fsdp' and 'hsdp' shard)")


def _compress_replicas() -> Callable[..., Any]:
    """``pycomm.hsdp.compress_replicas``, imported when a method needs it (ImportError that says what is missing)."""
    try:
        module = importlib.import_module("pycomm.hsdp")
    except ImportError as e:
        raise ImportError(f"the compressed HSDP rows need pycomm.hsdp.compress_replicas, and pycomm.hsdp cannot be "
                          f"imported in this build ({e}); run the uncompressed 'hsdp' row, or --parallel fsdp") from e
    function = getattr(module, "compress_replicas", None)
    if function is None:
        raise ImportError("the compressed HSDP rows need pycomm.hsdp.compress_replicas(model, replicate_group, "
                          "bits=..., error_feedback=...), which this build's pycomm.hsdp does not define")
    return function


def hsdp_unavailable_reason() -> Optional[str]:
    """Why the compressed HSDP rows cannot run in this build (no ``pycomm.hsdp.compress_replicas``), or None."""
    try:
        _compress_replicas()
    except ImportError as e:
        return str(e)
    return None


def attach_fsdp(model: nn.Module, mesh: DeviceMesh, cfg: BenchConfig) -> None:
    """Uncompressed FSDP2 (or, on a 2-D mesh, PyTorch's own HSDP): :func:`shard_model` only."""
    shard_model(model, mesh)


def attach_fsdp_quant(bits: int, model: nn.Module, mesh: DeviceMesh, cfg: BenchConfig) -> Any:
    """FSDP2 with pycomm's quantized reduce-scatter at ``bits`` bits, stochastic rounding and worker error
    feedback (:func:`pycomm.fsdp.compress`), seeded with the run's seed."""
    from pycomm.fsdp import compress

    shard_model(model, mesh)
    return compress(model, method="quant", bits=bits, seed=cfg.seed, error_feedback=True)


def attach_hsdp(model: nn.Module, mesh: DeviceMesh, cfg: BenchConfig) -> None:
    """PyTorch's HSDP, uncompressed: ``fully_shard`` on the 2-D mesh (reduce-scatter inside a replica, then
    FSDP's own all-reduce across replicas)."""
    shard_model(model, mesh)


def attach_hsdp_quant(bits: int, model: nn.Module, mesh: DeviceMesh, cfg: BenchConfig) -> Any:
    """HSDP with the replica all-reduce compressed: ``fully_shard`` on the mesh's ``"shard"`` dimension only
    (uncompressed reduce-scatter inside a replica), then ``pycomm.hsdp.compress_replicas`` across the
    ``"replicate"`` dimension at ``bits`` bits with error feedback (FSDP2's all-reduce hook, in place on the
    shard)."""
    compress_replicas = _compress_replicas()  # before sharding: a clear error, not a half-built model
    shard_model(model, mesh[MESH_DIMS[1]])
    return compress_replicas(model, mesh[MESH_DIMS[0]].get_group(), bits=bits, error_feedback=True)
