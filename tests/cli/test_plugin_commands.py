"""Plugins add ``ckptio`` subcommands through the ``register_commands`` hook."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ckptio
import pytest
from ckptio import plugins

from ._helpers import run_json, run_main


def _add_hello(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("who")
    parser.add_argument("--shout", action="store_true")


def _run_hello(args: argparse.Namespace, ctx: Any) -> int:
    if args.who == "nobody":
        raise ckptio.CheckpointNotFoundError("nobody is there")
    greeting = f"hello {args.who}"
    greeting = greeting.upper() if args.shout else greeting
    ctx.note("about to greet")
    ctx.emit({"greeting": greeting, "storage_options": ctx.storage_options}, lambda: greeting)
    return 0


class HelloPlugin:
    @ckptio.hookimpl
    def register_commands(self, register: Any) -> None:
        register("hello", _add_hello, _run_hello, help="greet someone (a test plugin)")
        register("ls", _add_hello, _run_hello, help="tries to replace ckptio's own ls")
        register(
            "lazy-broken",
            "ckptio_no_such_module_cmd:add",
            "ckptio_no_such_module_cmd:run",
            help="cannot import",
        )


@pytest.fixture
def hello_plugin(request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"test-hello-{request.node.name}"
    ckptio.register_plugin(HelloPlugin(), name)
    yield name
    for name in ("hello", "ls", "lazy-broken"):
        plugins.unregister("command", name)


def test_a_runtime_plugin_adds_a_command(hello_plugin: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["hello", "world"], capsys)
    assert code == 0 and out.strip() == "hello world" and "about to greet" in err
    code, doc = run_json(["hello", "world", "--shout", "-o", "a.b=1"], capsys)
    assert code == 0 and doc == {"greeting": "HELLO WORLD", "storage_options": {"a": {"b": 1}}}
    code, doc = run_json(["hello", "nobody"], capsys)  # a ckptio error: the documented exit status
    assert code == 1 and doc["error_type"] == "CheckpointNotFoundError"
    assert run_main(["hello"], capsys)[0] == 2  # its own arguments are parsed by ckptio
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0 and "hello" in out and "greet someone" in out
    code, out, _ = run_main(["hello", "--help"], capsys)
    assert code == 0 and "--shout" in out and "--json" in out


def test_plugin_commands_never_replace_core_ones_and_are_listed(
    hello_plugin: str, single: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, doc = run_json(["ls", str(single)], capsys)
    assert code == 0 and doc["kind"] == "checkpoint"
    code, doc = run_json(["plugins"], capsys)
    rows = {p["name"]: p for p in doc["plugins"]}
    assert rows[hello_plugin]["commands"] == ["hello", "ls", "lazy-broken"]
    if "safetensors" in rows and rows["safetensors"]["status"] == "ok":
        assert rows["safetensors"]["commands"] == ["consolidate"]
    code, out, _ = run_main(["plugins"], capsys)
    assert "COMMANDS" in out and "hello" in out


def test_a_plugin_command_that_cannot_import_is_exit_3(
    hello_plugin: str, single: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(["lazy-broken", "x"], capsys)
    assert code == 3 and "ckptio_no_such_module_cmd" in err
    assert run_main(["ls", str(single)], capsys)[0] == 0
    assert run_main(["--help"], capsys)[0] == 0


def test_consolidate_is_registered_by_the_safetensors_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ckptio_safetensors.cli")
    spec = plugins.command_specs()["consolidate"]
    assert spec.plugin == "safetensors" and spec.run == "ckptio_safetensors.cli:run"
    add_arguments, run = plugins.load_command(spec)
    assert run is sys.modules["ckptio_safetensors.cli"].run
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["a", "b", "--shard-size", "1GB"])
    assert (args.src, args.dst, args.shard_size) == ("a", "b", "1GB")
