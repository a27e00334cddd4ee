"""Checkpoint formats. ``native`` (DCP planning, raw tensor files, JSON metadata) ships with core."""

from .base import Format, FormatWriter, TensorEntry

__all__ = ["Format", "FormatWriter", "TensorEntry"]
