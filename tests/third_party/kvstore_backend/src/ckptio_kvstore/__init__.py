"""Example third-party ckptio backend serving ``kv://<store>/<key>``."""

from .backend import KVBackend

__all__ = ["KVBackend"]
