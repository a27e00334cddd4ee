"""A tiny LightningModule and data for the integration tests (CPU, a few ms per step)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

STEPS_PER_EPOCH = 4


class TinyModel(LightningModule):
    def __init__(self, hidden: int = 8, lr: float = 0.05, **extra: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, hidden),
            torch.nn.BatchNorm1d(hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, 2),
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, betas=(0.8, 0.99))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4 * STEPS_PER_EPOCH, 4, generator=g)
        y = torch.randn(4 * STEPS_PER_EPOCH, 2, generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


class StopAt(Exception):
    """Raised by :class:`Interrupt` to simulate a crash."""


class Interrupt(__import__("lightning").pytorch.Callback):
    """Raises :class:`StopAt` once ``trainer.global_step`` reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            raise StopAt(f"interrupted at step {trainer.global_step}")


def trainer(**kwargs: Any) -> Trainer:
    opts: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    opts.update(kwargs)
    return Trainer(**opts)


def fresh_model(**kwargs: Any) -> TinyModel:
    seed_everything(7, verbose=False)
    return TinyModel(**kwargs)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
