"""The L-GreCo solver's op: the per-layer candidate of least total size within an error budget.

Argument rules, discretization and tie-breaking: :func:`pycomm.lgreco.solve`, which checks its
inputs and calls this wrapper; the kernel is in ``csrc/cpu/lgreco_solver.cpp`` (CPU only).
"""

from __future__ import annotations

import torch

from pycomm import _C  # noqa: F401  (loads the library that registers torch.ops.pycomm)

__all__ = ["lgreco_solve"]


def lgreco_solve(errors: torch.Tensor, sizes: torch.Tensor, budget: float,
                 levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.pycomm.lgreco_solve``: ``(choice, feasible)`` for the ``L x C`` float64 CPU tables.

    Returns:
        ``choice``: int64 ``[L]``, the chosen candidate (column) per layer; ``feasible``: a bool
        scalar tensor, False when no choice fits ``budget`` (``choice`` is then the least-error
        candidate per layer). The op checks the tables' values (ValueError naming the entry).
    """
    return torch.ops.pycomm.lgreco_solve(errors, sizes, budget, levels)


@torch.library.register_fake("pycomm::lgreco_solve")
def _lgreco_solve_fake(errors, sizes, budget, levels):
    return errors.new_empty((errors.shape[0],), dtype=torch.int64), errors.new_empty((), dtype=torch.bool)
