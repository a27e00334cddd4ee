"""``ckptio`` subcommands on real checkpoints: in-process ``main()`` and the installed console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ckptio
import pytest
import torch
from ckptio import cli

from ._helpers import make_state, run_bin, run_json, run_main, tiny_model


def _bin_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix == ".bin")


def _flip_byte(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- help, version, usage errors -------------------------------------------------------------
def test_console_script_help_lists_subcommands_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_bin(["--help"])
    assert r.returncode == 0, r.stderr
    for word in ("plugins", "ls", "inspect", "verify", "cp", "consolidate", "rm", "demo", "exit status"):
        assert word in r.stdout
    assert "3  a plugin, backend or format is missing" in r.stdout
    code, out, _ = run_main(["--version"], capsys)
    assert code == 0 and out.strip() == f"ckptio {ckptio.__version__}"


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], single: Path) -> None:
    assert run_main([], capsys)[0] == 2
    assert run_main(["ls"], capsys)[0] == 2  # missing URL
    assert run_main(["frobnicate"], capsys)[0] == 2
    code, _, err = run_main(["ls", str(single), "-o", "novalue"], capsys)
    assert code == 2 and "KEY=VALUE" in err
    code, _, err = run_main(["ls", "s3://"], capsys)  # malformed URL
    assert code == 2 and "malformed" in err
    code, _, _ = run_main(["ls", str(single), "--storage-options", "[1]"], capsys)
    assert code == 2


def test_unknown_scheme_exits_3_with_json_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run_json(["ls", "nosuchscheme://bucket/x"], capsys)
    assert code == 3
    assert doc["exit_code"] == 3 and doc["error_type"] == "BackendNotFoundError"


def test_storage_options_parsing() -> None:
    opts = cli.parse_storage_options(
        ["client_kwargs.endpoint_url=http://127.0.0.1:9", "part_size=8388608", "anon=false", "key=abc"],
        '{"secret": "s"}',
    )
    assert opts == {
        "secret": "s",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
        "part_size": 8388608,
        "anon": False,
        "key": "abc",
    }


# -- plugins ---------------------------------------------------------------------------------
def test_plugins_json_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run_json(["plugins"], capsys)
    assert code == 0
    by_name = {p["name"]: p for p in doc["plugins"]}
    assert by_name["native"]["formats"] == ["native"] and by_name["native"]["distribution"] == "ckptio"
    assert "file" in by_name["local"]["backends"] and by_name["local"]["status"] == "ok"
    assert by_name["local"]["version"]


def _broken_site(tmp_path: Path) -> Path:
    """A real installed distribution (a .dist-info on the path) whose entry point cannot import."""
    site = tmp_path / "site"
    info = site / "ckptio_broken_demo-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ckptio-broken-demo\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[ckptio]\nbroken = ckptio_no_such_module.plugin\n")
    return site


def test_plugins_broken_plugin_console_script(tmp_path: Path) -> None:
    r = run_bin(["plugins", "--json"], env={"PYTHONPATH": str(_broken_site(tmp_path))})
    assert r.returncode == 0, r.stderr
    rows = {p["name"]: p for p in json.loads(r.stdout)["plugins"]}
    assert rows["broken"]["status"] == "error" and "ckptio_no_such_module" in rows["broken"]["error"]
    assert rows["broken"]["distribution"] == "ckptio-broken-demo"
    assert rows["local"]["status"] == "ok"  # one broken plugin never breaks the others


@pytest.fixture
def broken_plugin_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The broken distribution on ``sys.path`` of this process, plugins rediscovered (and restored after)."""
    from ckptio.plugins import reload_plugins

    monkeypatch.syspath_prepend(str(_broken_site(tmp_path)))
    yield reload_plugins
    monkeypatch.undo()
    reload_plugins()


def test_plugins_check_and_allow_list(
    broken_plugin_installed,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    with pytest.warns(RuntimeWarning, match="broken"):
        broken_plugin_installed()
    code, out, _ = run_main(["plugins"], capsys)
    assert code == 0 and "load errors" in out and "broken" in out
    assert run_main(["plugins", "--check"], capsys)[0] == 3

    monkeypatch.setenv("CKPTIO_PLUGINS", "local,native")
    broken_plugin_installed()
    code, doc = run_json(["plugins", "--check"], capsys)
    rows = {p["name"]: p for p in doc["plugins"]}
    assert code == 0 and doc["allow_list"] == "local,native"
    assert rows["broken"]["status"] == "skipped by CKPTIO_PLUGINS" and rows["broken"]["error"] is None
    assert rows["local"]["status"] == "ok"


# -- ls ----------------------------------------------------------------------------------------
def test_ls_series(series: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # an interrupted save leaves a staging directory: listed, but not committed
    (series / ".step_00000040.ckptio-partial").mkdir()
    code, doc = run_json(["ls", str(series)], capsys)
    assert code == 0 and doc["kind"] == "series" and doc["latest"] == 30
    steps = {s["step"]: s for s in doc["steps"]}
    assert sorted(steps) == [10, 20, 30, 40]
    assert steps[40]["committed"] is False and "bytes" not in steps[40]
    assert steps[30]["latest"] and steps[30]["committed"] and steps[30]["bytes"] > 0
    assert steps[20]["metrics"] == {"loss": pytest.approx(0.05)}
    code, out, _ = run_main(["ls", str(series)], capsys)
    assert code == 0 and "latest" in out and "NO (incomplete)" in out and "loss=0.05" in out


def test_ls_single_and_missing(single: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run_json(["ls", str(single)], capsys)
    assert code == 0 and doc["kind"] == "checkpoint" and doc["format"] == "native"
    assert doc["user"] == {"run": "cli-test"} and doc["bytes"] == ckptio.manifest(str(single)).total_bytes
    code, _, err = run_main(["ls", str(tmp_path / "nothing")], capsys)
    assert code == 1 and "no checkpoint" in err


# -- inspect -----------------------------------------------------------------------------------
def test_inspect(single: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run_json(["inspect", str(single)], capsys)
    assert code == 0
    tensors = {t["name"]: t for t in doc["tensors"]}
    w = tensors["model.0.weight"]
    assert (w["dtype"], w["shape"], w["bytes"]) == ("float32", [8, 4], 128)
    assert w["files"][0].endswith(".bin")
    assert tensors["step"]["dtype"] == "json"
    assert doc["manifest"]["user"] == {"run": "cli-test"}
    assert set(doc["manifest"]["file_list"]) == {p.name for p in _bin_files(single)}

    code, doc = run_json(["inspect", str(single), "--filter", "model.*"], capsys)
    assert sorted(t["name"] for t in doc["tensors"]) == [
        "model.0.bias",
        "model.0.weight",
        "model.2.bias",
        "model.2.weight",
    ]
    code, out, _ = run_main(["inspect", str(single)], capsys)
    assert "model.0.weight" in out and "8x4" in out and "float32" in out


def test_inspect_series_picks_latest_or_step(series: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run_json(["inspect", str(series)], capsys)
    assert code == 0 and doc["manifest"]["step"] == 30
    code, doc = run_json(["inspect", str(series), "--step", "10"], capsys)
    assert doc["manifest"]["step"] == 10
    assert run_main(["inspect", str(series), "--step", "11"], capsys)[0] == 1


# -- verify ------------------------------------------------------------------------------------
def test_verify_ok_and_damaged(series: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run_json(["verify", str(series)], capsys)
    assert code == 0 and doc["ok"] and len(doc["results"]) == 3
    assert all(r["bytes_checked"] > 0 for r in doc["results"])
    code, doc = run_json(["verify", str(series), "--latest"], capsys)
    assert [r["url"] for r in doc["results"]] == [str(series / "step_00000030")]

    _flip_byte(_bin_files(series / "step_00000020")[0], 3)
    code, doc = run_json(["verify", str(series)], capsys)
    assert code == 1 and not doc["ok"]
    bad = [r for r in doc["results"] if not r["ok"]]
    assert len(bad) == 1 and "step_00000020" in bad[0]["url"] and "checksum" in bad[0]["error"]
    code, out, _ = run_main(["verify", str(series / "step_00000020")], capsys)
    assert code == 1 and out.startswith("FAILED")
    assert run_main(["verify", str(series), "--latest"], capsys)[0] == 0  # the damage is elsewhere


def test_verify_console_script_exit_status(single: Path) -> None:
    _flip_byte(_bin_files(single)[-1], 0)
    r = run_bin(["verify", str(single)])
    assert r.returncode == 1 and "FAILED" in r.stdout and "checksum" in r.stdout


# -- cp ----------------------------------------------------------------------------------------
def _load_into_fresh(url: str, seed: int = 99) -> tuple[torch.nn.Module, dict]:
    model = tiny_model(seed)
    state = make_state(model, step=-1)
    ckptio.load(state, url)
    return model, state


def test_cp_file_copy_keeps_layout(single: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "copy"
    code, doc = run_json(["cp", str(single), str(dst)], capsys)
    assert code == 0 and doc["mode"] == "files" and doc["bytes"] == ckptio.manifest(str(single)).total_bytes
    assert (dst / "manifest.json").read_bytes() == (single / "manifest.json").read_bytes()
    assert ckptio.verify(str(dst)) > 0
    model, state = _load_into_fresh(str(dst))
    ref, _ = _load_into_fresh(str(single), seed=5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert state["step"] == 7 and state["config"]["betas"] == (0.9, 0.95)
    # an existing checkpoint is not replaced without --overwrite
    code, _, err = run_main(["cp", str(single), str(dst)], capsys)
    assert code == 1 and "--overwrite" in err
    assert run_main(["cp", str(single), str(dst), "--overwrite"], capsys)[0] == 0
    assert run_main(["cp", str(single), str(single)], capsys)[0] == 2


def test_cp_convert_formats_roundtrip(
    single: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ckptio_safetensors")
    st = tmp_path / "st"
    code, doc = run_json(["cp", str(single), f"safetensors+file://{st}"], capsys)
    assert code == 0 and doc["mode"] == "convert" and doc["format"] == "safetensors"
    m = ckptio.manifest(str(st))
    assert m.format == "safetensors" and m.user == {"run": "cli-test"}
    model, state = _load_into_fresh(str(st))
    ref, _ = _load_into_fresh(str(single), seed=5)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert state["config"] == {"lr": 1e-3, "name": "tiny", "betas": (0.9, 0.95)} and state["step"] == 7
    # and back to native with --format
    back = tmp_path / "back"
    code, doc = run_json(["cp", str(st), str(back), "--format", "native"], capsys)
    assert code == 0 and ckptio.manifest(str(back)).format == "native"
    assert not any(name.endswith(".index.json") for name in ckptio.manifest(str(back)).files)
    model2, _ = _load_into_fresh(str(back))
    assert all(torch.equal(a, b) for a, b in zip(model2.state_dict().values(), ref.state_dict().values()))


def test_cp_full_carries_artifacts_and_step(
    series: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class Note:
        name = "note"

        def on_tensors_written(self, ctx: ckptio.AddonContext) -> None:
            ctx.write_bytes("notes/readme.txt", b"hello")

    src = tmp_path / "with_artifact"
    ckptio.save(make_state(tiny_model()), str(src), addons=[Note()])
    dst = tmp_path / "full"
    code, doc = run_json(["cp", str(src), str(dst), "--full"], capsys)
    assert code == 0 and doc["mode"] == "convert" and doc["artifacts"] == ["notes/readme.txt"]
    assert (dst / "notes" / "readme.txt").read_bytes() == b"hello"
    assert ckptio.verify(str(dst)) > 0
    # a series root as the source: its latest step, with step and metrics kept
    code, doc = run_json(["cp", str(series), str(tmp_path / "from_series"), "--full"], capsys)
    m = ckptio.manifest(str(tmp_path / "from_series"))
    assert (m.step, m.metrics) == (30, {"loss": pytest.approx(1 / 30)})


def test_cp_unknown_destination_format_exits_3(
    single: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(["cp", str(single), str(tmp_path / "x"), "--format", "nosuchformat"], capsys)
    assert code == 3 and "nosuchformat" in err
    assert not (tmp_path / "x").exists()


def _save_sharded(rank: int, world_size: int, path: str) -> None:
    """Each rank holds half of every row of a DTensor: a checkpoint with 2 chunks per tensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.arange(32, dtype=torch.float32).reshape(8, 4)
    state = {
        "w": distribute_tensor(full, mesh, [Shard(0)]),
        "meta": {"epoch": 3},
        "rng": ckptio.PerRank(rank),
    }
    ckptio.save(state, path)


@pytest.mark.multirank
@pytest.mark.slow
def test_cp_reshards_a_two_rank_checkpoint_into_a_full_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.e2e._ranks import run_ranks

    src = tmp_path / "sharded"
    run_ranks(_save_sharded, 2, args=(str(src),), env={"CKPTIO_PROGRESS": "0"})
    assert ckptio.manifest(str(src)).world_size == 2
    code, doc = run_json(["inspect", str(src)], capsys)
    assert {t["name"]: t["chunks"] for t in doc["tensors"]}["w"] == 2
    dst = tmp_path / "full"
    code, doc = run_json(["cp", str(src), str(dst), "--full"], capsys)
    assert code == 0
    assert ckptio.manifest(str(dst)).world_size == 1
    code, doc = run_json(["inspect", str(dst)], capsys)
    rows = {t["name"]: t for t in doc["tensors"]}
    assert rows["w"]["chunks"] == 1 and rows["w"]["shape"] == [8, 4]
    out = {"w": torch.zeros(8, 4), "meta": {"epoch": None}, "rng": {"rank0": None, "rank1": None}}
    ckptio.load(out, str(dst))
    assert torch.equal(out["w"], torch.arange(32, dtype=torch.float32).reshape(8, 4))
    assert out["meta"] == {"epoch": 3} and out["rng"] == {"rank0": 0, "rank1": 1}


@pytest.mark.servers
def test_cp_to_s3_and_back(  # type: ignore[no-untyped-def]
    single: Path, tmp_path: Path, s3_server, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from ckptio.plugins import backend_factory

    try:
        backend_factory("s3")
    except ckptio.BackendNotFoundError:
        pytest.skip("no s3:// backend installed (ckptio-fsspec)")
    opts = json.dumps(s3_server.storage_options())
    url = f"s3://{s3_bucket}/copies/one"
    r = run_bin(["cp", str(single), url, "--dst-storage-options", opts, "--json"])  # as a user runs it
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["mode"] == "files"
    assert run_main(["verify", url, "--storage-options", opts], capsys)[0] == 0
    code, doc = run_json(["ls", url, "--storage-options", opts], capsys)
    assert code == 0 and doc["user"] == {"run": "cli-test"}
    ref, _ = _load_into_fresh(str(single), seed=5)
    # convert on the way back (S3 -> safetensors on disk); the source's options come from -o
    if "safetensors" in {f for info in ckptio.list_plugins() for f in info.formats}:
        back = tmp_path / "back"
        code, out, err = run_main(
            ["cp", url, f"safetensors+file://{back}", "--storage-options", opts], capsys
        )
        assert code == 0, err
        model, state = _load_into_fresh(str(back))
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    # a series on S3: ls, verify, rm through the same options (dotted -o keys)
    s3 = s3_server.storage_options()
    dotted = [
        "-o",
        f"key={s3['key']}",
        "-o",
        f"secret={s3['secret']}",
        "-o",
        f"client_kwargs.endpoint_url={s3['client_kwargs']['endpoint_url']}",
        "-o",
        f"client_kwargs.region_name={s3['client_kwargs']['region_name']}",
    ]
    for step in (5, 6):
        code, _, err = run_main(
            ["cp", str(single), f"s3://{s3_bucket}/series/step_{step:08d}", *dotted], capsys
        )
        assert code == 0, err
    code, doc = run_json(["ls", f"s3://{s3_bucket}/series", *dotted], capsys)
    assert code == 0 and [s["step"] for s in doc["steps"]] == [5, 6] and doc["latest"] == 6
    code, doc = run_json(["verify", f"s3://{s3_bucket}/series", *dotted], capsys)
    assert code == 0 and len(doc["results"]) == 2
    code, doc = run_json(["rm", f"s3://{s3_bucket}/series", "5", *dotted], capsys)
    assert code == 0 and doc["remaining"] == [6]
    assert run_main(["rm", f"s3://{s3_bucket}/series", "6", *dotted], capsys)[0] == 1  # protected


# -- rm ----------------------------------------------------------------------------------------
def test_rm_protects_latest_unless_forced(series: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["rm", str(series), "30"], capsys)
    assert code == 1 and "--force" in err
    assert (series / "step_00000030" / "manifest.json").exists()
    code, doc = run_json(["rm", str(series), "10"], capsys)
    assert code == 0 and doc["deleted"] == [10] and doc["remaining"] == [20, 30]
    assert not (series / "step_00000010").exists()
    assert run_main(["rm", str(series), "15"], capsys)[0] == 1  # no such step
    code, doc = run_json(["rm", str(series), "30", "--force"], capsys)
    assert code == 0 and doc["remaining"] == [20]
    assert (series / "latest").read_text().strip() == "step_00000020"
    with ckptio.CheckpointManager(str(series)) as mgr:
        assert mgr.latest_step() == 20


def test_rm_uncommitted_leftovers(series: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (series / ".step_00000040.ckptio-partial").mkdir()
    (series / ".step_00000040.ckptio-partial" / "__0_0.bin").write_bytes(b"x")
    code, doc = run_json(["rm", str(series), "40"], capsys)
    assert code == 0 and doc["deleted"] == [40]
    assert not (series / ".step_00000040.ckptio-partial").exists()


# -- consolidate and demo: optional modules ------------------------------------------------------
def test_consolidate_delegates_to_safetensors(
    single: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ckptio_safetensors.cli")
    dst = tmp_path / "hf"
    code, out, err = run_main(["consolidate", str(single), str(dst), "--json"], capsys)
    assert code == 0, err
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {"0.weight", "0.bias", "2.weight", "2.bias"} or all(
        k.endswith(("weight", "bias")) for k in index["weight_map"]
    )


def test_consolidate_refuses_a_non_empty_destination_unless_overwrite(
    single: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 4: consolidate deleted the ``*.safetensors`` of any existing directory, with no flag."""
    pytest.importorskip("ckptio_safetensors.cli")
    dst = tmp_path / "hf"
    dst.mkdir()
    (dst / "model-00001-of-00003.safetensors").write_bytes(b"someone else's weights")
    (dst / "README.md").write_text("keep")
    code, _, err = run_main(["consolidate", str(single), str(dst)], capsys)
    assert code == 1 and "--overwrite" in err, err
    assert sorted(os.listdir(dst)) == ["README.md", "model-00001-of-00003.safetensors"]
    assert _siblings(dst) == ["hf"]
    code, _, err = run_main(["consolidate", str(single), str(dst), "--overwrite", "--json"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(dst)) == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    assert _siblings(dst) == ["hf"]


def test_consolidate_without_plugin_exits_3(
    single: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ckptio_safetensors", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "ckptio_safetensors.cli", None)
    code, _, err = run_main(["consolidate", str(single), str(tmp_path / "hf")], capsys)
    assert code == 3 and "pip install ckptio-safetensors" in err
    assert run_main(["ls", str(single)], capsys)[0] == 0  # other subcommands unaffected


def test_broken_demo_breaks_nothing_else(
    single: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ckptio.demo", None)
    code, _, err = run_main(["demo"], capsys)
    assert code == 3 and "demo" in err
    assert run_main(["verify", str(single)], capsys)[0] == 0
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0 and "demo" in out


def test_demo_help_comes_from_the_demo_module(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ckptio.demo")
    code, out, _ = run_main(["demo", "--help"], capsys)
    assert code == 0 and "usage: ckptio demo" in out


# -- logging and progress ----------------------------------------------------------------------
def test_verbose_logs_save_summary(single: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["cp", str(single), str(tmp_path / "v"), "--full", "-v"], capsys)
    assert code == 0 and "saved" in err and "GB/s" in err
    code, _, err = run_main(["cp", str(single), str(tmp_path / "q"), "--full"], capsys)
    assert code == 0 and "saved" not in err


def test_progress_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptio import progress

    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("CKPTIO_PROGRESS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert progress.enabled(Tty())
    assert not progress.enabled(open(os.devnull, "w"))  # not a terminal
    monkeypatch.setenv("CKPTIO_PROGRESS", "0")
    assert not progress.enabled(Tty())
    monkeypatch.setenv("CKPTIO_PROGRESS", "1")
    assert progress.enabled(open(os.devnull, "w"))
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 draws
    assert not progress.enabled(Tty())
    monkeypatch.setenv("RANK", "0")
    progress.set_enabled(False)
    try:
        assert not progress.enabled(Tty())
        with progress.progress(10, "x") as bar:
            bar.update(4)
            assert not bar.active and bar.count == 4
    finally:
        progress.set_enabled(None)
    with progress.progress(100, "forced", enable=True) as bar:
        bar.update(100)
        assert bar.active


# -- trust: cp and rm never lose or forge data (issue 11) -----------------------------------------
def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _siblings(path: Path) -> list[str]:
    """What lies beside ``path`` with its name in it (staging, moved-aside and lease entries)."""
    return sorted(p.name for p in path.parent.iterdir() if path.name in p.name)


@pytest.mark.parametrize("how", [[], ["--overwrite"], ["--full"], ["--full", "--overwrite"]])
def test_cp_never_replaces_a_run_root_or_foreign_directory(
    series: Path, single: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], how: list[str]
) -> None:
    """Finding 1: ``cp SRC RUN_ROOT`` made a run with steps 10, 20, 30 one checkpoint (exit 0)."""
    before = _tree(series)
    code, _, err = run_main(["cp", str(single), str(series), *how], capsys)
    assert code == 1 and "not a ckptio checkpoint" in err, err
    assert _tree(series) == before and _siblings(series) == ["run"]
    with ckptio.CheckpointManager(str(series)) as mgr:
        assert mgr.steps() == [10, 20, 30]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert run_main(["cp", str(single), str(foreign), *how], capsys)[0] == 1
    assert _tree(foreign) == {"notes.txt": b"keep me"} and _siblings(foreign) == ["foreign"]


def _forge(ckpt: Path, null_checksums: bool) -> None:
    """Re-sign the manifest (as an attacker can), optionally with every checksum set to null."""
    from tests.reliability._ckpt import read_manifest_json, write_signed_manifest

    body = read_manifest_json(ckpt)
    if null_checksums:
        for entry in body["format_metadata"]["storage"]:
            entry["xxh3"] = None
        for info in body["files"].values():
            info.pop("xxh3", None)
    write_signed_manifest(ckpt, body)


def test_cp_checks_every_checksum_before_publishing(
    single: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 6: cp compared sizes only, so a data file with the right size but other bytes was
    copied and published."""
    data = _bin_files(single)[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # same size, one bit flipped
    data.write_bytes(bytes(raw))
    dst = tmp_path / "copy"
    code, _, err = run_main(["cp", str(single), str(dst)], capsys)
    assert code == 1 and "checksum" in err, err
    assert not dst.exists() and _siblings(dst) == [], "nothing published, no staging left behind"


@pytest.mark.parametrize("null_checksums", [False, True])
def test_cp_never_copies_a_symlinked_data_file(
    single: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], null_checksums: bool
) -> None:
    """Finding 6: a data file symlinked to a secret of the same size, checksums nulled and the
    manifest re-signed: cp copied the secret."""
    data = _bin_files(single)[0]
    secret = tmp_path / "secret"
    secret.write_bytes(b"S" * data.stat().st_size)
    data.unlink()
    data.symlink_to(secret)
    _forge(single, null_checksums)
    dst = tmp_path / "copy"
    code, _, err = run_main(["cp", str(single), str(dst)], capsys)
    assert code == 1, err
    assert not dst.exists() and _siblings(dst) == []
    copied = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and p != secret]
    assert not any(b"SSSS" in p.read_bytes() for p in copied)


def test_cp_full_refuses_hostile_planner_paths_without_allocating(
    single: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 11: ``planner_data`` path ``["model", 300000000]`` made ``cp --full`` build a
    300-million-entry list; it must end as a ckptio error at once."""
    import resource
    import time

    from tests.reliability._ckpt import read_manifest_json, write_signed_manifest

    body = read_manifest_json(single)
    planner = body["format_metadata"]["dcp"]["planner_data"]
    key = next(k for k, v in planner.items() if len(v) > 1)
    planner[key] = ["model", 300_000_000]
    write_signed_manifest(single, body)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    code, doc = run_json(["cp", str(single), str(tmp_path / "full"), "--full"], capsys)
    assert code == 1 and doc["exit_code"] == 1 and doc["error_type"].endswith("Error")
    assert time.monotonic() - t0 < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 512 * 1024  # KiB
    assert not (tmp_path / "full").exists()


def test_destination_state_refuses_paths_that_build_huge_lists(single: Path) -> None:
    """The guard in ``cp`` itself, whatever the source format checks: list indices are bounded by
    the number of entries, paths by depth, and clashing paths are corruption, not TypeError."""
    from ckptio.errors import CorruptCheckpointError

    with pytest.raises(CorruptCheckpointError, match="invalid state-dict path"):
        cli._state_path("model.w", ["model", 300_000_000], 10, "x")
    with pytest.raises(CorruptCheckpointError):
        cli._state_path("model.w", ["model"] * 1000, 10, "x")
    with pytest.raises(CorruptCheckpointError):
        cli._state_path("model.w", [0, "w"], 10, "x")
    assert cli._state_path("model.l.3", ["model", "l", 3], 10, "x") == ("model", "l", 3)


def _start_live_save(root: Path, step: int, tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    import time

    ready, go = tmp_path / f"ready{step}", tmp_path / f"go{step}"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("_live_save.py")),
            str(root),
            str(step),
            str(ready),
            str(go),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "CKPTIO_PROGRESS": "0"},
    )
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, "the saving process died before writing its data"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc, go


def _finish(proc: subprocess.Popen[str], go: Path) -> str:
    go.write_text("go")
    out, _ = proc.communicate(timeout=120)
    return out.strip()


def test_rm_leaves_a_save_in_progress_alone(
    series: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Finding 2: ``rm ROOT N`` while step N was being saved removed its staging directory; the
    save recreated it empty, committed a manifest into it, and a step without data became latest."""
    proc, go = _start_live_save(series, 40, tmp_path)
    try:
        staging = [n for n in os.listdir(series) if n.startswith(".step_00000040.") and n.endswith("partial")]
        assert len(staging) == 1
        code, doc = run_json(["rm", str(series), "40"], capsys)
        assert code == 0 and doc["deleted"] == [] and doc["remaining"] == [10, 20, 30]
        assert [b["step"] for b in doc["busy"]] == [40] and str(proc.pid) in doc["busy"][0]["holder"]
        assert (series / staging[0]).is_dir() and any((series / staging[0]).iterdir())
    finally:
        out = _finish(proc, go)
    assert out == "saved", out
    with ckptio.CheckpointManager(str(series)) as mgr:
        assert mgr.latest_step() == 40 and mgr.steps() == [10, 20, 30, 40]
    for step in (10, 20, 30, 40):
        assert ckptio.verify(str(series / f"step_{step:08d}")) > 0
    dest = {"w": torch.zeros(1000)}
    ckptio.load(dest, str(series / "step_00000040"))
    assert torch.equal(dest["w"], torch.full((1000,), 40.0))


def test_rm_is_refused_while_another_process_holds_the_run_lock(
    series: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc, go = _start_live_save(series, 40, tmp_path)
    try:
        code, _, err = run_main(["rm", str(series), "10"], capsys)
        assert code == 1 and str(proc.pid) in err and "--takeover" in err, err
        assert (series / "step_00000010" / "manifest.json").exists()
        code, doc = run_json(["rm", str(series), "10", "--force"], capsys)  # --force is about protection
        assert code == 1 and doc["error_type"] == "RunLockedError"
        code, doc = run_json(["rm", str(series), "10", "--takeover"], capsys)
        assert code == 0 and doc["deleted"] == [10]
    finally:
        _finish(proc, go)  # the taken-over job stops at its next save, or commits this one whole
    with ckptio.CheckpointManager(str(series)) as mgr:
        for step in mgr.steps():
            assert ckptio.verify(str(mgr.url_of(step))) > 0
        assert 10 not in mgr.steps() and {20, 30} <= set(mgr.steps())


def test_rm_removes_dead_leftovers_of_any_naming(series: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Leftovers of a SIGKILLed save (unique staging name, lease of a dead pid) go; so do
    ckptio 0.1's untokened ones."""
    import json as _json
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    token = "0123456789ab"
    (series / f".step_00000040.{token}.ckptio-partial").mkdir()
    (series / f".step_00000040.{token}.ckptio-partial" / "__0_0.bin").write_bytes(b"x")
    (series / f".step_00000040.{token}.ckptio-lease").write_text(
        _json.dumps({"host": socket.gethostname(), "pid": dead.pid, "heartbeat": 0, "token": token})
    )
    (series / ".step_00000050.ckptio-partial").mkdir()
    code, doc = run_json(["rm", str(series), "40", "50"], capsys)
    assert code == 0 and doc["deleted"] == [40, 50] and doc["busy"] == []
    assert sorted(os.listdir(series)) == ["latest", "step_00000010", "step_00000020", "step_00000030"]
