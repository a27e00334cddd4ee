"""A standard Trainer script on a tiny Llama, with ckptio checkpoints: the test suite's subject.

Run as a script (a subprocess that a test may SIGKILL) or call :func:`run` in-process. The three
lines that differ from a stock Trainer script are marked ``# ckptio``. Writes a JSON summary:
the log history, the run's committed steps, the model's trainable weights' digest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from typing import Any

import torch
from ckptio_transformers import CkptioTrainer  # ckptio
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

VOCAB = 64
SEQ = 12


class TokenDataset(torch.utils.data.Dataset):
    """Synthetic token sequences (a fixed generator: the same data in every process)."""

    def __init__(self, n: int = 16, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_model(peft: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        attention_dropout=0.1,  # training draws random numbers: the RNG state must be restored
    )
    model: torch.nn.Module = LlamaForCausalLM(config)
    if peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=4,
                lora_alpha=8,
                lora_dropout=0.1,
                target_modules=["q_proj", "v_proj"],
                task_type="CAUSAL_LM",
            ),
        )
    return model


class PauseAfterSave(TrainerCallback):
    """Stops making progress once step ``step`` is saved, so that a test can kill the process."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            print(f"saved step {self.step}", flush=True)
            time.sleep(600)


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(
    url: str,
    output_dir: str,
    *,
    max_steps: int = 10,
    save_steps: int = 3,
    resume: Any = None,
    peft: bool = False,
    save_total_limit: int | None = None,
    pause_after: int | None = None,
    full_determinism: bool = True,
    storage_options: dict[str, Any] | None = None,
    extra_args: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    model = tiny_model(peft)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        warmup_steps=2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        seed=42,
        full_determinism=full_determinism,
        dataloader_num_workers=0,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        **(extra_args or {}),
    )
    trainer = CkptioTrainer(  # ckptio
        model=model,
        args=args,
        train_dataset=TokenDataset(),
        callbacks=[*(callbacks or []), *([PauseAfterSave(pause_after)] if pause_after else [])],
        ckptio_url=url,  # ckptio
        ckptio_storage_options=storage_options,
        **trainer_kwargs,
    )
    trainer.train(resume_from_checkpoint=resume)
    return {
        "log_history": trainer.state.log_history,
        "steps": trainer.checkpoint_manager.steps(),
        "digest": weights_digest(trainer.model),
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--save-steps", type=int, default=3)
    p.add_argument("--resume", default=None, help="'true', a step name or a URL")
    p.add_argument("--pause-after", type=int, default=None)
    p.add_argument("--peft", action="store_true")
    a = p.parse_args(argv)
    resume: Any = True if a.resume == "true" else a.resume
    summary = run(
        a.url,
        a.output_dir,
        max_steps=a.max_steps,
        save_steps=a.save_steps,
        resume=resume,
        peft=a.peft,
        pause_after=a.pause_after,
    )
    with open(a.out, "w") as f:
        json.dump(summary, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
