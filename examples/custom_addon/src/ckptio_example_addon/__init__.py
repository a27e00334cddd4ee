"""ckptio-example-addon: how a separately installed package adds an addon to ckptio."""

from .addon import RUN_INFO, RunInfoAddon

__all__ = ["RUN_INFO", "RunInfoAddon"]
