"""Zeroth-order training with one byte per worker per step (SPSA / MeZO with shared seeds).

Each step, rank r draws a perturbation z_r from Philox under the seed
``mix_seed(seed, step, r)``, evaluates the loss at θ + εz_r and θ - εz_r,
and encodes the projected gradient ``g_r = (L+ - L-) / (2ε)`` in one byte
(:class:`pycomm.codec.LogByteCodec`). One ``all_gather`` moves the W bytes; that
is the only communication. Every rank decodes all W bytes, its own included, and
applies ``θ -= (lr / W) Σ_r ĝ_r z_r`` in rank order, regenerating each z_r from
its seed, so the parameters stay bit-identical on every rank.

Exactness. θ is never perturbed in place (θ + εz - 2εz + εz is not θ in floating
point). With a model, each module's own parameters are swapped for perturbed
copies (θ + εz, computed out of place by one fused kernel) while that module's
forward runs, and swapped back after it: θ itself is untouched, and the extra
memory is one module's parameters at a time. With a plain list of parameters
there is no forward to hook, so all of them are swapped at once (one extra copy
of those parameters). The update is one fused in-place ``axpy`` per rank, the
same operations in the same order on every rank.

The perturbed forwards run in eval mode (dropout off); the training mode is
restored after the step. Perturbations are Philox Gaussians (or Rademacher
signs), a pure function of (seed, element index), identical on CPU and CUDA.

Example::

    import torch, torch.distributed as dist, pycomm
    dist.init_process_group("gloo")                       # under torchrun
    model = torch.nn.Linear(16, 1)
    opt = pycomm.zo.SPSA(model, lr=1e-2, eps=1e-3, seed=0)
    opt.sync(src=0)                                       # same starting point everywhere
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    def closure():
        return torch.nn.functional.mse_loss(model(x), y)
    loss = opt.step(closure)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
import torch.distributed as dist

from pycomm import ops
from pycomm.ops.philox import philox_distribution_code
from pycomm.codec import LogByteCodec
from pycomm.distributed import all_gather_into_tensor, mix_seed

__all__ = ["SPSA"]

class SPSA:
    """One-byte SPSA optimizer (see the module docstring).

    Args:
        params_or_model: an ``nn.Module`` (preferred: perturbation module by module) or an
            iterable of parameters.
        lr: learning rate.
        eps: perturbation scale ε.
        group: process group (None: the default group; works without torch.distributed too).
        seed: base seed shared by all ranks.
        distribution: ``"gaussian"`` or ``"rademacher"``.
        codec: the one-byte codec of the projected gradient.
    """

    def __init__(self, params_or_model: Union[torch.nn.Module, Iterable[torch.nn.Parameter]], lr: float,
                 eps: float = 1e-3, group: Optional[dist.ProcessGroup] = None, seed: int = 0,
                 distribution: str = "gaussian", codec: LogByteCodec = LogByteCodec()) -> None:
        if lr <= 0 or eps <= 0:
            raise ValueError(f"lr and eps must be positive, got lr={lr}, eps={eps}")
        philox_distribution_code(distribution)  # validates
        self.model = params_or_model if isinstance(params_or_model, torch.nn.Module) else None
        source = self.model.parameters() if self.model is not None else params_or_model
        self.params: list[torch.Tensor] = []
        seen: set[int] = set()
        for p in source:
            if id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        if not self.params:
            raise ValueError("SPSA needs at least one parameter")
        for p in self.params:
            if p.dtype not in ops.SUPPORTED_DTYPES or not p.is_contiguous():
                raise ValueError(f"parameters must be contiguous float32/float16/bfloat16, got {p.dtype}")
        self.offsets: dict[int, int] = {}
        offset = 0
        for p in self.params:
            self.offsets[id(p)] = offset
            offset += p.numel()
        self.lr = lr
        self.eps = eps
        self.group = group
        self.seed = seed
        self.distribution = distribution
        self.codec = codec
        self.step_count = 0
        self.last_codes: Optional[torch.Tensor] = None
        self.peak_perturbed_bytes = 0  # largest total size of perturbed copies alive at once
        self._live_bytes = 0

    # -- distributed helpers -----------------------------------------------------
    def _world_rank(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.group), dist.get_rank(self.group)
        return 1, 0

    def seed_for(self, step: int, rank: int) -> int:
        """The perturbation seed of ``rank`` at ``step``."""
        return mix_seed(self.seed, step, rank)

    # -- perturbed evaluation ------------------------------------------------------
    def _perturbed(self, params: list[torch.Tensor], seed: int, alpha: float) -> list[torch.Tensor]:
        copies = []
        for p in params:
            (copy,) = ops.philox_perturbed_copy([p.detach()], seed, alpha, self.distribution, self.offsets[id(p)])
            copies.append(copy)
        return copies

    @contextlib.contextmanager
    def _swapped(self, params: list[torch.Tensor], seed: int, alpha: float) -> Iterator[None]:
        originals = [p.data for p in params]
        copies = self._perturbed(params, seed, alpha)
        size = sum(c.numel() * c.element_size() for c in copies)
        self._live_bytes += size
        self.peak_perturbed_bytes = max(self.peak_perturbed_bytes, self._live_bytes)
        try:
            for p, c in zip(params, copies):
                p.data = c
            yield
        finally:
            for p, o in zip(params, originals):
                p.data = o
            self._live_bytes -= size

    @contextlib.contextmanager
    def _perturbation(self, seed: int, alpha: float) -> Iterator[None]:
        if self.model is None:
            with self._swapped(self.params, seed, alpha):
                yield
            return
        handles = []
        stack: list[contextlib.ExitStack] = []
        for module in self.model.modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in self.offsets]
            if not own:
                continue

            def pre_hook(mod: torch.nn.Module, args: Any, own: list = own) -> None:
                exit_stack = contextlib.ExitStack()
                exit_stack.enter_context(self._swapped(own, seed, alpha))
                stack.append(exit_stack)

            def post_hook(mod: torch.nn.Module, args: Any, output: Any) -> None:
                stack.pop().close()

            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            while stack:  # a forward that raised
                stack.pop().close()

    def _evaluate(self, closure: Callable[[], torch.Tensor], seed: int, alpha: float) -> float:
        with self._perturbation(seed, alpha):
            return float(closure())

    # -- the step --------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> float:
        """One SPSA step; ``closure()`` returns the loss (it runs under ``torch.no_grad``).

        Returns the mean of the two perturbed losses.
        """
        world, rank = self._world_rank()
        seed = self.seed_for(self.step_count, rank)
        was_training = self.model.training if self.model is not None else False
        if self.model is not None:
            self.model.eval()
        try:
            loss_plus = self._evaluate(closure, seed, self.eps)
            loss_minus = self._evaluate(closure, seed, -self.eps)
        finally:
            if self.model is not None and was_training:
                self.model.train()
        g = (loss_plus - loss_minus) / (2 * self.eps)
        device = self.params[0].device
        code = self.codec.encode(torch.tensor([g], dtype=torch.float64)).to(device)
        if world > 1:
            codes = torch.empty(world, dtype=torch.uint8, device=device)
            all_gather_into_tensor(codes, code, group=self.group)
        else:
            codes = code
        self.last_codes = codes.cpu()
        decoded = self.codec.decode(self.last_codes)
        # Rank order, the sender's own decoded value included; one pass over the parameters
        # (bit for bit the W successive philox_axpy_ updates, zero coefficients skipped).
        seeds = [self.seed_for(self.step_count, r) for r in range(world)]
        ops.philox_axpy_multi_(self.params, seeds, (-self.lr / world) * decoded, self.distribution, 0)
        self.step_count += 1
        return 0.5 * (loss_plus + loss_minus)

    # -- state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])
        self.seed = int(state["seed"])

    @torch.no_grad()
    def sync(self, src: int = 0) -> None:
        """Take the parameters and the step count from rank ``src`` (e.g. for a late joiner)."""
        world, _ = self._world_rank()
        if world == 1:
            return
        global_src = dist.get_global_rank(self.group, src) if self.group is not None else src
        for p in self.params:
            dist.broadcast(p.data, src=global_src, group=self.group)
        step = torch.tensor([self.step_count, self.seed], dtype=torch.int64, device=self.params[0].device)
        dist.broadcast(step, src=global_src, group=self.group)
        self.step_count, self.seed = int(step[0]), int(step[1])
