"""URL parsing: plain paths, ``file://``, ``format+scheme://``, malformed input, traversal."""

from __future__ import annotations

import os
from pathlib import Path

import ckptio
import pytest
from ckptio.url import URL, join_path, parse_url


def test_plain_relative_path_is_absolute_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    u = parse_url("ckpts/step1")
    assert u == URL(scheme="file", path=str(tmp_path / "ckpts" / "step1"), format=None)
    assert str(u) == str(tmp_path / "ckpts" / "step1")


def test_pathlike_and_home_expansion(tmp_path: Path) -> None:
    assert parse_url(tmp_path / "x").path == str(tmp_path / "x")
    assert parse_url("~/x").path == os.path.join(os.path.expanduser("~"), "x")


def test_file_url_and_local_alias() -> None:
    assert parse_url("file:///data/run//step/") == URL("file", "/data/run/step")
    assert parse_url("local:///data/run").scheme == "file"
    assert parse_url("FILE:///a").scheme == "file"


def test_format_plus_scheme() -> None:
    u = parse_url("safetensors+s3://bucket//run/step10/")
    assert (u.format, u.scheme, u.path) == ("safetensors", "s3", "bucket/run/step10")
    assert str(u) == "safetensors+s3://bucket/run/step10"
    assert u.storage_url == "s3://bucket/run/step10"
    assert parse_url("native+file:///tmp/x") == URL("file", "/tmp/x", "native")
    assert str(parse_url("native+file:///tmp/x")) == "native+file:///tmp/x"


def test_url_helpers() -> None:
    u = parse_url("s3://b/run")
    assert u.join("step_1", "manifest.json").path == "b/run/step_1/manifest.json"
    assert u.name == "run"
    assert u.parent.path == "b"
    assert u.with_format("safetensors").format == "safetensors"
    assert parse_url(u) is u


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "file://relative/path",
        "s3://",
        "s3:///",
        "a+b+c://x",
        "1abc://x",
        "s3_x://bucket",
        "in valid://x",
        "/tmp/nul\x00byte",
    ],
)
def test_malformed_urls(bad: str) -> None:
    with pytest.raises(ckptio.InvalidURLError):
        parse_url(bad)


def test_invalid_url_error_is_a_checkpoint_error_and_value_error() -> None:
    with pytest.raises(ValueError):
        parse_url("file://x")
    with pytest.raises(ckptio.CheckpointError):
        parse_url("file://x")


@pytest.mark.parametrize("part", ["..", "a/../..", "../etc/passwd", "x\\..\\y", "a\x00b"])
def test_join_path_refuses_traversal(part: str) -> None:
    with pytest.raises(ckptio.InvalidURLError, match="refusing"):
        join_path("/ckpt", part)
    with pytest.raises(ckptio.InvalidURLError):
        parse_url("s3://b/run").join(part)


def test_join_path_normalises_harmless_parts() -> None:
    assert join_path("/ckpt", "a", "./b/", "/c") == "/ckpt/a/b/c"
    assert join_path("/ckpt/") == "/ckpt/"
    assert join_path("", "a/b") == "a/b"
