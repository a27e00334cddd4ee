"""Checkpoints built to run code when unpickled must load as an error and run nothing.

Each payload, if unpickled, would create a marker file (``builtins.open(marker, "w")`` through
``__reduce__``). The tests plant it where a pickle-based loader would read it: as the bytes of a
non-tensor value of a native checkpoint (properly listed and checksummed in a re-signed manifest,
so only the refusal to unpickle stops it), as a ``torch.save`` zip archive, and as the pickled
``.metadata`` of a DCP checkpoint. The marker must not exist afterwards, and the error must be a
ckptio error.
"""

from __future__ import annotations

import builtins
import io
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import ckptio
import pytest
import torch
import torch.distributed.checkpoint as dcp
import xxhash

from ._ckpt import empty_like_state, make_checkpoint, read_manifest_json, write_signed_manifest


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (self.marker, "w"))


def payloads(marker: Path) -> dict[str, bytes]:
    evil = _Evil(marker)
    zipped = io.BytesIO()
    torch.save({"x": evil}, zipped)  # a torch.save archive holding the same reduce payload
    assert zipfile.is_zipfile(io.BytesIO(zipped.getvalue()))
    return {
        "pickle-protocol-5": pickle.dumps(evil, protocol=5),
        "pickle-protocol-2": pickle.dumps(evil, protocol=2),
        "pickle-protocol-0": pickle.dumps(evil, protocol=0),
        "torch-save-zip": zipped.getvalue(),
    }


def plant_value(ckpt: Path, fqn: str, payload: bytes) -> None:
    """Point the stored bytes of non-tensor value ``fqn`` at ``payload`` in a new, listed file."""
    (ckpt / "evil.bin").write_bytes(payload)
    body = read_manifest_json(ckpt)
    body["files"]["evil.bin"] = {"size": len(payload)}
    for entry in body["format_metadata"]["storage"]:
        if entry["fqn"] == fqn:
            entry.update(file="evil.bin", pos=0, length=len(payload), xxh3=xxhash.xxh3_64_hexdigest(payload))
    write_signed_manifest(ckpt, body)


@pytest.mark.parametrize(
    "kind", ["pickle-protocol-5", "pickle-protocol-2", "pickle-protocol-0", "torch-save-zip"]
)
def test_pickled_value_is_refused_and_runs_nothing(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    ckpt = make_checkpoint(tmp_path / "ckpt")
    plant_value(ckpt, "step", payloads(marker)[kind])
    with pytest.raises(ckptio.CorruptCheckpointError) as info:
        ckptio.load(empty_like_state(), str(ckpt))
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert "step" in str(info.value)
    if kind != "pickle-protocol-0":  # binary pickles and zip archives are recognised as such
        assert isinstance(info.value, ckptio.UnsafeCheckpointError), info.value
    # the integrity check passes (the bytes are as listed), yet nothing is unpickled there either
    ckptio.verify(str(ckpt))
    assert not marker.exists()


def test_dcp_metadata_pickle_is_never_read(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(4)}, checkpoint_id=str(ckpt), no_dist=True)
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(ckptio.CheckpointError):
        ckptio.load({"w": torch.zeros(4)}, str(ckpt))
    with pytest.raises(ckptio.CheckpointError):
        ckptio.verify(str(ckpt))
    with pytest.raises(ckptio.CheckpointError):
        ckptio.manifest(str(ckpt))
    with ckptio.CheckpointManager(str(tmp_path)) as mgr:
        assert mgr.steps() == []
    assert not marker.exists(), "a DCP .metadata pickle was unpickled"


def test_pickled_manifest_is_not_json(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = make_checkpoint(tmp_path / "ckpt")
    (ckpt / "manifest.json").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(ckptio.CorruptCheckpointError):
        ckptio.load(empty_like_state(), str(ckpt))
    assert not marker.exists()
