"""Checkpoint formats. ``native`` (DCP planning, raw tensor files, JSON metadata) ships with core."""

from .base import Format, FormatReader, FormatWriter, TensorEntry

__all__ = ["Format", "FormatReader", "FormatWriter", "TensorEntry"]
