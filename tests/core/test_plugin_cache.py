"""The plugin discovery cache: later processes replay what the first one found, without scanning
every distribution's metadata or importing a plugin, and stay right when distributions are
installed or removed, or a plugin's source is edited, between runs.

Each run is a fresh interpreter with its own cache directory (``CKPTIO_PLUGIN_CACHE``) and a
temporary site directory on ``PYTHONPATH``, the way ``pip install`` leaves a ``*.dist-info``.
Files are backdated: the cache refuses to trust anything changed in the last two seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from ckptio import plugins

_PROBE = """
import json, sys, tempfile, warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import ckptio
    from ckptio import plugins
    d = tempfile.mkdtemp()
    ckptio.save({"w": torch.arange(4.0)}, d + "/ck")
    imported = sorted(m for m in sys.modules if m.endswith(".plugin") or m == "fsspec")
    try:
        ckptio.save({}, "nosuch://bucket/x")
        unknown = None
    except ckptio.BackendNotFoundError as exc:
        unknown = str(exc)
    infos = {p.name: p.as_dict() for p in ckptio.list_plugins()}
print(json.dumps({
    "imported_by_save": imported,
    "unknown": unknown,
    "infos": infos,
    "schemes": sorted(plugins._registry.entries["backend"]),
    "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
}))
"""


def _run(cache: Path | str, site: Path, code: str = _PROBE, **env: str) -> dict[str, Any]:
    full_env = {k: v for k, v in os.environ.items() if k not in (plugins.ALLOW_ENV, plugins.CACHE_ENV)}
    full_env[plugins.CACHE_ENV] = str(cache)
    full_env["PYTHONPATH"] = os.pathsep.join([str(site), full_env.get("PYTHONPATH", "")])
    full_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def _backdate(*paths: Path, seconds: float = 60.0) -> None:
    when = time.time() - seconds
    for path in paths:
        os.utime(path, (when, when))


def _install(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text("[ckptio]\n" + lines)
    for name, text in modules.items():
        (site / f"{name}.py").write_text(text)
    _backdate(*info.iterdir(), info, *(site / f"{n}.py" for n in modules), site)


def _plugin_source(scheme: str) -> str:
    return (
        "from ckptio import hookimpl\n\n"
        "@hookimpl\n"
        "def register_backends(register):\n"
        f"    register({scheme!r}, 'ckptio_local.backend:LocalBackend')\n"
    )


@pytest.fixture
def site(tmp_path: Path) -> Path:
    path = tmp_path / "site"
    path.mkdir()
    _backdate(path)
    return path


def test_second_process_replays_without_importing_plugins(tmp_path: Path, site: Path) -> None:
    cache = tmp_path / "cache"
    first = _run(cache, site)
    assert len(list(cache.glob("plugins-*.json"))) == 1
    second = _run(cache, site)
    # the first run imports every plugin; the second, none (fsspec's catch-all schemes included)
    assert "ckptio_fsspec.plugin" in first["imported_by_save"] and "fsspec" in first["imported_by_save"]
    assert second["imported_by_save"] == []
    assert second["infos"] == first["infos"] and second["schemes"] == first["schemes"]
    # an unknown scheme still names what is installed (after the full discovery it triggers)
    assert second["unknown"] == first["unknown"]
    assert "Installed: " in second["unknown"] and "file" in second["unknown"]
    assert (
        "msc" in second["infos"]["msc"]["backends"]
        and second["infos"]["local"]["distribution"] == "ckptio-local"
    )


def test_installed_and_removed_between_runs(tmp_path: Path, site: Path) -> None:
    cache = tmp_path / "cache"
    _run(cache, site)
    before = _run(cache, site)
    assert before["imported_by_save"] == [] and "cachedemo" not in before["infos"]

    _install(
        site,
        "ckptio_cachedemo",
        {"cachedemo": "ckptio_cachedemo_plugin"},
        {"ckptio_cachedemo_plugin": _plugin_source("cachedemo")},
    )
    installed = _run(cache, site)
    assert installed["infos"]["cachedemo"]["backends"] == ["cachedemo"]
    assert installed["infos"]["cachedemo"]["distribution"] == "ckptio-cachedemo"
    assert "cachedemo" in installed["schemes"]
    again = _run(cache, site)  # now from the cache
    assert again["imported_by_save"] == [] and "cachedemo" in again["schemes"]

    # the plugin's source edited in place (an editable install): nothing reinstalled
    module = site / "ckptio_cachedemo_plugin.py"
    module.write_text(_plugin_source("cachedemo2"))
    _backdate(module, seconds=30)
    edited = _run(cache, site)
    assert "cachedemo2" in edited["schemes"] and "cachedemo" not in edited["schemes"]

    # uninstalled: the dist-info is gone (pip removes it; the module may stay behind)
    for f in (site / "ckptio_cachedemo-1.0.dist-info").iterdir():
        f.unlink()
    (site / "ckptio_cachedemo-1.0.dist-info").rmdir()
    removed = _run(cache, site)
    assert "cachedemo" not in removed["infos"] and "cachedemo2" not in removed["schemes"]
    assert removed["infos"].keys() == before["infos"].keys()


def test_reinstall_with_new_entry_points_same_version(tmp_path: Path, site: Path) -> None:
    cache = tmp_path / "cache"
    modules = {"ckptio_cachedemo_a": _plugin_source("demoa"), "ckptio_cachedemo_b": _plugin_source("demob")}
    _install(site, "ckptio_cachedemo", {"demoa": "ckptio_cachedemo_a"}, modules)
    _run(cache, site)
    assert "demoa" in _run(cache, site)["schemes"]
    # pip reinstalls by removing the dist-info and writing a new one, same name and version
    info = site / "ckptio_cachedemo-1.0.dist-info"
    for f in info.iterdir():
        f.unlink()
    info.rmdir()
    _install(site, "ckptio_cachedemo", {"demob": "ckptio_cachedemo_b"}, {})
    _backdate(info, seconds=20)
    _backdate(site, seconds=10)
    after = _run(cache, site)
    assert "demob" in after["schemes"] and "demoa" not in after["schemes"]


def test_broken_plugin_warns_every_run_and_allow_list_applies(tmp_path: Path, site: Path) -> None:
    cache = tmp_path / "cache"
    _install(site, "ckptio_cachebroken", {"cachebroken": "ckptio_cachebroken_missing_module"}, {})
    first, second = _run(cache, site), _run(cache, site)
    for res in (first, second):
        assert "ModuleNotFoundError" in res["infos"]["cachebroken"]["error"]
        assert any("'cachebroken'" in w for w in res["warnings"])
    only_local = _run(cache, site, **{plugins.ALLOW_ENV: "local"})
    assert only_local["infos"]["cachebroken"]["skipped"] and not only_local["warnings"]
    assert only_local["infos"]["fsspec"]["skipped"] and not only_local["infos"]["native"]["skipped"]
    assert "s3" not in only_local["schemes"] and "file" in only_local["schemes"]


def test_cache_disabled_and_unwritable(tmp_path: Path, site: Path) -> None:
    off = _run("0", site)
    assert "ckptio_fsspec.plugin" in off["imported_by_save"]
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    res = _run(blocker / "cache", site)  # cannot be created: discovery works, nothing cached
    assert "ckptio_fsspec.plugin" in res["imported_by_save"] and res["unknown"]


def test_recent_changes_are_not_cached(tmp_path: Path, site: Path) -> None:
    """A distribution written this very second may be half installed: no cache file records it
    (a modification time in the future, as with clock skew on a shared file system, neither)."""
    cache = tmp_path / "cache"
    info = site / "ckptio_cachefresh-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ckptio-cachefresh\nVersion: 1.0\n")
    _backdate(info, seconds=-120)  # "now" once the interpreter has started
    _run(cache, site)
    assert not list(cache.glob("plugins-*.json"))


def test_old_cache_files_are_pruned(tmp_path: Path, site: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = [cache / f"plugins-stale{i:03d}.json" for i in range(plugins._CACHE_FILES + 5)]
    for f in stale:
        f.write_text("{}")
        _backdate(f, seconds=3600)
    _run(cache, site)
    left = list(cache.glob("plugins-*.json"))
    assert len(left) == plugins._CACHE_FILES
    assert any(not f.name.startswith("plugins-stale") for f in left)  # this interpreter's, kept
