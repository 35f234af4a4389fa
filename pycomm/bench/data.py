"""An offline, real-text corpus for the demo: the Python standard library's source.

The corpus is the concatenated bytes of the ``*.py`` files found under
``sysconfig.get_paths()["stdlib"]`` (third-party ``site-packages`` and the
standard library's own test suites are skipped), in sorted path order, up to a
byte budget. Modelling it at the byte level gives a fixed vocabulary of 256
symbols, so no tokenizer or vocabulary needs to be built, and nothing has to be
downloaded.

The corpus is deterministic for a given Python installation (a different
Python version ships a different standard library, hence different text).

The last ``eval_fraction`` of the bytes is held out for evaluation; training
batches are drawn from the rest with a :class:`torch.Generator` seeded per rank
(``seed + rank``), so that every data-parallel worker sees different batches
while every run with the same seed sees the same ones.

Example::

    corpus = load_corpus(max_bytes=2_000_000)
    gen = train_generator(seed=0, rank=1)
    x, y = train_batch(corpus, batch_size=16, context=64, generator=gen)
    eval_set = eval_batches(corpus, num_batches=4, batch_size=32, context=64)
"""

from __future__ import annotations

import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

__all__ = [
    "VOCAB_SIZE",
    "Corpus",
    "stdlib_source_files",
    "load_corpus",
    "train_generator",
    "train_batch",
    "eval_batches",
]

logger = logging.getLogger(__name__)

#: Byte-level vocabulary: every byte value is a token.
VOCAB_SIZE = 256

# Directories never read: installed third-party packages and test suites
# (the latter hold deliberately odd files, e.g. bad encodings and huge literals).
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})

# Placed between two files so that a file's start is visible in the stream.
_FILE_SEPARATOR = b"\n\n"


@dataclass(frozen=True)
class Corpus:
    """A byte corpus split into a training part and a held-out part.

    Attributes:
        train: 1-D ``torch.uint8`` tensor of training bytes.
        held_out: 1-D ``torch.uint8`` tensor of evaluation bytes (the tail of
            the corpus, so it comes from files never seen in training).
        files: number of source files read.
        root: the directory the files were read from.
    """

    train: torch.Tensor
    held_out: torch.Tensor
    files: int
    root: str

    @property
    def num_bytes(self) -> int:
        """Total bytes in the corpus (training plus held-out)."""
        return int(self.train.numel() + self.held_out.numel())


def stdlib_source_files(root: Optional[str | Path] = None) -> list[Path]:
    """List the standard library's ``*.py`` files in a deterministic order.

    Args:
        root: directory to scan; defaults to ``sysconfig.get_paths()["stdlib"]``.

    Returns:
        The files sorted by their POSIX path relative to ``root``, skipping
        ``site-packages``, ``dist-packages``, test directories and ``__pycache__``.
    """
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    found = []
    for path in base.rglob("*.py"):
        rel = path.relative_to(base)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            continue
        if path.is_file():
            found.append((rel.as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def load_corpus(
    max_bytes: int = 2_000_000,
    eval_fraction: float = 0.1,
    root: Optional[str | Path] = None,
) -> Corpus:
    """Read the standard library's source into a byte corpus.

    Files are read whole, in :func:`stdlib_source_files` order, separated by a
    blank line, until ``max_bytes`` is reached (the last file is truncated).

    Args:
        max_bytes: size of the corpus in bytes.
        eval_fraction: fraction of the bytes, taken from the end, held out
            for evaluation.
        root: directory to read; defaults to the running interpreter's stdlib.

    Returns:
        A :class:`Corpus`.

    Raises:
        ValueError: on a bad argument, or if too little text was found.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    files = 0
    for path in stdlib_source_files(base):
        if total >= max_bytes:
            break
        try:
            text = path.read_bytes()
        except OSError as exc:  # unreadable file: skip it, the order stays fixed
            logger.debug("skipping %s: %s", path, exc)
            continue
        piece = (text + _FILE_SEPARATOR)[: max_bytes - total]
        chunks.append(piece)
        total += len(piece)
        files += 1
    data = b"".join(chunks)
    if len(data) < 1024:
        raise ValueError(f"only {len(data)} bytes of Python source found under {base}")
    if len(data) < max_bytes:
        logger.warning("corpus has %d bytes, fewer than the %d asked for", len(data), max_bytes)
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    split = int(round(len(data) * (1.0 - eval_fraction)))
    logger.info("corpus: %d bytes from %d files under %s (%d held out)", len(data), files, base, len(data) - split)
    return Corpus(train=tensor[:split].clone(), held_out=tensor[split:].clone(), files=files, root=str(base))


def train_generator(seed: int, rank: int) -> torch.Generator:
    """The random generator for one rank's training batches (seeded ``seed + rank``)."""
    gen = torch.Generator()
    gen.manual_seed(seed + rank)
    return gen


def _windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = starts.unsqueeze(1) + torch.arange(context + 1).unsqueeze(0)
    window = data[offsets].long()
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def train_batch(
    corpus: Corpus, batch_size: int, context: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one training batch of random windows from the training bytes.

    Args:
        corpus: the corpus.
        batch_size: number of sequences.
        context: sequence length.
        generator: the rank's generator (see :func:`train_generator`); it is
            advanced, so successive calls give successive batches.

    Returns:
        ``(inputs, targets)``, both ``int64`` of shape ``(batch_size, context)``;
        ``targets`` is ``inputs`` shifted left by one byte.
    """
    limit = corpus.train.numel() - context - 1
    if limit <= 0:
        raise ValueError(f"context {context} is longer than the training text")
    starts = torch.randint(0, limit, (batch_size,), generator=generator)
    return _windows(corpus.train, starts, context)


def eval_batches(
    corpus: Corpus, num_batches: int, batch_size: int, context: int, seed: int = 1234
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of evaluation batches from the held-out bytes.

    The windows depend only on the corpus and ``seed``, so every rank and every
    method is evaluated on the same text.

    Args:
        corpus: the corpus.
        num_batches: number of batches.
        batch_size: sequences per batch.
        context: sequence length.
        seed: seed of the window positions.

    Returns:
        A list of ``(inputs, targets)`` pairs as in :func:`train_batch`.
    """
    limit = corpus.held_out.numel() - context - 1
    if limit <= 0:
        raise ValueError(f"context {context} is longer than the held-out text")
    gen = torch.Generator()
    gen.manual_seed(seed)
    starts = torch.randint(0, limit, (num_batches, batch_size), generator=gen)
    return [_windows(corpus.held_out, row, context) for row in starts]
