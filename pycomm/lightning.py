"""PyTorch Lightning integration: compressed DDP communication through one Trainer callback.

Lightning is optional: ``import pycomm`` never imports it; importing this module does (it needs
``pytorch-lightning``, or the ``lightning`` package's ``lightning.pytorch``).

Why a callback and not ``DDPStrategy(ddp_comm_hook=...)``: Lightning registers a communication hook
only when the root device is CUDA, so on CPU the hook is silently ignored, and Lightning's checkpoint
would hold no compressor state. :class:`PycommCallback` registers the method on the DDP-wrapped model
at fit start (CPU and GPU alike), writes every rank's compressor state into Lightning's checkpoint and
gives each rank its own part back on ``trainer.fit(model, ckpt_path=...)``.

Example::

    import pytorch_lightning as pl
    from pycomm.lightning import PycommCallback

    compress = PycommCallback("quant", bits=4)
    trainer = pl.Trainer(accelerator="gpu", devices=8, strategy="ddp", callbacks=[compress])
    trainer.fit(model)                                 # gradients all-reduced at 4 bits
    print(compress.state.iter)                         # the hook's state, e.g. its step counter

    # later, in a new job: the weights, the optimizer and every rank's residuals resume
    trainer = pl.Trainer(accelerator="gpu", devices=8, strategy="ddp",
                         callbacks=[PycommCallback("quant", bits=4)])
    trainer.fit(model, ckpt_path="epoch=9-step=1000.ckpt")
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

try:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback
except ImportError:  # the unified `lightning` package ships the same trainer as lightning.pytorch
    try:
        import lightning.pytorch as pl  # type: ignore[no-redef]
        from lightning.pytorch.callbacks import Callback  # type: ignore[no-redef,assignment]
    except ImportError as e:
        raise ImportError("pycomm.lightning needs PyTorch Lightning: pip install pytorch-lightning "
                          "(pycomm itself does not depend on it)") from e

import pycomm

__all__ = ["PycommCallback"]


class PycommCallback(Callback):
    """Compress a Lightning DDP run's gradients with a pycomm method; checkpoint its state per rank.

    At fit start the callback calls ``pycomm.register(ddp_model, method, process_group, **options)`` on
    the strategy's DistributedDataParallel model, so it needs a DDP strategy (``"ddp"``,
    ``"ddp_spawn"``, ``"ddp_notebook"`` or ``DDPStrategy(...)``) and no ``ddp_comm_hook`` of its own.
    Calling ``fit`` again (Lightning wraps the model in a new DDP each time) registers the method on the
    new wrapper and carries the state over; a wrapper that already has it is left alone.

    Checkpoints: whenever Lightning builds a checkpoint (on every rank; only rank 0 writes the file),
    the callback gathers every rank's ``state.state_dict()`` (a collective, so save on every rank, as
    Lightning requires anyway) and stores them in rank order with the method and the world size.
    ``trainer.fit(model, ckpt_path=...)`` gives rank r entry r (:func:`pycomm.checkpoint.load_rank_state_dict`:
    on another world size a rank beyond the saved ones takes rank 0's step and settings and starts from
    zero residuals, with a warning). A checkpoint of another method raises ValueError.

    Example::

        compress = PycommCallback("dgc", density=0.01, momentum=0.9)
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", callbacks=[compress])
        trainer.fit(model)
        trainer.fit(model, ckpt_path="last.ckpt")   # a later job: each rank resumes its u and v

    Args:
        method: a name from :func:`pycomm.available_methods` (e.g. ``"quant"``).
        process_group: the group the hook communicates over (None: the default group).
        **options: the method's options (e.g. ``bits=4`` for ``"quant"``).
    """

    def __init__(self, method: str, process_group: Optional[dist.ProcessGroup] = None, **options: Any) -> None:
        if method not in pycomm.available_methods():
            raise ValueError(f"unknown method {method!r}; available: {', '.join(pycomm.available_methods())}")
        self.method = method
        self.process_group = process_group
        self.options = dict(options)
        self._state: Any = None
        self._ddp: Optional[weakref.ref] = None  # the DDP wrapper the hook is registered on
        self._saved: Optional[dict[str, Any]] = None  # a checkpoint's entry, waiting for the hook state
        self._fitting = False

    @property
    def state(self) -> Any:
        """The hook state that :func:`pycomm.register` returned (None before the first fit)."""
        return self._state

    # -- registration --------------------------------------------------------------
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        ddp = trainer.strategy.model
        if not isinstance(ddp, DistributedDataParallel):
            raise RuntimeError(
                f"PycommCallback needs a DistributedDataParallel model, but {type(trainer.strategy).__name__} "
                f"gave a {type(ddp).__name__}. Use a DDP strategy: Trainer(strategy='ddp') (or 'ddp_spawn', "
                "'ddp_notebook', DDPStrategy(...)); with one device there is nothing to communicate.")
        if self._ddp is None or self._ddp() is not ddp:
            previous = self._state
            self._state = self._register(ddp)
            self._ddp = weakref.ref(ddp)
            if previous is not None and self._saved is None:
                self._state.load_state_dict(previous.state_dict())  # a second fit goes on where it stopped
        if self._saved is not None:
            self._restore(self._saved)
        self._fitting = True

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self._fitting = False

    def _register(self, ddp: DistributedDataParallel) -> Any:
        try:
            return pycomm.register(ddp, self.method, self.process_group, **self.options)
        except RuntimeError as e:
            if "only be called once" not in str(e):
                raise
            raise RuntimeError(f"PycommCallback({self.method!r}): the DDP model already has a communication "
                               "hook (DDPStrategy(ddp_comm_hook=...)?); use either the callback or the "
                               "strategy's hook, not both") from e

    # -- checkpointing -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every rank's hook state, gathered (a collective: Lightning calls it on every rank)."""
        if self._state is None:
            return {}
        states = pycomm.checkpoint.gather_state_dicts(self._state, self.process_group)
        return {"method": self.method, "world_size": len(states), "rank_state_dicts": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's entry for this rank's hook state.

        For DDP strategies Lightning calls this before ``on_fit_start``, which applies it once the
        method is registered; a strategy that restores after setup gets it applied at once."""
        if state_dict.get("method") != self.method:
            raise ValueError(f"the checkpoint holds pycomm state of method {state_dict.get('method')!r}, "
                             f"but this PycommCallback runs {self.method!r}")
        self._saved = state_dict
        if self._fitting and self._state is not None:
            self._restore(state_dict)

    def _restore(self, saved: dict[str, Any]) -> None:
        self._saved = None
        pycomm.checkpoint.load_rank_state_dict(self._state, saved["rank_state_dicts"], group=self.process_group)

