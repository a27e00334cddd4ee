"""ckptio-lightning with the real ``lightning`` package: fit, interrupt, resume, top-k, async.

Every run is a tiny CPU model (4 steps an epoch); a test takes a few seconds, most of it
Lightning's own start-up. Saves run in three modes: ``sync``, ``async`` (inside Lightning's
``AsyncCheckpointIO``) and ``ckptio-async`` (the plugin's own ``async_save=True``).
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning")
pytest.importorskip("ckptio_lightning")

import ckptio
import numpy as np
import torch
from ckptio_lightning import CkptioCheckpointIO, CkptioModelCheckpoint
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO

from ._models import STEPS_PER_EPOCH, Interrupt, StopAt, fresh_model, params, trainer

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 4


MODES = ["sync", "async", "ckptio-async"]


def io(mode: str = "sync", **kwargs: Any) -> Any:
    """The plugin as a Trainer gets it in ``mode`` (see the module docstring); ``ckptio-async-2``
    is ``ckptio-async`` with two saves in flight."""
    if mode.startswith("ckptio-async"):
        return CkptioCheckpointIO(async_save=True, max_in_flight=2 if mode.endswith("-2") else 1, **kwargs)
    plugin = CkptioCheckpointIO(**kwargs)
    return AsyncCheckpointIO(plugin) if mode == "async" else plugin


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """Parameters (and buffers) after an uninterrupted run of EPOCHS epochs."""
    model = fresh_model()
    trainer(max_epochs=EPOCHS, enable_checkpointing=False).fit(model)
    return params(model)


def assert_same_params(ref: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    got = params(model)
    assert got.keys() == ref.keys()
    diff = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not diff, f"parameters differ from the uninterrupted run: {diff}"


def interrupted_then_resumed(
    dirpath: str, plugins: Any, callback: type = ModelCheckpoint, **ckpt: Any
) -> Any:
    """Fit until a crash in epoch 3, then fit again from ``ckpt_path="last"``; the resumed model."""
    ckpt = {"save_last": True, "save_top_k": 2, "monitor": "train_loss", **ckpt}
    crash_at = 2 * STEPS_PER_EPOCH + 2  # mid-epoch: the newest checkpoint is the end of epoch 2
    with pytest.raises(StopAt):
        trainer(
            max_epochs=EPOCHS,
            plugins=[plugins()],
            callbacks=[callback(dirpath=dirpath, **ckpt), Interrupt(crash_at)],
        ).fit(fresh_model())
    model = fresh_model()
    t = trainer(max_epochs=EPOCHS, plugins=[plugins()], callbacks=[callback(dirpath=dirpath, **ckpt)])
    t.fit(model, ckpt_path="last")
    assert t.ckpt_path is not None and t.ckpt_path.endswith("last.ckpt")
    return model


# -- resume ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_interrupted_fit_resumes_from_last_locally(
    tmp_path: Path, reference: dict[str, torch.Tensor], mode: str
) -> None:
    d = tmp_path / "ckpts"
    model = interrupted_then_resumed(str(d), lambda: io(mode))
    assert_same_params(reference, model)
    # every .ckpt is a committed ckptio checkpoint directory; top-2 plus last, nothing else
    names = sorted(os.listdir(d))
    assert names == ["epoch=2-step=12.ckpt", "epoch=3-step=16.ckpt", "last.ckpt"], names
    for n in names:
        assert (d / n / "manifest.json").is_file()
    m = ckptio.manifest(str(d / "last.ckpt"))
    assert m.metadata["lightning"]["global_step"] == EPOCHS * STEPS_PER_EPOCH


@pytest.mark.servers
@pytest.mark.parametrize("mode", MODES)
def test_interrupted_fit_resumes_from_last_on_s3(
    s3_env: Any, s3_bucket: str, reference: dict[str, torch.Tensor], mode: str
) -> None:
    # Lightning's own fsspec calls (ModelCheckpoint listing the dirpath) read the AWS_* variables
    # s3_env exports; ckptio gets its options explicitly
    opts = s3_env.storage_options()
    dirpath = f"s3://{s3_bucket}/run/ckpts"
    model = interrupted_then_resumed(dirpath, lambda: io(mode, storage_options=opts), CkptioModelCheckpoint)
    assert_same_params(reference, model)
    keys = sorted(o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_bucket).get("Contents", []))
    tops = sorted({k.split("/")[2] for k in keys})
    assert tops == ["epoch=2-step=12.ckpt", "epoch=3-step=16.ckpt", "last.ckpt"], tops  # removed ones gone
    for name in tops:
        assert f"run/ckpts/{name}/manifest.json" in keys
        assert f"run/ckpts/{name}" in keys  # the marker object Lightning's "last" lookup reads


# -- ModelCheckpoint ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [*MODES, "ckptio-async-2"])
def test_top_k_keeps_k_and_last(tmp_path: Path, mode: str) -> None:
    d = tmp_path / "ckpts"
    # a checkpoint every step, the 3 highest steps kept: saves and removals interleave tightly,
    # so in the async modes a removal often finds its save still queued
    cb = ModelCheckpoint(
        dirpath=d, monitor="step", mode="max", save_top_k=3, every_n_train_steps=1, save_last=True
    )
    model = fresh_model()
    trainer(max_epochs=3, plugins=[io(mode)], callbacks=[cb]).fit(model)
    steps = 3 * STEPS_PER_EPOCH
    want = [f"epoch=2-step={s}.ckpt" for s in (steps - 2, steps - 1, steps)] + ["last.ckpt"]
    assert sorted(os.listdir(d)) == sorted(want)
    assert cb.best_model_path.endswith(f"step={steps}.ckpt")
    # each one loads, and last is the newest
    loaded = CkptioCheckpointIO().load_checkpoint(d / "last.ckpt")
    assert loaded["global_step"] == steps
    assert_same_params(params(model), _module_from(loaded))


def _module_from(checkpoint: dict[str, Any]) -> torch.nn.Module:
    m = fresh_model()
    m.load_state_dict(checkpoint["state_dict"])
    return m


def test_save_last_link(tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    """``save_last="link"``: Lightning links last.ckpt to the newest directory; saving over the
    link replaces the link (never writes through it) and removing it removes the link only."""
    d = tmp_path / "ckpts"
    model = interrupted_then_resumed(str(d), lambda: io(), save_last="link")
    assert_same_params(reference, model)
    assert os.path.islink(d / "last.ckpt")
    assert os.path.realpath(d / "last.ckpt") == str(d / "epoch=3-step=16.ckpt")
    plugin = CkptioCheckpointIO()
    plugin.remove_checkpoint(d / "last.ckpt")
    assert not os.path.lexists(d / "last.ckpt") and (d / "epoch=3-step=16.ckpt" / "manifest.json").exists()


def test_removed_while_being_saved_in_the_background(tmp_path: Path) -> None:
    """AsyncCheckpointIO calls remove_checkpoint while the save may still be queued: the removal
    waits, so the checkpoint does not come back afterwards."""
    gate = threading.Event()
    inner = CkptioCheckpointIO()
    real_save = inner.save_checkpoint

    def slow_save(*args: Any, **kwargs: Any) -> None:
        gate.wait(10)
        real_save(*args, **kwargs)

    inner.save_checkpoint = slow_save  # type: ignore[method-assign]
    wrapper = AsyncCheckpointIO(inner)
    state = {"state_dict": {"w": torch.ones(3)}, "epoch": 0}
    wrapper.save_checkpoint(state, tmp_path / "a.ckpt")
    wrapper.save_checkpoint(state, tmp_path / "b.ckpt")  # queued behind a.ckpt
    threading.Timer(0.2, gate.set).start()
    wrapper.remove_checkpoint(tmp_path / "b.ckpt")
    wrapper.teardown()
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt"]


# -- async_save=True ---------------------------------------------------------------------------
class Gate:
    """Holds every background write of ``plugin`` until :meth:`open` (the writes stay queued)."""

    def __init__(self, plugin: CkptioCheckpointIO) -> None:
        self.opened = threading.Event()
        self.writes: list[str] = []  # urls, in the order they were written
        real = plugin._write

        def write(tensors: Any, skeleton: Any, url: str, *args: Any) -> None:
            assert self.opened.wait(30), "the gate was never opened"
            real(tensors, skeleton, url, *args)
            self.writes.append(url)

        plugin._write = write  # type: ignore[method-assign]

    def open(self, after: float = 0.0) -> None:
        if after:
            threading.Timer(after, self.opened.set).start()
        else:
            self.opened.set()


def ckpt(w: torch.Tensor, step: int = 0, **extra: Any) -> dict[str, Any]:
    return {"state_dict": {"w": w, "b": torch.zeros(2)}, "global_step": step, **extra}


def committed(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def test_ckptio_async_returns_before_the_write_and_saves_a_snapshot(tmp_path: Path) -> None:
    plugin = CkptioCheckpointIO(async_save=True)
    gate = Gate(plugin)
    w = torch.ones(4)
    plugin.save_checkpoint(ckpt(w, 1), tmp_path / "a.ckpt")  # returns with the write held
    assert not (tmp_path / "a.ckpt").exists()
    w.add_(1)  # training goes on and changes the weights in place
    gate.open()
    plugin.wait()
    back = CkptioCheckpointIO().load_checkpoint(tmp_path / "a.ckpt")
    assert torch.equal(back["state_dict"]["w"], torch.ones(4)) and back["global_step"] == 1
    assert ckptio.manifest(str(tmp_path / "a.ckpt")).metadata["lightning"]["global_step"] == 1
    plugin.teardown()


def test_ckptio_async_reuses_host_buffers_keyed_on_layout(tmp_path: Path) -> None:
    plugin = CkptioCheckpointIO(async_save=True)
    w = torch.arange(6, dtype=torch.float32)

    def buffers() -> dict[str, int]:
        stager = plugin._stagers[0]
        assert stager is not None
        return {k: b.data_ptr() for k, b in stager._buffers.items()}

    plugin.save_checkpoint(ckpt(w, 1), tmp_path / "a.ckpt")
    first = buffers()
    assert set(first) == {"state_dict.w", "state_dict.b"}
    plugin.save_checkpoint(ckpt(w + 1, 2), tmp_path / "b.ckpt")
    assert buffers() == first  # same names and layouts: the same memory, nothing allocated
    plugin.save_checkpoint(ckpt(w.view(2, 3), 3), tmp_path / "c.ckpt")  # a new shape for w
    now = buffers()
    assert now["state_dict.b"] == first["state_dict.b"]
    plugin.save_checkpoint(ckpt(torch.ones(2, 3, dtype=torch.float64), 4), tmp_path / "d.ckpt")
    assert buffers()["state_dict.b"] == first["state_dict.b"]
    plugin.teardown()
    assert plugin._stagers == [None]  # released
    reader = CkptioCheckpointIO()
    expected = {"a": w, "b": w + 1, "c": w.view(2, 3), "d": torch.ones(2, 3, dtype=torch.float64)}
    for name, want in expected.items():
        got = reader.load_checkpoint(tmp_path / f"{name}.ckpt")["state_dict"]["w"]
        assert got.dtype == want.dtype and torch.equal(got, want), name


def test_ckptio_async_refuses_a_bad_value_before_returning(tmp_path: Path) -> None:
    plugin = CkptioCheckpointIO(async_save=True)
    bad = ckpt(torch.ones(2), hyper_parameters={"tokenizer": Tokenizer()})
    with pytest.raises(ckptio.StateMismatchError, match=r"checkpoint\['hyper_parameters'\]\['tokenizer'\]"):
        plugin.save_checkpoint(bad, tmp_path / "x.ckpt")
    assert plugin._jobs == [] and plugin._executor is None  # nothing staged, nothing queued
    plugin.teardown()
    assert not (tmp_path / "x.ckpt").exists()


def test_ckptio_async_failure_is_raised_by_the_next_save_and_by_teardown(tmp_path: Path) -> None:
    plugin = CkptioCheckpointIO(async_save=True)
    real = plugin._write
    fail = {"a.ckpt", "c.ckpt"}

    def write(tensors: Any, skeleton: Any, url: str, *args: Any) -> None:
        if os.path.basename(url) in fail:
            raise OSError(28, "No space left on device")
        real(tensors, skeleton, url, *args)

    plugin._write = write  # type: ignore[method-assign]
    plugin.save_checkpoint(ckpt(torch.ones(2)), tmp_path / "a.ckpt")  # fails in the background
    with pytest.raises(ckptio.AsyncSaveError, match=r"a\.ckpt failed: .*No space left") as err:
        plugin.save_checkpoint(ckpt(torch.ones(2)), tmp_path / "b.ckpt")
    assert isinstance(err.value.__cause__, OSError)
    assert not (tmp_path / "b.ckpt").exists()  # that save did not start
    plugin.save_checkpoint(ckpt(torch.ones(2)), tmp_path / "b.ckpt")  # each failure is raised once
    plugin.save_checkpoint(ckpt(torch.ones(2)), tmp_path / "c.ckpt")
    with pytest.raises(ckptio.AsyncSaveError, match=r"c\.ckpt failed"):
        plugin.teardown()
    assert plugin._executor is None
    plugin.teardown()  # nothing left to raise
    assert committed(tmp_path / "b.ckpt") and not committed(tmp_path / "c.ckpt")


@pytest.mark.parametrize("max_in_flight", [1, 2])
def test_ckptio_async_waits_for_a_free_slot(tmp_path: Path, max_in_flight: int) -> None:
    """At most ``max_in_flight`` saves staged and not yet written; the next one waits."""
    plugin = CkptioCheckpointIO(async_save=True, max_in_flight=max_in_flight)
    gate = Gate(plugin)
    names = [f"s{i}.ckpt" for i in range(max_in_flight + 1)]
    for name in names[:-1]:
        plugin.save_checkpoint(ckpt(torch.ones(3)), tmp_path / name)  # returns: a slot was free
    last = threading.Thread(target=plugin.save_checkpoint, args=(ckpt(torch.ones(3)), tmp_path / names[-1]))
    last.start()
    last.join(0.5)
    assert last.is_alive(), "a save past max_in_flight returned while every slot was busy"
    gate.open()
    last.join(30)
    assert not last.is_alive()
    plugin.teardown()
    assert [os.path.basename(u) for u in gate.writes] == names  # one writer, in order
    assert all(committed(tmp_path / n) for n in names)


def test_ckptio_async_removal_and_load_wait_for_the_queued_save(tmp_path: Path) -> None:
    plugin = CkptioCheckpointIO(async_save=True, max_in_flight=2)
    gate = Gate(plugin)
    plugin.save_checkpoint(ckpt(torch.ones(2), 1), tmp_path / "a.ckpt")
    plugin.save_checkpoint(ckpt(torch.full((2,), 2.0), 2), tmp_path / "b.ckpt")
    gate.open(after=0.3)
    plugin.remove_checkpoint(tmp_path / "a.ckpt")  # waits for a's write, then removes it
    assert gate.opened.is_set() and not (tmp_path / "a.ckpt").exists()
    back = plugin.load_checkpoint(tmp_path / "b.ckpt")  # waits for b's write
    assert back["global_step"] == 2 and torch.equal(back["state_dict"]["w"], torch.full((2,), 2.0))
    plugin.teardown()
    assert sorted(os.listdir(tmp_path)) == ["b.ckpt"]


def test_ckptio_async_teardown_waits_and_the_plugin_works_again(tmp_path: Path) -> None:
    plugin = CkptioCheckpointIO(async_save=True)
    gate = Gate(plugin)
    plugin.save_checkpoint(ckpt(torch.ones(2)), tmp_path / "a.ckpt")
    gate.open(after=0.3)
    plugin.teardown()  # Lightning's end of fit: the checkpoint is committed when it returns
    assert committed(tmp_path / "a.ckpt")
    assert plugin._executor is None and plugin._stagers == [None]
    plugin.save_checkpoint(ckpt(torch.ones(2)), tmp_path / "b.ckpt")  # a second fit
    plugin.teardown()
    assert committed(tmp_path / "b.ckpt")


def test_ckptio_async_plugin_pickles_without_its_threads(tmp_path: Path) -> None:
    plugin = CkptioCheckpointIO(async_save=True, max_in_flight=2, thread_count=2)
    plugin.save_checkpoint(ckpt(torch.ones(2)), tmp_path / "a.ckpt")
    copy = pickle.loads(pickle.dumps(plugin))  # what strategy="ddp_spawn" does
    plugin.teardown()
    assert copy.async_save and copy.max_in_flight == 2 and copy.save_options == {"thread_count": 2}
    assert copy._executor is None and copy._jobs == [] and copy._stagers == [None, None]
    copy.save_checkpoint(ckpt(torch.ones(2)), tmp_path / "b.ckpt")
    copy.teardown()
    assert committed(tmp_path / "b.ckpt")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_ckptio_async_max_in_flight_is_checked(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        CkptioCheckpointIO(async_save=True, max_in_flight=bad)


@pytest.mark.slow
@pytest.mark.multirank
def test_ddp_saves_on_rank_zero_without_waiting_for_the_others(tmp_path: Path) -> None:
    """Under DDP Lightning calls the plugin on rank 0 only: the save must not hang on a
    collective the other rank never joins. (ddp_spawn: about 45 s here, mostly process start.)"""
    d = tmp_path / "ckpts"
    model = fresh_model()
    cb = ModelCheckpoint(dirpath=d, monitor="step", mode="max", save_top_k=1, save_last=True)
    t = trainer(max_epochs=2, strategy="ddp_spawn", devices=2, plugins=[io()], callbacks=[cb])
    t.fit(model)
    assert sorted(os.listdir(d)) == [f"epoch=1-step={STEPS_PER_EPOCH}.ckpt", "last.ckpt"]
    loaded = CkptioCheckpointIO().load_checkpoint(d / "last.ckpt")
    assert_same_params(params(model), _module_from(loaded))


# -- values ------------------------------------------------------------------------------------
def test_checkpoint_values_round_trip_exactly(tmp_path: Path) -> None:
    model = fresh_model()
    t = trainer(max_steps=3, enable_checkpointing=False)
    t.fit(model)
    ckpt = t._checkpoint_connector.dump_checkpoint(weights_only=False)
    ckpt["extra"] = {
        "tuple": (1, "a", None, (2.5,)),
        "int_keys": {0: "zero", 7: [1.5, -math.inf]},
        "empty": {},
        "empty_list": [],
        "bytes": b"\x00\xff",
        "dtype": torch.bfloat16,
        "size": torch.Size([2, 3]),
        "ordered": OrderedDict([("b", 1), ("a", 2)]),
        "tensor_in_tuple": (torch.arange(3), "x"),
        "key.with.dots": {"k": torch.zeros(2, dtype=torch.float16)},
        "__ckptio_tensor__": "a user key that looks like ckptio-lightning's own marker",
        "nan": math.nan,
        "big": 2**70,
    }
    ckpt["extra"]["np"] = np.float32(0.25)
    plugin = CkptioCheckpointIO()
    plugin.save_checkpoint(ckpt, tmp_path / "x.ckpt")
    back = plugin.load_checkpoint(tmp_path / "x.ckpt")
    expected = dict(ckpt)
    expected["extra"] = {**ckpt["extra"], "np": 0.25}
    assert_deep_equal(back, expected, "checkpoint")
    # the state dict keeps its module versions, which BatchNorm's loading reads
    assert back["state_dict"]._metadata == ckpt["state_dict"]._metadata
    # optimizer state: int parameter ids, tuple betas
    opt = back["optimizer_states"][0]
    assert sorted(opt["state"]) == sorted(ckpt["optimizer_states"][0]["state"])
    assert opt["param_groups"][0]["betas"] == (0.8, 0.99)


def assert_deep_equal(a: Any, b: Any, where: str) -> None:
    if isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
        return
    if isinstance(b, dict):  # AttributeDict hyper-parameters come back as dict; OrderedDict stays
        assert isinstance(a, dict) and (type(a) is OrderedDict) == (type(b) is OrderedDict), where
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in b:
            assert type(k) is type(next(x for x in a if x == k)), f"{where}[{k!r}] key type"
            assert_deep_equal(a[k], b[k], f"{where}[{k!r}]")
        return
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(b, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_deep_equal(x, y, f"{where}[{i}]")
    elif isinstance(b, float) and math.isnan(b):
        assert math.isnan(a), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class Tokenizer:
    pass


def test_unsafe_value_is_refused_with_its_key(tmp_path: Path) -> None:
    d = tmp_path / "ckpts"
    model = fresh_model(tokenizer=Tokenizer())
    t = trainer(max_steps=2, plugins=[io()], callbacks=[ModelCheckpoint(dirpath=d, every_n_train_steps=1)])
    with pytest.raises(ckptio.StateMismatchError) as err:
        t.fit(model)
    msg = str(err.value)
    assert "checkpoint['hyper_parameters']['tokenizer'] is a Tokenizer object" in msg
    assert "ckptio stores tensors and JSON values only" in msg and "never a pickle" in msg
    assert "save_hyperparameters(ignore=" in msg
    assert err.value.mismatched == ["checkpoint['hyper_parameters']['tokenizer']"]
    assert not d.exists() or not any(d.iterdir())  # refused before anything was written


@pytest.mark.parametrize(
    "value, expected",
    [
        (Path("/data"), "is a PosixPath object"),
        (np.zeros(3), "is a ndarray object"),
        ({(1, 2): "x"}, "under a key of type tuple"),
        (__import__("enum").Enum("Mode", "A").A, "is an enum member"),
        (torch.optim.SGD, "is a type object"),
    ],
)
def test_values_that_need_pickle_are_named(tmp_path: Path, value: Any, expected: str) -> None:
    with pytest.raises(ckptio.StateMismatchError, match="checkpoint\\['cb'\\]\\['x'\\]") as err:
        CkptioCheckpointIO().save_checkpoint({"cb": {"x": value}}, tmp_path / "x.ckpt")
    assert expected in str(err.value)
    assert not (tmp_path / "x.ckpt").exists()


def test_a_torch_save_file_is_refused_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ckptio.CheckpointError, match="is a file, not a ckptio checkpoint directory"):
        CkptioCheckpointIO().load_checkpoint(path)


def test_missing_checkpoint_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        CkptioCheckpointIO().load_checkpoint(tmp_path / "nope.ckpt")


def test_map_location_moves_tensors(tmp_path: Path) -> None:
    plugin = CkptioCheckpointIO()
    plugin.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "x.ckpt")
    back = plugin.load_checkpoint(tmp_path / "x.ckpt", map_location="meta")
    assert back["state_dict"]["w"].device.type == "meta"


# -- version, registration ---------------------------------------------------------------------
def test_unsupported_lightning_version_names_the_range(monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptio_lightning.version as version

    monkeypatch.setattr(version, "installed_version", lambda: "2.3.3")
    with pytest.raises(ckptio.PluginError) as err:
        CkptioCheckpointIO()
    assert "lightning>=2.5.4,<2.7" in str(err.value) and "2.3.3 is installed" in str(err.value)
    with pytest.raises(ckptio.PluginError, match="lightning>=2.5.4,<2.7"):
        CkptioModelCheckpoint()
    monkeypatch.setattr(version, "installed_version", lambda: "2.5.0")  # AsyncCheckpointIO races
    with pytest.raises(ckptio.PluginError, match="2.5.0 is installed"):
        CkptioCheckpointIO()
    monkeypatch.setattr(version, "installed_version", lambda: "3.0.0")
    with pytest.raises(ckptio.PluginError, match="3.0.0 is installed"):
        CkptioCheckpointIO()


def test_supported_range_matches_the_dependency() -> None:
    import ckptio_lightning
    from ckptio_lightning.version import check_version

    text = (REPO / "plugins" / "lightning" / "pyproject.toml").read_text()
    assert f'"lightning{ckptio_lightning.SUPPORTED_LIGHTNING}"' in text
    check_version()  # the installed release is in range


def test_lazy_exports_resolve_to_objects() -> None:
    import types

    import ckptio_lightning

    for name in ckptio_lightning.__all__:
        assert not isinstance(getattr(ckptio_lightning, name), types.ModuleType), name
    assert set(ckptio_lightning.__all__) <= set(dir(ckptio_lightning))
    with pytest.raises(AttributeError):
        ckptio_lightning.no_such_name  # noqa: B018


def test_entry_point_registers_without_importing_lightning() -> None:
    code = (
        "import sys, ckptio\n"
        "info = {p.name: p for p in ckptio.list_plugins()}['lightning']\n"
        "assert info.error is None, info.error\n"
        "assert 'lightning' not in sys.modules, 'the entry point imported Lightning'\n"
        "from ckptio_lightning import plugin\n"
        "seen = []\n"
        "plugin.register_integrations(lambda *a: seen.append(a))\n"
        "assert seen == [('lightning', 'ckptio_lightning:CkptioCheckpointIO')], seen\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-3000:]


# -- docs --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_docs_example_runs(tmp_path: Path) -> None:
    import re

    text = (REPO / "docs" / "lightning.md").read_text()
    blocks = [
        code for code, kind in re.findall(r"```python\n(# test: (\w+)\n.*?)```", text, re.S) if kind == "run"
    ]
    assert blocks
    for i, code in enumerate(blocks):
        (tmp_path / f"example_{i}.py").write_text(code)
        r = subprocess.run(
            [sys.executable, f"example_{i}.py"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env={**os.environ, "PYTHONWARNINGS": "ignore", "CKPTIO_PROGRESS": "0"},
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "last.ckpt" in r.stdout  # the second fit resumed
