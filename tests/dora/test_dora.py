"""DoRA magnitude key names: the rename functions and the ``dora`` addon on real checkpoints."""

from __future__ import annotations

import ckptio
import ckptio_dora as d
import pytest
import torch
from ckptio.checkpoint import open_backend
from ckptio.plugins import get_format

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

M = "model.layers.0.self_attn.q_proj"


def test_in_memory_names_map_to_the_hf_on_disk_name():
    assert d.to_hf_key(f"{M}.lora_magnitude_vector.default.weight") == f"{M}.lora_magnitude_vector"
    assert d.to_hf_key(f"{M}.lora_magnitude_vector.my_adapter.weight") == f"{M}.lora_magnitude_vector"
    assert d.to_hf_key(f"{M}.lora_magnitude") == f"{M}.lora_magnitude_vector"  # NeMo AutoModel
    assert d.to_hf_key(f"{M}.lora_magnitude_vector") == f"{M}.lora_magnitude_vector"
    for other in (
        f"{M}.lora_A.weight",
        f"{M}.weight",
        "lora_magnitude",
        "x.lora_magnitude_vector.default.bias",
    ):
        assert d.to_hf_key(other) == other


def test_on_disk_names_including_legacy_map_back_to_each_stack():
    for disk in (f"{M}.lora_magnitude_vector", f"{M}.lora_magnitude_vector.default.weight"):
        assert d.from_hf_key(disk) == f"{M}.lora_magnitude_vector.default.weight"
        assert d.from_hf_key(disk, adapter="other") == f"{M}.lora_magnitude_vector.other.weight"
        assert d.from_hf_key(disk, style="nemo") == f"{M}.lora_magnitude"
    assert d.from_hf_key(f"{M}.lora_B.weight", style="nemo") == f"{M}.lora_B.weight"
    with pytest.raises(ValueError, match="style"):
        d.from_hf_key(f"{M}.lora_magnitude_vector", style="x")  # type: ignore[arg-type]


def test_dict_helpers_round_trip_and_refuse_mixed_spellings():
    sd = {f"{M}.lora_A.weight": 1, f"{M}.lora_magnitude": 2}
    disk = d.to_hf(sd)
    assert disk == {f"{M}.lora_A.weight": 1, f"{M}.lora_magnitude_vector": 2}
    assert d.from_hf(disk, style="nemo") == sd
    with pytest.raises(ValueError, match="mixes spellings"):
        d.to_hf({f"{M}.lora_magnitude": 1, f"{M}.lora_magnitude_vector": 2})


# -- the addon on real checkpoints -----------------------------------------------------------
class _Holder(torch.nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(n))


class _Proj(torch.nn.Module):
    def __init__(self, style: str) -> None:
        super().__init__()
        self.base_layer = torch.nn.Linear(4, 4)
        if style == "nemo":
            self.lora_magnitude = torch.nn.Parameter(torch.zeros(4))
        else:
            self.lora_magnitude_vector = torch.nn.ModuleDict({"default": _Holder(4)})

    def magnitude(self) -> torch.Tensor:
        if hasattr(self, "lora_magnitude"):
            return self.lora_magnitude
        return self.lora_magnitude_vector["default"].weight


class _Model(torch.nn.Module):
    def __init__(self, style: str, seed: int | None = None) -> None:
        super().__init__()
        self.q_proj = _Proj(style)
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))


def _stored(url: str) -> list[str]:
    m = ckptio.manifest(url)
    u, backend = open_backend(url)
    return sorted(e.name for e in get_format(m.format).tensors(backend, u.path, m))


@pytest.mark.parametrize("src_style,dst_style", [("nemo", "peft"), ("peft", "nemo"), ("peft", "peft")])
def test_checkpoints_share_the_on_disk_name_across_stacks(tmp_path, src_style, dst_style):
    src = _Model(src_style, seed=1)
    url = str(tmp_path / "ck")
    ckptio.save({"model": ckptio.ModelState(src)}, url, addons=["dora"])
    assert "model.q_proj.lora_magnitude_vector" in _stored(url)
    dst = _Model(dst_style)
    ckptio.load({"model": ckptio.ModelState(dst)}, url, addons=["dora"])
    assert torch.equal(dst.q_proj.magnitude(), src.q_proj.magnitude())
    assert torch.equal(dst.q_proj.base_layer.weight, src.q_proj.base_layer.weight)


def test_legacy_on_disk_form_loads_into_nemo_naming(tmp_path):
    src = _Model("peft", seed=2)
    url = str(tmp_path / "ck")
    ckptio.save({"model": ckptio.ModelState(src)}, url)  # no addon: the legacy spelling is stored
    assert "model.q_proj.lora_magnitude_vector.default.weight" in _stored(url)
    dst = _Model("nemo")
    ckptio.load({"model": ckptio.ModelState(dst)}, url, addons=["dora"])
    assert torch.equal(dst.q_proj.magnitude(), src.q_proj.magnitude())


def test_dora_and_peft_addons_compose(tmp_path):
    from peft import PeftModel

    from tests.addons._models import fresh_peft_model, logits, peft_model, tiny_llama

    model = peft_model(use_dora=True)
    url = str(tmp_path / "ck")
    ckptio.save({"model": ckptio.ModelState(model)}, url, addons=["peft", "dora"])
    stored = _stored(url)
    assert "model.base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in stored
    assert not any("base_layer" in n for n in stored)
    dest = fresh_peft_model(use_dora=True)
    ckptio.load({"model": ckptio.ModelState(dest)}, url, addons=["dora", "peft"])
    assert torch.equal(logits(dest), logits(model))
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_llama(), url).eval()), logits(model))
