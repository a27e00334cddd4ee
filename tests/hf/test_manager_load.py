"""``CheckpointManager.load`` of a source outside the run (a Hugging Face directory, ``hf-cache://``,
another run's step), and ``init_from=``: start from the base model, or resume the run's newest step."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ckptio
import ckptio.manager
import pytest
import torch
from ckptio_safetensors import reset_non_persistent_buffers

from ._models import build, logits, reference, save_hf
from .test_cache import COMMIT, _add_snapshot

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bf16 tied Llama, as save_pretrained writes it (no lm_head.weight on disk)."""
    return save_hf("llama", tmp_path_factory.mktemp("hf") / "base", dtype=torch.bfloat16, seed=0)


@pytest.fixture(scope="module")
def ref_logits(hf_dir: Path) -> torch.Tensor:
    return logits(reference(hf_dir, torch.float32), 256)


def _model_state(model: torch.nn.Module) -> dict[str, Any]:
    return {"model": ckptio.ModelState(model)}


def test_foreign_hf_dir_loads_strictly_and_is_no_step_of_the_run(
    tmp_path: Path, hf_dir: Path, ref_logits: torch.Tensor
) -> None:
    model = build("llama", seed=5)  # fp32, tied
    with ckptio.CheckpointManager(str(tmp_path / "run")) as mgr:
        result = mgr.load(_model_state(model), str(hf_dir))  # strict; bf16 -> fp32 while reading
        assert result.step is None and result.url == str(hf_dir)
        assert result.missing == [] and result.unexpected == []
        assert mgr.resumed_from is None and mgr.steps() == []
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(logits(model, 256), ref_logits)


def test_relative_path_is_relative_to_the_cwd(
    tmp_path: Path, hf_dir: Path, ref_logits: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(hf_dir.parent)
    model = build("llama", seed=5)
    with ckptio.CheckpointManager(str(tmp_path / "run")) as mgr:
        assert mgr.load(_model_state(model), f"./{hf_dir.name}").url == str(hf_dir)
        mgr.load(_model_state(model), Path(hf_dir.name))  # a PathLike too
    assert torch.equal(logits(model, 256), ref_logits)


def test_init_from_starts_an_empty_run_then_resumes_its_step(
    tmp_path: Path, hf_dir: Path, ref_logits: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    run = str(tmp_path / "run")
    model = build("llama", seed=5)
    with ckptio.CheckpointManager(run) as mgr:
        result = mgr.load(_model_state(model), init_from=str(hf_dir))
        assert result.step is None and result.url == str(hf_dir) and mgr.resumed_from is None
        assert torch.equal(logits(model, 256), ref_logits)
        with torch.no_grad():  # "training"
            for p in model.parameters():
                p.add_(0.01)
        trained = {k: v.clone() for k, v in model.state_dict().items()}
        mgr.save(1, _model_state(model))

    again = build("llama", seed=6)
    with caplog.at_level(logging.INFO, logger="ckptio.manager"):
        with ckptio.CheckpointManager(run) as mgr:
            # the very call of the first launch: its options were init_from's, not the step's
            result = mgr.load(_model_state(again), init_from=str(hf_dir), dtype_policy="cast")
            assert result.step == 1 and result.url == str(tmp_path / "run" / "step_00000001")
            assert mgr.resumed_from == 1
    assert "init_from" in caplog.text and "not loaded" in caplog.text
    assert all(torch.equal(again.state_dict()[k], v) for k, v in trained.items())
    assert not torch.equal(logits(again, 256), ref_logits)  # the run's step, not the base model


def test_meta_device_model_is_materialised(tmp_path: Path, hf_dir: Path, ref_logits: torch.Tensor) -> None:
    model = build("llama", meta=True)
    with ckptio.CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.load(_model_state(model), init_from=str(hf_dir))
    assert not any(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reset_non_persistent_buffers(model)
    assert torch.equal(logits(model, 256), ref_logits)


def test_hf_cache_repo_id(
    tmp_path: Path, hf_dir: Path, ref_logits: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = tmp_path / "hub"
    repo = hub / "models--tiny-org--tiny-llama"
    _add_snapshot(repo, COMMIT, hf_dir)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    model = build("llama", seed=5)
    # the run's storage options are the local backend's; another scheme does not get them
    with ckptio.CheckpointManager(str(tmp_path / "run"), storage_options={"fsync": False}) as mgr:
        result = mgr.load(_model_state(model), init_from="hf-cache://tiny-org/tiny-llama")
        assert result.step is None and mgr.resumed_from is None
        assert mgr.load(_model_state(model), "hf-cache://tiny-org/tiny-llama@main").step is None
    assert torch.equal(logits(model, 256), ref_logits)


def test_storage_options_go_to_sources_on_the_runs_scheme_only(
    tmp_path: Path, hf_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, Any]] = []
    real = ckptio.manager.open_backend

    def recording(url: Any, storage_options: Any = None) -> Any:
        u, backend = real(url, storage_options)
        seen.append((u.scheme, storage_options))
        return u, backend

    monkeypatch.setattr(ckptio.manager, "open_backend", recording)
    hub = tmp_path / "hub"
    repo = hub / "models--tiny-org--tiny-llama"
    _add_snapshot(repo, COMMIT, hf_dir)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    opts = {"fsync": False}
    with ckptio.CheckpointManager(str(tmp_path / "run"), storage_options=opts) as mgr:
        seen.clear()
        mgr.load(_model_state(build("llama")), str(hf_dir))
        mgr.load(_model_state(build("llama")), "hf-cache://tiny-org/tiny-llama")
    assert seen == [("file", opts), ("hf-cache", None)]
    with ckptio.CheckpointManager(str(tmp_path / "run"), storage_options=opts) as mgr:
        seen.clear()
        mgr.load(_model_state(build("llama")), str(hf_dir), source_storage_options={"fsync": True})
    assert seen == [("file", {"fsync": True})]


def test_same_store_needs_the_same_bucket_or_host() -> None:
    """The run's credentials and endpoint never go to another bucket or host of the same scheme."""
    from ckptio.manager import same_store
    from ckptio.url import parse_url

    root = parse_url("s3://bucket/runs/a")
    assert same_store(parse_url("s3://bucket/base"), root)
    assert not same_store(parse_url("s3://public-bucket/base"), root)
    assert not same_store(parse_url("gs://bucket/base"), root)
    assert same_store(parse_url("/tmp/x"), parse_url("/data/run"))


def test_dtype_policy_and_other_format_options_reach_the_foreign_load(tmp_path: Path, hf_dir: Path) -> None:
    with ckptio.CheckpointManager(str(tmp_path / "run")) as mgr:
        with pytest.raises(ckptio.StateMismatchError):
            mgr.load(_model_state(build("llama")), str(hf_dir), dtype_policy="strict")
        kept = build("llama")
        mgr.load(_model_state(kept), init_from=str(hf_dir), dtype_policy="keep")
        assert kept.model.norm.weight.dtype == torch.bfloat16
        # stored names renamed first: the whole directory lands under a prefix of another state
        renamed = build("llama")
        mgr.load(
            {"outer": ckptio.ModelState(torch.nn.ModuleDict({"inner": renamed}))},
            str(hf_dir),
            prefix="outer.inner.",
        )
        assert torch.equal(renamed.model.norm.weight, kept.model.norm.weight.float())


def test_misspelt_option_is_refused_before_anything_is_read(tmp_path: Path, hf_dir: Path) -> None:
    with ckptio.CheckpointManager(str(tmp_path / "run")) as mgr:
        for call in (
            lambda: mgr.load(_model_state(build("llama")), str(hf_dir), dtype_polcy="keep"),
            lambda: mgr.load(_model_state(build("llama")), str(tmp_path / "nowhere"), dtype_polcy="keep"),
            lambda: mgr.load(_model_state(build("llama")), init_from=str(hf_dir), dtype_polcy="keep"),
            lambda: mgr.load(_model_state(build("llama")), 3, dtype_polcy="keep"),
        ):
            with pytest.raises(ckptio.OptionError, match="did you mean 'dtype_policy'"):
                call()
        with pytest.raises(ckptio.OptionError, match="init_from"):
            mgr.load(_model_state(build("llama")), init_fro=str(hf_dir))


def test_steps_of_the_run_take_the_options_their_format_declares(tmp_path: Path) -> None:
    model = build("llama", seed=1)
    with ckptio.CheckpointManager(f"safetensors+file://{tmp_path}/st") as mgr:
        mgr.save(1, _model_state(model))
        half = build("llama").to(torch.bfloat16)
        with pytest.raises(ckptio.StateMismatchError):
            mgr.load(_model_state(half), 1)  # a ckptio checkpoint refuses another dtype...
        mgr.load(_model_state(half), dtype_policy="cast")  # ...unless asked
        assert mgr.resumed_from == 1
        assert torch.equal(half.model.norm.weight, model.model.norm.weight.to(torch.bfloat16))
    with ckptio.CheckpointManager(str(tmp_path / "native")) as mgr:
        mgr.save(1, _model_state(model))
        with pytest.raises(ckptio.OptionError, match="native format"):
            mgr.load(_model_state(build("llama")), 1, dtype_policy="cast")  # the native format never casts


def test_another_runs_step_and_this_runs_step_by_path(tmp_path: Path) -> None:
    model = build("llama", seed=1)
    with ckptio.CheckpointManager(str(tmp_path / "other")) as other:
        other.save(7, _model_state(model))
    with ckptio.CheckpointManager(str(tmp_path / "run")) as mgr:
        dest = build("llama", seed=2)
        result = mgr.load(_model_state(dest), str(tmp_path / "other" / "step_00000007"))
        assert result.step is None and result.manifest is not None and result.manifest.step == 7
        assert mgr.resumed_from is None
        assert torch.equal(logits(dest, 256), logits(model, 256))
        mgr.save(3, _model_state(dest))
        # a path naming one of the run's own steps is that step: a resume
        assert mgr.load(_model_state(dest), str(tmp_path / "run" / "step_00000003")).step == 3
        assert mgr.resumed_from == 3
        # only the names the run writes are its steps: step_3 is some other directory
        with pytest.raises(ckptio.CheckpointNotFoundError):
            mgr.load(_model_state(dest), str(tmp_path / "run" / "step_3"))


def test_a_directory_that_is_no_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    (junk / "pytorch_model.bin").write_bytes(b"\0" * 8)
    with ckptio.CheckpointManager(str(tmp_path / "run")) as mgr:
        with pytest.raises(ckptio.IncompleteCheckpointError, match="notes.txt") as exc:
            mgr.load(_model_state(build("llama")), str(junk))
        assert "never loaded" in str(exc.value)
        with pytest.raises(ckptio.CheckpointNotFoundError, match="no checkpoint at"):
            mgr.load(_model_state(build("llama")), init_from=str(tmp_path / "missing"))


def test_latest_without_steps_or_init_from_is_not_found(tmp_path: Path) -> None:
    with ckptio.CheckpointManager(str(tmp_path / "run")) as mgr:
        with pytest.raises(ckptio.CheckpointNotFoundError, match="init_from"):
            mgr.load(_model_state(build("llama")))
        with pytest.raises(ckptio.CheckpointNotFoundError):
            mgr.load(_model_state(build("llama")), "latest")


def test_step_strings_that_are_mistakes_are_refused(tmp_path: Path) -> None:
    with ckptio.CheckpointManager(str(tmp_path / "run")) as mgr:
        with pytest.raises(ValueError, match="as an int"):
            mgr.load({}, "3")
        with pytest.raises(ValueError, match="'latest'"):
            mgr.load({}, "lastest")
        with pytest.raises(ValueError, match="'latest'"):
            mgr.load({}, "\u00b2")  # a digit to str.isdigit, no step number


def test_the_managers_addons_apply_to_a_foreign_load(tmp_path: Path) -> None:
    """``addons=["peft"]`` on the manager: ``init_from`` a PEFT ``save_pretrained`` directory fills
    the adapter, then the run resumes its own adapter-only steps."""
    pytest.importorskip("peft")
    from tests.addons._models import fresh_peft_model, peft_model
    from tests.addons._models import logits as llama_logits

    src = peft_model(seed=0)
    src.save_pretrained(tmp_path / "adapter")
    dest = fresh_peft_model(seed=0)
    assert not torch.equal(llama_logits(dest), llama_logits(src))
    with ckptio.CheckpointManager(str(tmp_path / "run"), addons=["peft"]) as mgr:
        result = mgr.load(_model_state(dest), init_from=str(tmp_path / "adapter"))
        assert result.step is None and not result.missing and not result.unexpected
        assert torch.equal(llama_logits(dest), llama_logits(src))
        mgr.save(1, _model_state(dest))
    again = fresh_peft_model(seed=0)
    with ckptio.CheckpointManager(str(tmp_path / "run"), addons=["peft"]) as mgr:
        assert mgr.load(_model_state(again), init_from=str(tmp_path / "adapter")).step == 1
    assert torch.equal(llama_logits(again), llama_logits(src))


def test_tiered_manager_starts_from_init_from_then_resumes(
    tmp_path: Path, hf_dir: Path, ref_logits: torch.Tensor
) -> None:
    """The tiered manager takes the same ``init_from`` and foreign sources as CheckpointManager."""
    from ckptio import TieredCheckpointManager

    root, local = str(tmp_path / "durable"), str(tmp_path / "local")
    model = build("llama", seed=5)
    with TieredCheckpointManager(root, local=local) as mgr:
        with pytest.raises(ckptio.OptionError, match="dtype_polcy"):
            mgr.load(_model_state(model), init_from=str(hf_dir), dtype_polcy="cast")
        result = mgr.load(_model_state(model), init_from=str(hf_dir), dtype_policy="cast")
        assert result.step is None and mgr.resumed_from is None
        assert torch.equal(logits(model, 256), ref_logits)
        with torch.no_grad():
            model.model.norm.weight.add_(1.0)
        mgr.save(1, _model_state(model))
    trained = logits(model, 256)
    again = build("llama", seed=6)
    with TieredCheckpointManager(root, local=local) as mgr:
        # the first launch's very call: its options were init_from's; resumed, base ignored
        assert mgr.load(_model_state(again), init_from=str(hf_dir), dtype_policy="cast").step == 1
        with pytest.raises(ckptio.OptionError, match="outside the run"):
            mgr.load(_model_state(again), 1, dtype_policy="cast")
        assert mgr.load(_model_state(build("llama", seed=7)), str(hf_dir)).step is None  # a foreign path
    assert torch.equal(logits(again, 256), trained)
