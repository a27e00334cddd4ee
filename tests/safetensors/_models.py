"""Tiny models and rank bodies shared by the safetensors tests (top level, so spawn can pickle them)."""

from __future__ import annotations

from typing import Any

import torch

from tests.hf._models import llama_config


def tiny_llama_config() -> Any:
    """:func:`tests.hf._models.llama_config`, smaller and untied."""
    return llama_config(tied=False, vocab_size=128, hidden_size=32, intermediate_size=64)


def build_llama(seed: int, shard: bool) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config())
    if shard:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def input_ids() -> torch.Tensor:
    return (torch.arange(16).reshape(2, 8) * 7) % 128


def fsdp_save_and_reload(rank: int, world: int, root: str) -> dict[str, Any]:
    """On each rank: train one step of an FSDP2 tiny Llama, save it with ckptio (safetensors),
    dump the full state (rank 0) as the reference, then load into a fresh FSDP2 model and compare."""
    import ckptio
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = build_llama(0, shard=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    state = {"model": ckptio.ModelState(model), "optim": ckptio.OptimizerState(model, opt), "step": 1}
    ckptio.save(state, f"safetensors+file://{root}/ck")
    import torch.distributed as dist
    from ckptio_safetensors import consolidate

    # every rank writes every other output file; rank 0 publishes the index
    consolidate(
        f"{root}/ck", f"{root}/hf2", max_shard_size=20_000, process_group=dist.group.WORLD, progress=False
    )
    full_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=full_opts)
    if rank == 0:
        torch.save(full, f"{root}/ref.pt")

    fresh = build_llama(1, shard=True)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    state2 = {"model": ckptio.ModelState(fresh), "optim": ckptio.OptimizerState(fresh, fresh_opt), "step": 0}
    ckptio.load(state2, f"{root}/ck")
    loaded = get_model_state_dict(fresh, options=full_opts)
    equal = rank != 0 or (full.keys() == loaded.keys() and all(torch.equal(full[k], loaded[k]) for k in full))
    # the optimizer state must come back too: one more identical step gives identical weights
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(input_ids=ids, labels=ids).loss.backward()
        o.step()
    after_a = get_model_state_dict(model, options=full_opts)
    after_b = get_model_state_dict(fresh, options=full_opts)
    same_step = rank != 0 or all(torch.equal(after_a[k], after_b[k]) for k in after_a)
    return {"equal": equal, "step": state2["step"], "same_after_step": same_step}
