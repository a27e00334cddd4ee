"""Logging set-up for the ``ckptio`` command line (libraries never configure logging themselves).

The library logs through the ``ckptio`` logger tree (``ckptio``, ``ckptio.manager``,
``ckptio.plugins``...): one INFO line per save and load with its throughput, warnings for
things a user should know about. The command line shows warnings by default, INFO with ``-v``
and DEBUG with ``-vv``, on stderr so that ``--json`` output on stdout stays parseable.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


def level_for(verbosity: int) -> int:
    """``0`` -> WARNING, ``1`` (``-v``) -> INFO, ``2`` or more (``-vv``) -> DEBUG."""
    return logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG


@contextmanager
def cli_logging(verbosity: int = 0, stream: TextIO | None = None) -> Iterator[logging.Handler]:
    """Route the ``ckptio`` loggers to ``stream`` (stderr) while the block runs, then undo it.

    Undoing matters because ``ckptio.cli.main()`` also runs inside other programs and tests: the
    logger's level, handlers and propagation are restored exactly as they were.
    """
    logger = logging.getLogger("ckptio")
    saved = (logger.level, logger.propagate)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    fmt = "%(levelname)s %(name)s: %(message)s" if verbosity >= 2 else "%(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)
    logger.setLevel(level_for(verbosity))
    logger.propagate = False  # the root logger's handlers (if any) would print every line twice
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


__all__ = ["cli_logging", "level_for"]
