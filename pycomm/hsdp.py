"""HSDP with a quantized replica all-reduce: FSDP2 shards inside a shard group (typically one node),
and pycomm's quantized all-reduce averages the shards across the replicate group (the traffic that
crosses nodes).

How it plugs into FSDP2 (torch 2.13, read from ``torch/distributed/fsdp/_fully_shard/``:
``_fully_shard.py``, ``_fsdp_param_group.py``, ``_fsdp_collectives.py``):

* ``FSDPModule.set_all_reduce_hook(hook)`` stores ``hook`` on the module's one param group (ValueError
  with several). ``foreach_reduce`` calls ``hook(reduce_output)`` once per param group per reduced
  backward, after the reduce-scatter, and ignores what it returns: the hook works **in place**.
  ``reduce_output`` is 1-D, this rank's shard of every gradient of the group, each parameter's
  dim-0-padded shard back to back (``padded_sharded_param_size``), in the reduce dtype
  (``MixedPrecisionPolicy.reduce_dtype``, else the gradients' dtype); FSDP casts it to the
  parameters' dtype afterwards. On CUDA the hook runs on the all-reduce stream (which waited for the
  reduce-scatter stream), so everything here is queued there and nothing waits for the device.
* With a native 2-D (HSDP) mesh the hook runs *after* PyTorch's own replica all-reduce, so it cannot
  replace it. Hence ``fully_shard`` gets the 1-D shard mesh only, and this module adds the replica
  all-reduce in the hook.
* Scaling at that point (``_get_gradient_divide_factors`` with the 1-D mesh, shard group of ``S``
  ranks, replicate group of ``R``): for float32/bfloat16 without a divide factor the reduce-scatter
  is an AVG, so the shard holds the mean over the ``S`` shard ranks; for float16 (or
  ``set_force_sum_reduction_for_comms``) the shard holds the sum divided by a pre-factor and FSDP
  divides by the post-factor (pre * post = ``S``) after the hook. Either way an AVG over the
  replicas gives the mean over all ``W = R * S`` ranks. With ``set_gradient_divide_factor(f)``,
  FSDP divides by ``f`` in total and native HSDP then SUMs over replicas; so does this hook.
* ``set_requires_all_reduce(False)`` (gradient accumulation that reduce-scatters every micro-batch
  but all-reduces only the last) is honoured as native HSDP does it: the shard is kept aside and
  zeroed, and added to the next shard that is all-reduced.

What is sent: each hooked shard goes through :func:`pycomm.distributed.quantized_all_reduce` over
the replicate group (the same collective as the DDP ``quant`` hook): every parameter's shard gets its
own buckets (``bucket_size`` elements, ``bits`` bits, stochastic rounding by default), the W-1 peer
chunks are exchanged with one ``all_to_all_single``, reduced in full precision, re-quantized once and
gathered with one ``all_gather``; every replica ends bit-identical. Per rank and step that is about
``2 (R-1)/R * record_bytes(bits, bucket_size) / bucket_size`` bytes per shard element instead of
``2 (R-1)/R * itemsize`` (about 7.8x less at 4 bits, 3.9x at 8, for float32). The reduce-scatter
inside the shard group stays uncompressed unless the user also applies :func:`pycomm.fsdp.compress`.

Non-finite values: a NaN or Inf in any rank's shard makes the collective fall back to an
uncompressed all-reduce of the whole shard on CPU (all replicas agree: they see the same gathered
headers), so the overflow reaches every replica; on CUDA the affected buckets decode as NaN on every
replica. The quantization kernels leave a zero residual for a non-finite bucket, so the residuals
stay finite and the next step is unaffected.

Error feedback (default on) keeps two float32 residuals per shard, as the DDP hook does: ``worker``
(what this rank has not sent yet, one value per shard element) and ``server`` (the re-quantization
error of the elements this rank reduces). Memory: about ``4 * (1 + 1/R)`` bytes per shard element,
i.e. a little more than one float32 copy of this rank's gradient shard, not of the full gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule

from pycomm import ops
from pycomm.distributed import mix_seed, quantized_all_reduce
from pycomm.hooks.param_state import (ParamStore, check_header, check_layout, check_module_calls, log_skipped,
                                      param_tensors_for_load)
from pycomm.hooks.quantized_allreduce import QuantPlan, build_quant_plan
from pycomm.ops.validation import check_bits_bucket

__all__ = ["init_hsdp_mesh", "compress_replicas", "ReplicaCompressionState", "STATE_FORMAT"]

#: ``state_dict()["format"]`` of this module's checkpoints.
STATE_FORMAT = 1

_CONFIG = ("bits", "bucket_size", "stochastic", "error_feedback", "seed")


def init_hsdp_mesh(device_type: str, shard_size: int) -> DeviceMesh:
    """A 2-D ``DeviceMesh`` of shape ``(W // shard_size, shard_size)`` named ``("replicate", "shard")``.

    Ranks ``[k * shard_size, (k + 1) * shard_size)`` form shard group ``k`` (one node, with torchrun's
    usual rank order); give ``mesh["shard"]`` to ``fully_shard`` and ``mesh["replicate"]`` to
    :func:`compress_replicas`.

    Raises:
        ValueError: ``shard_size`` is not a positive divisor of the world size.
    """
    world = dist.get_world_size()
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1 or world % shard_size:
        raise ValueError(f"shard_size must be a positive divisor of the world size ({world}), got {shard_size!r}")
    return init_device_mesh(device_type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


@dataclass
class _ModuleHook:
    """The all-reduce hook of one FSDP module (one param group)."""

    state: "ReplicaCompressionState"
    name: str                           # the module's name in the model ("" for the root)
    index: int                          # position among the hooked modules (mixed into the seed)
    param_group: Any                    # FSDP2's FSDPParamGroup (private API of torch 2.13)
    layout: list[tuple[str, int]]       # (parameter name, padded shard numel), in reduce_output order
    calls: int = 0
    pending: Optional[torch.Tensor] = None  # shards reduce-scattered while all-reduce was off
    plan: Optional[QuantPlan] = None

    def __call__(self, reduce_output: torch.Tensor) -> None:
        self.state._reduce(self, reduce_output)


@dataclass
class ReplicaCompressionState:
    """What :func:`compress_replicas` installed: one hook per FSDP module, by the module's name.

    Residuals are per rank (each rank holds its own shard): checkpoint every rank's
    :meth:`state_dict` and load it on the same rank of the same layout.
    """

    replicate_group: dist.ProcessGroup
    bits: int
    bucket_size: int
    stochastic: bool
    error_feedback: bool
    seed: int
    replicate_size: int
    shard_size: int
    shard_rank: int
    hooks: dict[str, _ModuleHook] = field(default_factory=dict)
    uncompressed_calls: int = 0         # shards all-reduced uncompressed (unsupported dtype)
    unkeyed_calls: int = 0              # shards whose layout was not the module's (see _reduce)
    _store: ParamStore = field(default_factory=ParamStore)  # where each parameter's residuals live

    # -- the hook --------------------------------------------------------------------------
    def _reduce(self, hook: _ModuleHook, out: torch.Tensor) -> None:
        group = hook.param_group
        if not getattr(group, "all_reduce_grads", True):
            # Accumulating without all-reduce: keep the shard for the next all-reduced one (what
            # native HSDP does with its partial_reduce_output) and let FSDP accumulate zero now.
            hook.pending = out.clone() if hook.pending is None else hook.pending.add_(out)
            out.zero_()
            return
        if hook.pending is not None:
            out.add_(hook.pending)
            hook.pending = None
        op = dist.ReduceOp.AVG if getattr(group, "gradient_divide_factor", None) is None else dist.ReduceOp.SUM
        hook.calls += 1
        if self.replicate_size == 1 or out.numel() == 0:
            return
        if out.dtype not in ops.SUPPORTED_DTYPES or not out.is_contiguous():
            self.uncompressed_calls += 1
            dist.all_reduce(out, op=op, group=self.replicate_group)
            return
        plan = self._plan_for(hook, out)
        seed = mix_seed(self.seed, hook.index, hook.calls, self.shard_rank)
        quantized_all_reduce(out, bits=self.bits, bucket_size=self.bucket_size, op=op, group=self.replicate_group,
                             stochastic=self.stochastic, seed=seed, worker_residual=plan.worker_residual,
                             server_residual=plan.server_residual, bucket_table=plan.table)

    def _plan_for(self, hook: _ModuleHook, out: torch.Tensor) -> QuantPlan:
        expected = sum(n for _, n in hook.layout)
        if out.numel() == expected:
            offsets, layers = 0, []
            for name, n in hook.layout:
                if n:
                    layers.append((name, offsets, n, 0))  # each parameter's padded shard is one whole piece
                offsets += n
            keyed = True
        else:
            # Some parameters had no gradient this step: FSDP packs only the others, and the hook is
            # not told which. Quantize the shard as one segment, without error feedback.
            self.unkeyed_calls += 1
            layers, keyed = [(f"{hook.name}#unkeyed", 0, out.numel(), 0)], False
        signature = (out.numel(), out.device, keyed)
        if hook.plan is not None and hook.plan.signature == signature:
            return hook.plan
        names = [name for name, _, _, _ in layers]
        plan = build_quant_plan(signature, names, layers, [], numel=out.numel(), device=out.device,
                                bucket_size=self.bucket_size, world=self.replicate_size,
                                rank=dist.get_rank(self.replicate_group), layer_bits=(self.bits,) * len(layers),
                                error_feedback=self.error_feedback and keyed,
                                where={name: (o, n, 0, n) for name, o, n, _ in layers})
        if plan.worker_residual is not None:  # another layout or a checkpoint: residuals by parameter name
            taken = self._store.take(names)
            plan.load({name: {k: v.to(out.device, torch.float32) for k, v in entry.items()}
                       for name, entry in taken.items()})
            self._store.claim(names, plan)
        hook.plan = plan
        return plan

    # -- persistence ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's state::

            {"format": 1, "method": "hsdp-quant",
             "config": {"bits", "bucket_size", "stochastic", "error_feedback", "seed"},
             "replicate_size": R, "shard_size": S, "shard_rank": s,
             "calls": {module name: hook calls (they seed the rounding)},
             "params": {parameter name: {"worker": float32 [padded shard numel],
                                         "server": float32 [padded shard numel]}}}

        ``params`` holds, for each parameter of this rank's shard, the worker residual (gradient
        units, not sent yet) and the server residual (units of the average; nonzero only on the
        elements this rank reduces), both over the parameter's dim-0-padded local shard, flattened.
        Only tensors, numbers, strings and dicts: it loads with ``torch.load(weights_only=True)``.
        """
        params = {name: {k: v.clone() for k, v in entry.items()} for name, entry in self._store.everything().items()}
        return {"format": STATE_FORMAT, "method": "hsdp-quant",
                "config": {key: getattr(self, key) for key in _CONFIG},
                "replicate_size": self.replicate_size, "shard_size": self.shard_size, "shard_rank": self.shard_rank,
                "calls": {name: hook.calls for name, hook in self.hooks.items()}, "params": params}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore this rank's :meth:`state_dict` (before the next backward).

        Args:
            state_dict: this rank's :meth:`state_dict` (``pycomm.checkpoint.load_rank_state_dict`` picks it
                from every rank's list).
            strict: raise on a setting, module or parameter that does not fit; ``False`` keeps this
                state's settings, loads what fits (the rest starts from zero) and logs what it skipped.

        Raises:
            CheckpointMismatch (a ValueError): another method or format, or another layout (replicate
                size, shard size, shard rank: even with ``strict=False``); with ``strict``, another
                setting, a module or a parameter this model does not shard, or a residual whose shape is
                not the parameter's padded shard, flattened.
        """
        skipped: list[str] = []
        check_header(state_dict, "hsdp-quant", {key: getattr(self, key) for key in _CONFIG}, strict, skipped,
                     state_format=STATE_FORMAT)
        check_layout(state_dict, {"replicate_size": self.replicate_size, "shard_size": self.shard_size,
                                  "shard_rank": self.shard_rank})
        calls = check_module_calls(state_dict.get("calls"), self.hooks, strict, skipped)
        shapes = {name: (n,) for hook in self.hooks.values() for name, n in hook.layout}
        fields = {"worker": self.error_feedback, "server": self.error_feedback}
        params = param_tensors_for_load(state_dict.get("params", {}), shapes, fields, strict, skipped)
        for name, hook in self.hooks.items():
            hook.calls = calls.get(name, hook.calls)
            hook.plan = None
            hook.pending = None
        self._store.clear()
        self._store.loose = {name: {k: v.reshape(-1).clone() for k, v in entry.items()} for name, entry in params.items()}
        log_skipped("HSDP", skipped)


def _replicate_process_group(replicate_group: Union[dist.ProcessGroup, DeviceMesh]) -> dist.ProcessGroup:
    if isinstance(replicate_group, DeviceMesh):
        if replicate_group.ndim != 1:
            raise ValueError(f"replicate_group must be a 1-D DeviceMesh (e.g. mesh['replicate']), got "
                             f"{replicate_group.ndim} dimensions")
        return replicate_group.get_group()
    if not isinstance(replicate_group, dist.ProcessGroup):
        raise ValueError(f"replicate_group must be a ProcessGroup or a 1-D DeviceMesh, got "
                         f"{type(replicate_group).__name__}")
    return replicate_group


def compress_replicas(model: torch.nn.Module, replicate_group: Union[dist.ProcessGroup, DeviceMesh],
                      bits: int = 4, bucket_size: int = 512, stochastic: bool = True, error_feedback: bool = True,
                      seed: int = 0) -> ReplicaCompressionState:
    """Average every FSDP module's gradient shards across ``replicate_group``, quantized.

    Apply ``fully_shard`` first, with the 1-D shard mesh (``mesh["shard"]`` of
    :func:`init_hsdp_mesh`), not a 2-D HSDP mesh. Every rank of the world must call this with the
    same arguments; it runs one small collective over the replicate group to check the layout.

    Args:
        model: the model, with ``fully_shard`` applied to its modules.
        replicate_group: the group of ranks that hold the same shard (``mesh["replicate"]`` or a
            ``ProcessGroup``).
        bits: 1..8 bits per element.
        bucket_size: elements per quantization bucket (a multiple of 8); each parameter's shard gets
            its own buckets.
        stochastic: unbiased stochastic rounding (else round to nearest).
        error_feedback: keep the worker and server residuals of each shard (see the module doc).
        seed: base seed of the rounding; mixed with the module, the call and the shard rank.

    Returns:
        The state, with ``state_dict()`` / ``load_state_dict()``.

    Raises:
        ValueError: bad bits or bucket size; no FSDP module; a module sharded over a 2-D (native
            HSDP) mesh or with several param groups; replicate size times shard size is not the world
            size; the replicate group and a shard group do not meet in exactly this rank; the ranks
            of the replicate group do not hold the same shard (rank in the shard group) or the
            same shard layout.
    """
    from torch.distributed.fsdp._fully_shard._fsdp_common import DDPMeshInfo, FSDPMeshInfo

    check_bits_bucket(bits, bucket_size)
    group = _replicate_process_group(replicate_group)
    me = dist.get_rank()
    world = dist.get_world_size()
    replicate_ranks = dist.get_process_group_ranks(group)
    if me not in replicate_ranks:
        raise ValueError(f"rank {me} is not in replicate_group (ranks {replicate_ranks})")
    names = {id(p): n for n, p in model.named_parameters()}
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    if not modules:
        raise ValueError("model has no FSDPModule: apply fully_shard(module, mesh=mesh['shard']) before "
                         "compress_replicas()")
    shard_ranks: Optional[list[int]] = None
    plans: list[tuple[str, FSDPModule, Any, list[tuple[str, int]]]] = []
    for name, module in modules:
        groups = module._get_fsdp_state()._fsdp_param_groups
        if len(groups) > 1:
            raise ValueError(f"FSDP module {name!r} has {len(groups)} param groups (shard_placement_fn with "
                             f"several meshes); compress_replicas needs one")
        if not groups:
            continue
        param_group = groups[0]
        info = param_group.mesh_info
        if isinstance(info, DDPMeshInfo) or not isinstance(info, FSDPMeshInfo):
            raise ValueError(f"FSDP module {name!r} is sharded over a {info.mesh.ndim}-D mesh with a replicate "
                             f"dimension (native HSDP), whose own all-reduce runs before any hook: give "
                             f"fully_shard the 1-D shard mesh (mesh['shard']) instead")
        ranks = dist.get_process_group_ranks(info.shard_process_group)
        if shard_ranks is None:
            shard_ranks = ranks
        elif ranks != shard_ranks:
            raise ValueError(f"FSDP module {name!r} is sharded over ranks {ranks}, another over {shard_ranks}; "
                             f"all modules must share one shard group")
        layout = [(names[id(p.sharded_param)], p.padded_sharded_param_size.numel()) for p in param_group.fsdp_params]
        plans.append((name, module, param_group, layout))
    if shard_ranks is None:
        raise ValueError("no FSDP module of the model has parameters")
    if len(replicate_ranks) * len(shard_ranks) != world:
        raise ValueError(f"replicate_group has {len(replicate_ranks)} ranks and the shard group {len(shard_ranks)}: "
                         f"their product must be the world size ({world}); build both with init_hsdp_mesh")
    if set(replicate_ranks) & set(shard_ranks) != {me}:
        raise ValueError(f"replicate_group (ranks {replicate_ranks}) and the shard group (ranks {shard_ranks}) must "
                         f"share exactly this rank ({me}): pass mesh['replicate'], not the shard group")
    shard_rank = shard_ranks.index(me)
    # The replicas must reduce the same shard: one small collective, so every rank sees every peer's view.
    mine = (shard_rank, len(shard_ranks), bits, bucket_size, [(n, layout) for n, _, _, layout in plans])
    views: list[Any] = [None] * len(replicate_ranks)
    dist.all_gather_object(views, mine, group=group)
    if any(view != mine for view in views):
        raise ValueError(f"the ranks of replicate_group {replicate_ranks} disagree on (shard rank, shard size, bits, "
                         f"bucket_size, layout): shard ranks {[v[0] for v in views]}; each replicate group must "
                         f"hold one rank of the same index from every shard group (use init_hsdp_mesh)")
    state = ReplicaCompressionState(group, bits, bucket_size, stochastic, error_feedback, seed,
                                    len(replicate_ranks), len(shard_ranks), shard_rank)
    for index, (name, module, param_group, layout) in enumerate(plans):
        hook = _ModuleHook(state, name, index, param_group, layout)
        module.set_all_reduce_hook(hook)
        state.hooks[name] = hook
    return state
