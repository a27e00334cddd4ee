"""Tiny real models and a tokenizer for the addon tests (built from configs; no downloads)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ["hello", "world", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]


def tiny_config(**overrides: object) -> LlamaConfig:
    kw: dict[str, object] = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    """The same weights for the same seed: "the base model" that tests rebuild independently."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**overrides)).eval()


def peft_model(
    seed: int = 0, use_dora: bool = False, targets: tuple[str, ...] = ("q_proj", "v_proj"), r: int = 4
):
    """A PEFT LoRA/DoRA model over :func:`tiny_llama` with non-trivial adapter weights (LoRA's B
    starts at zero, which would make every comparison vacuous)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(seed),
        LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=list(targets), use_dora=use_dora, task_type="CAUSAL_LM"
        ),
    )
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def fresh_peft_model(seed: int = 0, use_dora: bool = False, targets: tuple[str, ...] = ("q_proj", "v_proj")):
    """Same base weights, default (untrained) adapter: a destination to load into."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        tiny_llama(seed),
        LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), use_dora=use_dora, task_type="CAUSAL_LM"),
    ).eval()


def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(7))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids()).logits


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer built locally, wrapped like any HF fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )
