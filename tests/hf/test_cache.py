"""``hf-cache://org/name``: repo ids resolved offline from a Hugging Face cache the test builds in
huggingface_hub's layout (refs, snapshots of relative symlinks, blobs), and snapshot paths."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import ckptio
import pytest
import torch
from ckptio_safetensors import resolve_snapshot

from ._models import build, logits, reference, save_hf

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"


def _add_snapshot(repo: Path, commit: str, src: Path) -> Path:
    """Put the files of ``src`` in ``repo`` as huggingface_hub does: bytes in blobs/<sha256>,
    relative links from snapshots/<commit>/<name>."""
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.join("..", "..", "blobs", digest))
    return snap


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    src = save_hf("llama", root / "src", seed=0)
    old = save_hf("llama", root / "src_old", seed=1)
    hub = root / "hub"
    repo = hub / "models--tiny-org--tiny-llama"
    _add_snapshot(repo, COMMIT, src)
    _add_snapshot(repo, OLD, old)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v0").write_text(OLD + "\n")
    return hub


def test_layout_is_the_one_huggingface_hub_reads(cache: Path) -> None:
    from huggingface_hub import snapshot_download

    got = snapshot_download("tiny-org/tiny-llama", cache_dir=str(cache), local_files_only=True)
    assert Path(got) == cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    assert Path(resolve_snapshot("tiny-org/tiny-llama", cache=str(cache))[1]) == Path(got).resolve()


def test_repo_id_resolves_offline_from_the_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    ref = reference(snap)
    model = build("llama", seed=9)
    ckptio.load(
        {"model": ckptio.ModelState(model)},
        "hf-cache://tiny-org/tiny-llama",
        storage_options={"cache_dir": str(cache)},
    )
    assert torch.equal(logits(model, 256), logits(ref, 256))
    # from the environment, as huggingface_hub finds it; revisions by ref name or commit
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    old_ref = reference(cache / "models--tiny-org--tiny-llama" / "snapshots" / OLD)
    for url in ("hf-cache://tiny-org/tiny-llama@v0", f"hf-cache://tiny-org/tiny-llama@{OLD}"):
        ckptio.load({"model": ckptio.ModelState(model)}, url)
        assert torch.equal(logits(model, 256), logits(old_ref, 256))
    ckptio.load({"model": ckptio.ModelState(model)}, "hf-cache://tiny-org/tiny-llama@main")
    assert torch.equal(logits(model, 256), logits(ref, 256))
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    ckptio.load({"model": ckptio.ModelState(model)}, "hf-cache://tiny-org/tiny-llama")


def test_snapshot_path_follows_its_blob_links_only(cache: Path) -> None:
    snap = cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    assert (snap / "model.safetensors").is_symlink()
    model = build("llama", meta=True)
    ckptio.load({"model": ckptio.ModelState(model)}, str(snap))
    assert torch.equal(model.model.norm.weight, reference(snap).model.norm.weight)


def test_missing_repo_or_revision_says_offline_and_where(cache: Path) -> None:
    model = build("llama")
    opts = {"cache_dir": str(cache)}
    with pytest.raises(ckptio.CheckpointNotFoundError) as exc:
        ckptio.load({"model": ckptio.ModelState(model)}, "hf-cache://someone/else", storage_options=opts)
    msg = str(exc.value)
    assert "offline" in msg and "never downloads" in msg and str(cache / "models--someone--else") in msg
    with pytest.raises(ckptio.CheckpointNotFoundError, match="revision 'v9'"):
        ckptio.load(
            {"model": ckptio.ModelState(model)}, "hf-cache://tiny-org/tiny-llama@v9", storage_options=opts
        )
    with pytest.raises(ckptio.CheckpointError, match="repo id"):
        ckptio.load({"model": ckptio.ModelState(model)}, "hf-cache://a/b/c", storage_options=opts)
    with pytest.raises(ckptio.OptionError, match="cache_dir"):
        ckptio.load(
            {"model": ckptio.ModelState(model)},
            "hf-cache://tiny-org/tiny-llama",
            storage_options={"cach_dir": 1},
        )


@pytest.mark.parametrize("target", ["outside", "absolute", "other_repo"])
def test_links_that_leave_the_repository_blobs_are_refused(tmp_path: Path, target: str) -> None:
    src = save_hf("llama", tmp_path / "src")
    hub = tmp_path / "hub"
    repo = hub / "models--evil--repo"
    snap = _add_snapshot(repo, COMMIT, src)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    secret = tmp_path / "secret.safetensors"
    shutil.copyfile(src / "model.safetensors", secret)
    other = hub / "models--other--repo" / "blobs"
    other.mkdir(parents=True)
    shutil.copyfile(src / "model.safetensors", other / "abc")
    link = snap / "model.safetensors"
    link.unlink()
    link.symlink_to(
        {
            "outside": os.path.join("..", "..", "..", "..", "secret.safetensors"),
            "absolute": str(secret),
            "other_repo": os.path.join("..", "..", "..", "models--other--repo", "blobs", "abc"),
        }[target]
    )
    model = build("llama")
    for url, opts in (("hf-cache://evil/repo", {"cache_dir": str(hub)}), (str(snap), None)):
        with pytest.raises(ckptio.UnsafeCheckpointError, match="blobs"):
            ckptio.load({"model": ckptio.ModelState(model)}, url, storage_options=opts)


def test_links_elsewhere_are_still_refused(tmp_path: Path) -> None:
    """Outside a hub snapshot the local backend's rule is unchanged: no link is followed."""
    src = save_hf("llama", tmp_path / "src")
    d = tmp_path / "plain"
    d.mkdir()
    (d / "model.safetensors").symlink_to(src / "model.safetensors")
    with pytest.raises(ckptio.UnsafeCheckpointError):
        ckptio.load({"model": ckptio.ModelState(build("llama"))}, str(d))
