"""Tiny transformers models built from configs (nothing is downloaded) and the rank bodies of the
two-rank tests (top level, so spawn can pickle them). The safetensors tests build theirs from
:func:`llama_config` too (``tests/safetensors/_models.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: the shape every tiny config here shares: two layers of four heads over two KV heads
TINY = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
#: :func:`llama_config`'s default sizes
LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128)
#: what the two MoE configs share
MOE = dict(vocab_size=128, hidden_size=32, num_experts_per_tok=2, tie_word_embeddings=False)


def tiny_config(name: str, **fields: Any) -> Any:
    """``transformers.<name>`` (a config class) of the :data:`TINY` shape with ``fields`` on top."""
    import transformers

    return getattr(transformers, name)(**{**TINY, **fields})


def llama_config(tied: bool = True, **sizes: int) -> Any:
    """A tiny Llama; ``sizes`` replace :data:`LLAMA`'s (``vocab_size``, ``hidden_size``...)."""
    return tiny_config("LlamaConfig", **{**LLAMA, **sizes}, tie_word_embeddings=tied)


def mixtral_config() -> Any:
    return tiny_config("MixtralConfig", **MOE, intermediate_size=48, num_local_experts=4)


def qwen3_moe_config() -> Any:
    moe = dict(moe_intermediate_size=16, num_experts=4, decoder_sparse_step=1)
    return tiny_config("Qwen3MoeConfig", **MOE, **moe, intermediate_size=64, head_dim=8)


CONFIGS = {"llama": llama_config, "mixtral": mixtral_config, "qwen3_moe": qwen3_moe_config}


def build(kind: str, seed: int = 0, *, meta: bool = False, dtype: torch.dtype = torch.float32) -> Any:
    """A model of ``kind`` with seeded random weights (or on the meta device)."""
    from transformers import AutoModelForCausalLM

    cfg = CONFIGS[kind]()
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def save_hf(kind: str, path: Path, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0, **kw: Any) -> Path:
    """``save_pretrained`` of a seeded model of ``kind``, in ``dtype``."""
    model = build(kind, seed).to(dtype)
    model.save_pretrained(path, **kw)
    return path


def reference(path: Path | str, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


def input_ids(vocab: int) -> torch.Tensor:
    return (torch.arange(24).reshape(2, 12) * 7 + 3) % vocab


@torch.no_grad()
def logits(model: Any, vocab: int) -> torch.Tensor:
    return model(input_ids=input_ids(vocab)).logits


def tensor_bytes(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * {"BF16": 2, "F16": 2, "F32": 4}[sl.get_dtype()]
    return total


def load_meta_fsdp(rank: int, world: int, kind: str, hf_dir: str) -> dict[str, Any]:
    """On each rank: build ``kind`` on the meta device, ``fully_shard`` it, load the HF directory
    with ckptio (counting the bytes this rank reads), and compare with ``from_pretrained``."""
    import ckptio
    import ckptio_local.backend as local
    from ckptio_safetensors import reset_non_persistent_buffers
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    counted = {"read_into": 0, "read_bytes": 0}
    orig_into, orig_bytes = local.LocalBackend.read_into, local.LocalBackend.read_bytes

    def read_into(self: Any, path: str, offset: int, out: memoryview) -> None:
        counted["read_into"] += len(out)
        orig_into(self, path, offset, out)

    def read_bytes(self: Any, path: str, offset: int = 0, length: int | None = None) -> bytes:
        data = orig_bytes(self, path, offset, length)
        counted["read_bytes"] += len(data)
        return data

    local.LocalBackend.read_into = read_into  # type: ignore[method-assign]
    local.LocalBackend.read_bytes = read_bytes  # type: ignore[method-assign]
    try:
        model = build(kind, meta=True)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        result = ckptio.load({"model": ckptio.ModelState(model)}, hf_dir)  # strict
    finally:
        local.LocalBackend.read_into, local.LocalBackend.read_bytes = orig_into, orig_bytes  # type: ignore[method-assign]
    local_bytes = sum(
        p.to_local().numel() * p.to_local().element_size() for p in model.parameters()
    )  # fp32 shard bytes
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    reset_non_persistent_buffers(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    vocab = model.config.vocab_size
    out = logits(model, vocab)
    ref_equal = logits_equal = None
    if rank == 0:
        ref = reference(hf_dir)
        ref_sd = ref.state_dict()
        ref_equal = full.keys() == ref_sd.keys() and all(torch.equal(full[k], ref_sd[k]) for k in ref_sd)
        logits_equal = bool(torch.allclose(out, logits(ref, vocab), rtol=0, atol=1e-5))
    return {
        "read_into": counted["read_into"],
        "read_bytes": counted["read_bytes"],
        "result_bytes": result.bytes,
        "local_fp32_bytes": local_bytes,
        "tied": tied,
        "state_equal": ref_equal,
        "logits_equal": logits_equal,
        "missing": result.missing,
        "unexpected": result.unexpected,
    }
