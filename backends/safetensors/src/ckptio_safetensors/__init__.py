"""ckptio-safetensors: Hugging Face safetensors as a ckptio format.

Use it with a ``safetensors+`` URL prefix (``safetensors+file:///ckpt``, ``safetensors+s3://b/run``,
``safetensors+msc://profile/run``); loads detect the format from the manifest, so a plain URL loads
it back. Every file goes through the backend's file API, so the format works on every backend.
"""

from __future__ import annotations

from .hf import INDEX_NAME, write_hf_checkpoint

__all__ = ["INDEX_NAME", "write_hf_checkpoint"]
