"""Fine-tune a tiny causal LM with LoRA and checkpoint it with ckptio's ``peft`` addon.

    python examples/peft_finetune/finetune.py --url ./peft-ckpts

The base model is built from a config (no download), so the example runs offline in seconds. Each
checkpoint holds the adapter and optimizer in ckptio's format (for resuming) and, written by the
``peft`` addon, ``adapter_model.safetensors`` + ``adapter_config.json`` that PEFT itself loads::

    PeftModel.from_pretrained(base_model, "./peft-ckpts/step_00000010")

The script ends by doing exactly that in a fresh model and checking the outputs match.
"""

from __future__ import annotations

import argparse
import json

import ckptio
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def base_model() -> LlamaForCausalLM:
    """The frozen base: the same weights every time (a stand-in for ``from_pretrained``)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="./peft-ckpts", help="checkpoint root (a path, s3://..., msc://...)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--storage-options", default=None, help="JSON object passed to the storage backend")
    args = p.parse_args(argv)
    opts = json.loads(args.storage_options) if args.storage_options else None

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base_model(), lora)
    model.print_trainable_parameters()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    state = {"model": ckptio.ModelState(model), "optim": ckptio.OptimizerState(model, opt), "step": 0}

    torch.manual_seed(1)
    batch = torch.randint(0, 256, (4, 16))
    with ckptio.CheckpointManager(
        args.url, addons=["peft"], retention=ckptio.KeepLatest(2), storage_options=opts
    ) as mgr:
        if mgr.latest_step() is not None:
            mgr.load(state)
            print(f"resumed at step {state['step']}")
        while state["step"] < args.steps:
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            state["step"] += 1
            if state["step"] % args.save_every == 0 or state["step"] == args.steps:
                mgr.save(state["step"], state, metrics={"loss": loss.item()})
                print(f"step {state['step']}: loss {loss.item():.4f}")
        last = mgr.url_of(mgr.latest_step() or 0)

    m = ckptio.manifest(str(last), storage_options=opts)
    print(f"{last}: {sorted(m.files)}")

    # The adapter files are plain PEFT files: load them with PEFT alone, without ckptio.
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch).logits
    if last.scheme == "file":
        fresh = PeftModel.from_pretrained(base_model(), last.path).eval()
        with torch.no_grad():
            got = fresh(input_ids=batch).logits
        same = torch.allclose(expected, got, atol=1e-5)
        print(f"PeftModel.from_pretrained({last.path!r}) reproduces the fine-tuned model: {same}")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
