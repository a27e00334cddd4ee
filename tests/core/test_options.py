"""Declared options: a misspelt keyword fails at once naming the right one; renamed names still work."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
from pathlib import Path
from typing import Any

import ckptio
import ckptio.ext
import pytest
import torch
from ckptio import plugins
from ckptio.formats.native import NativeFormat, NativeLoadOptions, NativeSaveOptions
from ckptio.options import check_options, option_names

ROOT = Path(__file__).resolve().parents[2]


def _state() -> dict[str, Any]:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": 3}


def _safetensors() -> Any:
    return pytest.importorskip("ckptio_safetensors.format")


# -- the helper --------------------------------------------------------------------------------
def test_check_options_names_the_closest_valid_option() -> None:
    check_options({"retention": 1}, ["retention", "async_save"], "X")  # declared: nothing happens
    with pytest.raises(ckptio.OptionError) as info:
        check_options({"retenton": 1}, ["retention", "async_save"], "CheckpointManager")
    msg = str(info.value)
    assert msg.startswith("unknown option 'retenton' for CheckpointManager; did you mean 'retention'?")
    assert "Valid: async_save, retention" in msg
    assert isinstance(info.value, ckptio.CheckpointError) and isinstance(info.value, TypeError)


def test_check_options_several_unknown_and_hidden_deprecated_names() -> None:
    with pytest.raises(ckptio.OptionError, match=r"'thred_count' \(did you mean 'thread_count'\?\), 'zzz'"):
        check_options(["thred_count", "zzz"], ["thread_count"], "X")
    check_options(["old"], ["new"], "X", deprecated=["old"])  # accepted...
    with pytest.raises(ckptio.OptionError) as info:
        check_options(["olf"], ["new"], "X", deprecated=["old"])
    assert "old" not in str(info.value).split("Valid:")[1]  # ...but neither suggested nor listed
    with pytest.raises(ckptio.OptionError, match="Valid: none"):
        check_options(["a"], [], "a format that takes none")


def test_check_options_pass_through_refuses_only_near_misses() -> None:
    valid = ["part_size", "concurrency"]
    check_options({"endpoint_url": 1, "anon": True}, valid, "X", pass_through=True)  # someone else's
    with pytest.raises(ckptio.OptionError) as info:
        check_options({"part_sise": 1, "anon": True}, valid, "the s3:// backend", pass_through=True)
    assert str(info.value) == "unknown option 'part_sise' for the s3:// backend; did you mean 'part_size'?"
    with pytest.raises(ckptio.OptionError, match=r"'Part_Size' \(did you mean 'part_size'\?\), 'concurency'"):
        check_options(["Part_Size", "concurency", "anon"], valid, "X", pass_through=True)
    calls: list[int] = []

    def accepted() -> list[str]:
        calls.append(1)
        return ["max_concurrency"]

    check_options(["anon"], valid, "X", pass_through=True, accepted=accepted)
    assert calls == []  # nothing close: not asked
    check_options(["max_concurrency"], valid, "X", pass_through=True, accepted=accepted)
    assert calls == [1]
    with pytest.raises(ckptio.OptionError, match="did you mean 'concurrency'"):
        check_options(["max_concurrency"], valid, "X", pass_through=True)


def test_the_helper_is_part_of_the_extension_api() -> None:
    assert ckptio.ext.check_options is check_options
    assert "check_options" in ckptio.ext.__all__ and "AddonHooks" in ckptio.ext.__all__


# -- CheckpointManager ---------------------------------------------------------------------------
def test_manager_refuses_a_misspelt_option_at_construction(tmp_path: Path) -> None:
    root = tmp_path / "run"
    with pytest.raises(ckptio.OptionError, match="did you mean 'retention'"):
        ckptio.CheckpointManager(str(root), retenton=ckptio.KeepLatest(1))
    with pytest.raises(ckptio.OptionError, match=r"'thread_cuont' for CheckpointManager.*'thread_count'"):
        ckptio.CheckpointManager(str(root), thread_cuont=2)
    with pytest.raises(TypeError, match="did you mean 'async_save'"):
        ckptio.CheckpointManager(str(root), asyncsave=True)
    assert not root.exists()


def test_manager_passes_declared_format_options_to_every_save(tmp_path: Path) -> None:
    with ckptio.CheckpointManager(str(tmp_path / "run"), thread_count=3) as mgr:
        mgr.save(1, {"a": torch.ones(4), "b": torch.ones(4), "c": torch.ones(4)})
    bins = [p.name for p in (tmp_path / "run" / "step_00000001").iterdir() if p.suffix == ".bin"]
    assert len(bins) == 3


def test_manager_checks_the_options_of_its_url_s_format(tmp_path: Path) -> None:
    _safetensors()
    with pytest.raises(ckptio.OptionError, match=r"safetensors format.*did you mean 'thread_count'"):
        ckptio.CheckpointManager(f"safetensors+file://{tmp_path}/run", thread_cuont=2)


# -- save ----------------------------------------------------------------------------------------
def test_save_refuses_a_misspelt_option_before_writing(tmp_path: Path) -> None:
    dest = tmp_path / "ck"
    with pytest.raises(ckptio.OptionError, match=r"'thread_cuont' for ckptio\.save.*'thread_count'"):
        ckptio.save(_state(), str(dest), thread_cuont=8)
    with pytest.raises(ckptio.OptionError, match="did you mean 'overwrite'"):
        ckptio.save(_state(), str(dest), overwrit=False)
    with pytest.raises(ckptio.OptionError, match="did you mean 'metadata'"):
        ckptio.save(_state(), str(dest), metadta={"a": 1})
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_core_private_keys_are_not_options(tmp_path: Path) -> None:
    """``progress`` and ``state_keys`` are the core's own parameters, not keywords of the user."""
    with pytest.raises(ckptio.OptionError, match="'progress'"):
        ckptio.save(_state(), str(tmp_path / "ck"), progress=False)
    ckptio.save(_state(), str(tmp_path / "ck"))
    with pytest.raises(ckptio.OptionError, match="'state_keys' for the native format"):
        ckptio.load(_state(), str(tmp_path / "ck"), state_keys=["w"])


def test_safetensors_save_option_typo_names_the_format(tmp_path: Path) -> None:
    _safetensors()
    url = f"safetensors+file://{tmp_path}/st"
    with pytest.raises(ckptio.OptionError, match=r"ckptio\.save \(safetensors format\).*'thread_count'"):
        ckptio.save(_state(), url, thread_cont=2)
    with pytest.raises(ckptio.OptionError, match="safetensors"):
        ckptio.save(_state(), url, shard_sise="1GB")
    assert not (tmp_path / "st").exists()
    ckptio.save(_state(), url, thread_count=1)  # declared: accepted
    assert (tmp_path / "st" / "manifest.json").exists()


# -- load ----------------------------------------------------------------------------------------
def test_load_refuses_a_misspelt_option(tmp_path: Path) -> None:
    ckptio.save(_state(), str(tmp_path / "ck"))
    dest = {"w": torch.zeros(2, 3), "step": 0}
    with pytest.raises(ckptio.OptionError, match="'strct' for ckptio.load; did you mean 'strict'"):
        ckptio.load(dest, str(tmp_path / "ck"), strct=False)
    with pytest.raises(ckptio.OptionError, match="did you mean 'verify'"):
        ckptio.load(dest, str(tmp_path / "ck"), verfy=False)
    # no format prefix: refused before the backend is opened, even where nothing exists
    with pytest.raises(ckptio.OptionError, match="did you mean 'thread_count'"):
        ckptio.load(dest, str(tmp_path / "nothing-here"), threadcount=2)
    assert dest["step"] == 0
    ckptio.load(dest, str(tmp_path / "ck"), thread_count=1)
    assert dest["step"] == 3 and torch.equal(dest["w"], _state()["w"])


def test_load_refuses_options_the_checkpoint_s_format_does_not_declare(tmp_path: Path) -> None:
    """``prefix`` is a safetensors option: a native checkpoint refuses it, naming its format."""
    _safetensors()
    ckptio.save(_state(), str(tmp_path / "ck"))
    with pytest.raises(
        ckptio.OptionError, match=r"'prefix' for the native format \(load\)\. Valid: thread_count"
    ):
        ckptio.load(_state(), str(tmp_path / "ck"), prefix="model")


def test_safetensors_load_option_typo_with_a_prefix_is_refused_before_io(tmp_path: Path) -> None:
    _safetensors()
    with pytest.raises(ckptio.OptionError, match=r"safetensors format.*did you mean 'key_mapping'"):
        ckptio.load({}, f"safetensors+file://{tmp_path}/missing", key_maping={})


def test_safetensors_foreign_directory_options(tmp_path: Path) -> None:
    """``prefix`` and ``key_mapping`` are declared; the deprecated ``state_keys`` still works."""
    st = _safetensors()
    import safetensors.torch

    src = tmp_path / "hf"
    src.mkdir()
    w = torch.arange(4, dtype=torch.float32)
    safetensors.torch.save_file({"layer.weight": w}, str(src / "model.safetensors"))
    flat: dict[str, Any] = {"body.weight": torch.zeros(4)}
    ckptio.load(flat, str(src), key_mapping={r"^layer\.": "body."}, prefix="")
    assert torch.equal(flat["body.weight"], w)
    nested: dict[str, Any] = {"m": {"layer.weight": torch.zeros(4)}}
    ckptio.load(nested, str(src), prefix="m")
    assert torch.equal(nested["m"]["layer.weight"], w)
    with pytest.deprecated_call(match="state_keys"):
        st.SafetensorsLoadOptions(state_keys=["m"])
    assert "state_keys" not in option_names(st.SafetensorsLoadOptions)
    assert option_names(st.SafetensorsLoadOptions, deprecated=True) == ["state_keys"]


# -- the local backend ---------------------------------------------------------------------------
def test_local_backend_refuses_unknown_storage_options(tmp_path: Path) -> None:
    from ckptio_local import LocalBackend

    with pytest.raises(ckptio.OptionError, match=r"'fsynk' for the file:// backend.*did you mean 'fsync'"):
        ckptio.save(_state(), str(tmp_path / "ck"), storage_options={"fsynk": False})
    assert not (tmp_path / "ck").exists()
    with pytest.raises(ckptio.OptionError, match="fsync"):
        LocalBackend(ckptio.parse_url(str(tmp_path)), fsynk=False)
    with pytest.raises(ckptio.OptionError, match="did you mean 'fsync'"):
        ckptio.CheckpointManager(str(tmp_path / "run"), storage_options={"fsyn": True})
    ckptio.save(_state(), str(tmp_path / "ok"), storage_options={"fsync": False})


# -- declarations --------------------------------------------------------------------------------
def _option_classes() -> list[Any]:
    classes = [NativeSaveOptions, NativeLoadOptions]
    try:
        from ckptio_safetensors.format import SafetensorsLoadOptions, SafetensorsSaveOptions
    except ImportError:  # pragma: no cover - safetensors not installed
        return classes
    return [*classes, SafetensorsSaveOptions, SafetensorsLoadOptions]


def test_formats_declare_their_options_as_documented_kw_only_dataclasses() -> None:
    assert NativeFormat.save_options is NativeSaveOptions and NativeFormat.load_options is NativeLoadOptions
    for cls in _option_classes():
        assert dataclasses.is_dataclass(cls) and all(f.kw_only for f in dataclasses.fields(cls)), cls
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body  # type: ignore[attr-defined]
        documented = {
            stmt.target.id
            for stmt, nxt in zip(body, body[1:])
            if isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        }
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields == documented, f"{cls.__name__}: fields without a docstring: {fields - documented}"


def test_configuration_doc_lists_every_option() -> None:
    from ckptio.options import declared_keywords
    from ckptio_local import LocalBackend

    doc = (ROOT / "docs" / "configuration.md").read_text()
    names = {
        *declared_keywords(ckptio.save),
        *declared_keywords(ckptio.load),
        *declared_keywords(ckptio.CheckpointManager),
        *LocalBackend.STORAGE_OPTIONS,
    }
    for cls in _option_classes():
        names.update(f.name for f in dataclasses.fields(cls))
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert not missing, f"docs/configuration.md does not list {missing}"


# -- renamed names -------------------------------------------------------------------------------
class _Spy:
    name = "spy"

    def __init__(self) -> None:
        self.final: bool | None = None

    def on_save_start(self, ctx: ckptio.AddonContext) -> None:
        self.final = ctx.final


def test_final_is_the_one_name_and_is_final_still_works(tmp_path: Path) -> None:
    spy = _Spy()
    ckptio.save(_state(), str(tmp_path / "a"), final=True, addons=[spy])
    assert spy.final is True
    spy = _Spy()
    with pytest.deprecated_call(match="is_final= is deprecated, use final="):
        ckptio.save(_state(), str(tmp_path / "b"), is_final=True, addons=[spy])
    assert spy.final is True

    class OldSpy:
        seen: bool | None = None

        def on_save_start(self, ctx: ckptio.AddonContext) -> None:
            with pytest.deprecated_call(match="ctx.final"):
                OldSpy.seen = ctx.is_final

    with ckptio.CheckpointManager(str(tmp_path / "run"), addons=[OldSpy()]) as mgr:
        mgr.save(1, _state(), final=True)
    assert OldSpy.seen is True


def test_metadata_is_the_one_name_and_the_manifest_key_is_unchanged(tmp_path: Path) -> None:
    result = ckptio.save(_state(), str(tmp_path / "ck"), metadata={"run": "abc"})
    m = ckptio.manifest(str(tmp_path / "ck"))
    assert m.metadata == {"run": "abc"} and result.manifest is not None
    with pytest.deprecated_call(match="Manifest.metadata"):
        assert m.user == {"run": "abc"}
    raw = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert raw["user"] == {"run": "abc"} and "metadata" not in raw  # readable by earlier releases
    assert ckptio.Manifest.from_bytes(m.to_bytes(), "x").metadata == {"run": "abc"}
    # a manifest naming the field rather than its JSON key is not one ckptio wrote
    raw.pop("checksum")
    raw["metadata"] = raw.pop("user")
    with pytest.raises(ckptio.CorruptCheckpointError):
        ckptio.Manifest.from_bytes(json.dumps(raw).encode(), "x")


def test_addon_hooks_and_addon_like_names() -> None:
    assert "AddonSpec" not in ckptio.__all__ and {"AddonHooks", "AddonLike"} <= set(ckptio.__all__)
    with pytest.deprecated_call(match="ckptio.AddonHooks"):
        assert ckptio.AddonSpec is ckptio.AddonHooks
    addons_module = importlib.import_module("ckptio.addons")
    with pytest.deprecated_call(match="AddonLike"):
        assert addons_module.AddonSpecLike is ckptio.AddonLike
    with pytest.raises(AttributeError):
        ckptio.NoSuchName  # noqa: B018


# -- unknown schemes -----------------------------------------------------------------------------
def _message(scheme: str) -> str:
    with pytest.raises(ckptio.BackendNotFoundError) as info:
        plugins.backend_factory(scheme)
    return str(info.value)


def test_unknown_scheme_message_is_short(tmp_path: Path) -> None:
    msg = _message("hdfs2")
    assert msg.startswith("no ckptio backend for hdfs2:// URLs") and "\n" not in msg
    assert "docs/writing-a-backend.md" in msg and "pip install a ckptio backend plugin" in msg
    assert len(msg) < 400, msg
    entries = plugins._registry.entries["backend"]
    assert "file" in msg.split("Installed:")[1]
    catch_all = [n for n, r in entries.items() if r.priority < 0]
    if catch_all:  # fsspec installed: its other protocols are one count, not a list
        assert "hdfs://" in msg  # the suggestion
        assert f"and {len(catch_all)} more through " in msg
        assert not any(f" {n}," in msg for n in catch_all)
    assert "did you mean s3://" in _message("s4") or "s3" not in entries


@pytest.mark.parametrize(
    ("scheme", "package"),
    [
        ("s3", "pip install ckptio-fsspec s3fs"),
        ("gs", "pip install ckptio-fsspec gcsfs"),
        ("az", "pip install ckptio-fsspec adlfs"),
        ("msc", "pip install ckptio-msc"),
        ("file", "pip install ckptio-local"),
    ],
)
def test_missing_backend_names_the_package(
    scheme: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugins._registry.ensure_loaded()
    only_local = {n: r for n, r in plugins._registry.entries["backend"].items() if n == "local"}
    monkeypatch.setitem(plugins._registry.entries, "backend", only_local)
    msg = _message(scheme)
    assert msg.endswith(package), msg
    assert "Installed: local." in msg and "did you mean" not in msg
