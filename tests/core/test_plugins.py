"""The plugin system: entry-point discovery, broken plugins, ``CKPTIO_PLUGINS``, runtime registration.

Discovery runs once per process, so everything that depends on what is installed (or on the
environment) runs in a fresh interpreter with a temporary ``*.dist-info`` on ``sys.path``: the
same thing ``pip install`` leaves behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ckptio
import pytest
import torch
from ckptio import plugins
from ckptio.formats.native import NativeFormat
from ckptio_local import LocalBackend


def _run_python(code: str, *, env: dict[str, str] | None = None, pythonpath: Path | None = None) -> Any:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last, which is returned."""
    full_env = {k: v for k, v in os.environ.items() if k != plugins.ALLOW_ENV}
    full_env.update(env or {})
    if pythonpath is not None:
        full_env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), full_env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fake_dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding an "installed" distribution with three ckptio entry points:
    one whose module does not import, one whose hook raises, and one that works."""
    root = tmp_path_factory.mktemp("site")
    info = root / "ckptio_fakeplug-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ckptio-fakeplug\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[ckptio]\n"
        "broken_import = ckptio_no_such_module_xyz.plugin\n"
        "broken_hook = ckptio_fake_broken_hook\n"
        "fakegood = ckptio_fake_good\n"
    )
    (root / "ckptio_fake_broken_hook.py").write_text(
        "from ckptio import hookimpl\n\n"
        "@hookimpl\n"
        "def register_backends(register):\n"
        "    raise RuntimeError('hook exploded')\n"
    )
    (root / "ckptio_fake_good.py").write_text(
        "from ckptio import hookimpl\n\n"
        "@hookimpl\n"
        "def register_backends(register):\n"
        "    register('fakegood', 'ckptio_local.backend:LocalBackend')\n"
    )
    return root


_DISCOVER = """
import json, tempfile, warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import ckptio
    infos = {p.name: p.as_dict() for p in ckptio.list_plugins()}
d = tempfile.mkdtemp()
ckptio.save({"w": torch.arange(4.0)}, d + "/ck")
out = {"w": torch.zeros(4)}
ckptio.load(out, d + "/ck")
print(json.dumps({
    "infos": infos,
    "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    "ok": out["w"].tolist() == [0.0, 1.0, 2.0, 3.0],
}))
"""


def test_entry_points_list_local_backend_and_native_format() -> None:
    infos = {p.name: p for p in ckptio.list_plugins()}
    local = infos["local"]
    assert local.distribution == "ckptio-local"
    assert local.error is None and not local.skipped
    assert "file" in local.backends
    assert "native" in infos["native"].formats
    assert plugins.backend_factory("file") is LocalBackend


def test_broken_plugins_warn_and_the_rest_works(fake_dist: Path) -> None:
    res = _run_python(_DISCOVER, pythonpath=fake_dist)
    infos = res["infos"]
    assert res["ok"], "save/load through the local backend must keep working"
    assert "ModuleNotFoundError" in infos["broken_import"]["error"]
    assert "hook exploded" in infos["broken_hook"]["error"]
    assert infos["broken_import"]["distribution"] == "ckptio-fakeplug"
    assert infos["fakegood"]["error"] is None and infos["fakegood"]["backends"] == ["fakegood"]
    assert infos["local"]["error"] is None
    joined = "\n".join(res["warnings"])
    assert "'broken_import'" in joined and "'broken_hook'" in joined
    assert "fakegood" not in joined


_ALLOW = """
import json, os, tempfile
import torch
import ckptio
from ckptio import plugins

def infos():
    return {p.name: p.as_dict() for p in ckptio.list_plugins()}

def errors():
    msgs = {}
    for url in ("s3://bucket/run/step1", "safetensors+gs://b/x", tempfile.mkdtemp() + "/plain"):
        try:
            ckptio.save({"w": torch.ones(2)}, url)
        except ckptio.BackendNotFoundError as exc:
            msgs[url.rsplit("/", 1)[-1] if url.startswith("/") else url] = str(exc)
    return msgs

out = {"local": {"infos": infos(), "errors": errors()}}
# one interpreter, several allow-lists: rediscover after changing the variable
for key, value in (("local+fakegood", "local, fakegood"), ("none", "")):
    os.environ[plugins.ALLOW_ENV] = value
    plugins.reload_plugins()
    out[key] = {"infos": infos(), "errors": errors()}
print(json.dumps(out))
"""


def test_allow_list_env_var_and_missing_backend_hints(fake_dist: Path) -> None:
    res = _run_python(_ALLOW, env={plugins.ALLOW_ENV: "local"}, pythonpath=fake_dist)

    # CKPTIO_PLUGINS=local: nothing else loads (not even the broken ones: no warning, no error)
    infos, errors = res["local"]["infos"], res["local"]["errors"]
    assert infos["broken_import"]["skipped"] and infos["broken_import"]["error"] is None
    assert infos["fakegood"]["skipped"] and infos["fakegood"]["backends"] == []
    assert not infos["local"]["skipped"]
    # the core's native format is built in: allow-listing backends must not disable it
    assert not infos["native"]["skipped"] and infos["native"]["formats"] == ["native"]
    s3 = errors["s3://bucket/run/step1"]
    assert "\n" not in s3
    assert "s3://" in s3 and "pip install ckptio-fsspec s3fs" in s3
    assert "ckptio-fsspec" in errors["safetensors+gs://b/x"] and "gcsfs" in errors["safetensors+gs://b/x"]
    assert "plain" not in errors  # the local backend serves plain paths

    infos = res["local+fakegood"]["infos"]
    assert not infos["fakegood"]["skipped"] and infos["fakegood"]["backends"] == ["fakegood"]
    assert infos["broken_hook"]["skipped"]

    infos, errors = res["none"]["infos"], res["none"]["errors"]
    assert infos["local"]["skipped"] and not infos["native"]["skipped"]
    assert "pip install ckptio-local" in errors["plain"]


def test_unknown_scheme_without_hint_in_process() -> None:
    with pytest.raises(ckptio.BackendNotFoundError, match=r"no ckptio backend for nosuch:// URLs.*install"):
        ckptio.save({}, "nosuch://bucket/x")
    with pytest.raises(ckptio.FormatNotFoundError, match="no ckptio format named 'nosuchfmt'"):
        ckptio.save({}, "nosuchfmt+file:///tmp/x")
    with pytest.raises(ckptio.AddonNotFoundError, match="no ckptio addon named 'nosuchaddon'"):
        ckptio.save({}, "/tmp/x", addons=["nosuchaddon"])


# -- runtime registration -----------------------------------------------------------------------
@pytest.fixture
def cleanup_registrations() -> Iterator[list[tuple[str, str]]]:
    added: list[tuple[str, str]] = []
    yield added
    for kind, name in added:
        plugins.unregister(kind, name)


def test_runtime_backend_receives_url_and_storage_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cleanup_registrations: list[tuple[str, str]]
) -> None:
    seen: list[tuple[ckptio.URL, dict[str, Any]]] = []

    def factory(url: ckptio.URL, **options: Any) -> ckptio.Backend:
        seen.append((url, options))
        return LocalBackend(url, **options)

    ckptio.register_backend("reltest", factory)
    cleanup_registrations.append(("backend", "reltest"))
    monkeypatch.chdir(tmp_path)  # the backend's paths are relative: "run/ck" under the cwd
    ckptio.save({"x": torch.ones(3)}, "reltest://run/ck", storage_options={"fsync": False})
    assert (tmp_path / "run" / "ck" / "manifest.json").is_file()
    out = {"x": torch.zeros(3)}
    ckptio.load(out, "reltest://run/ck", storage_options={"fsync": False})
    assert torch.equal(out["x"], torch.ones(3))
    assert seen[0][0] == ckptio.URL(scheme="reltest", path="run/ck")
    assert seen[0][1] == {"fsync": False}


class _RenamedNative(NativeFormat):
    name = "native2"


def test_runtime_format(tmp_path: Path, cleanup_registrations: list[tuple[str, str]]) -> None:
    ckptio.register_format("native2", _RenamedNative)
    cleanup_registrations.append(("format", "native2"))
    ckptio.save({"x": torch.arange(5)}, f"native2+file://{tmp_path}/ck")
    assert ckptio.manifest(str(tmp_path / "ck")).format == "native2"
    out = {"x": torch.zeros(5, dtype=torch.int64)}
    ckptio.load(out, str(tmp_path / "ck"))  # the manifest names the format; no prefix needed
    assert out["x"].tolist() == [0, 1, 2, 3, 4]


class _Stamp:
    """An addon that writes an artifact before the commit."""

    def __init__(self, text: str = "hello") -> None:
        self.text = text

    def on_tensors_written(self, ctx: ckptio.AddonContext) -> None:
        if ctx.is_coordinator:
            ctx.write_bytes("stamp.txt", self.text.encode())


def test_runtime_addon_and_plugin_object(
    tmp_path: Path, cleanup_registrations: list[tuple[str, str]]
) -> None:
    ckptio.register_addon("stamp", _Stamp)
    cleanup_registrations.append(("addon", "stamp"))
    ckptio.save({"x": torch.ones(1)}, str(tmp_path / "a"), addons=[("stamp", {"text": "via name"})])
    assert (tmp_path / "a" / "stamp.txt").read_text() == "via name"
    m = ckptio.manifest(str(tmp_path / "a"))
    assert m.files["stamp.txt"]["size"] == len("via name") and "stamp" in m.addons
    ckptio.verify(str(tmp_path / "a"))

    class Plugin:
        @ckptio.hookimpl
        def register_addons(self, register: Any) -> None:
            register("stamp2", _Stamp)

    ckptio.register_plugin(Plugin(), "test-plugin-object")
    cleanup_registrations.append(("addon", "stamp2"))
    assert "stamp2" in {p.name: p for p in ckptio.list_plugins()}["test-plugin-object"].addons
    ckptio.save({"x": torch.ones(1)}, str(tmp_path / "b"), addons=["stamp2"])
    assert (tmp_path / "b" / "stamp.txt").read_text() == "hello"


def test_runtime_plugin_whose_hook_raises_is_a_plugin_error() -> None:
    class Broken:
        @ckptio.hookimpl
        def register_backends(self, register: Any) -> None:
            raise RuntimeError("boom")

    with pytest.raises(ckptio.PluginError, match="'broken-runtime'.*boom"):
        ckptio.register_plugin(Broken(), "broken-runtime")


def test_lazy_target_that_fails_to_import(cleanup_registrations: list[tuple[str, str]]) -> None:
    ckptio.register_backend("lazyfail", "ckptio_no_such_module_abc:Backend")
    cleanup_registrations.append(("backend", "lazyfail"))
    with pytest.raises(ckptio.PluginError, match="failed to import 'ckptio_no_such_module_abc:Backend'"):
        ckptio.save({}, "lazyfail://b/x")
