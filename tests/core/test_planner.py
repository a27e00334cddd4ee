"""ckptio's load planner makes the plan DCP would make, faster, and hands DCP one key."""

from __future__ import annotations

import ckptio
import torch
from ckptio.planner import WRAPPED, SafeLoadPlanner, _whole_reads
from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)


def _whole(t: torch.Tensor) -> TensorStorageMetadata:
    return TensorStorageMetadata(
        properties=TensorProperties(dtype=t.dtype),
        size=t.size(),
        chunks=[ChunkStorageMetadata(offsets=torch.Size([0] * t.dim()), sizes=t.size())],
    )


def _state_and_metadata() -> tuple[dict, dict]:
    state = {
        "w": torch.zeros(4, 3),
        "p": torch.nn.Parameter(torch.zeros(5)),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 3),
        "chunked": torch.zeros(6, 2),
        "value": 7,
    }
    stored = {k: _whole(v) for k, v in state.items() if isinstance(v, torch.Tensor)}
    stored["chunked"] = TensorStorageMetadata(
        properties=TensorProperties(dtype=torch.float32),
        size=torch.Size([6, 2]),
        chunks=[
            ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([4, 2])),
            ChunkStorageMetadata(offsets=torch.Size([4, 0]), sizes=torch.Size([2, 2])),
        ],
    )
    stored["value"] = BytesStorageMetadata()
    return state, stored


def test_fast_plan_is_the_plan_dcp_makes() -> None:
    state, stored = _state_and_metadata()
    ours = _whole_reads(state, stored)
    theirs = create_default_local_load_plan(state, Metadata(state_dict_metadata=stored), True).items
    key = lambda r: (r.dest_index.fqn, tuple(r.storage_offsets), tuple(r.dest_offsets))  # noqa: E731
    assert sorted(ours, key=key) == sorted(theirs, key=key)
    assert not [r for r in ours if r.dest_index.fqn == "empty"]  # DCP reads nothing for it


def test_planner_unwraps_the_single_key_ckptio_hands_dcp() -> None:
    state, stored = _state_and_metadata()
    planner = SafeLoadPlanner()
    planner.set_up_planner({WRAPPED: state}, Metadata(state_dict_metadata=stored), True)
    assert set(planner.state_dict) == set(state)
    assert planner.original_state_dict is state
    fqns = {r.dest_index.fqn for r in planner.create_local_plan().items}
    assert fqns == {"w", "p", "scalar", "chunked", "value"}


def test_round_trip_of_empty_scalar_and_parameter_tensors(tmp_path) -> None:
    state = {
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "p": torch.nn.Parameter(torch.arange(4.0)),
        "nested": {"w": torch.ones(2, 2), "step": 7},
    }
    ckptio.save(state, tmp_path / "ck")
    dest = {
        "scalar": torch.tensor(0.0),
        "empty": torch.zeros(0, 3),
        "p": torch.nn.Parameter(torch.zeros(4)),
        "nested": {"w": torch.zeros(2, 2), "step": 0},
    }
    ckptio.load(dest, tmp_path / "ck")
    assert dest["scalar"].item() == 2.5
    assert torch.equal(dest["p"].detach(), torch.arange(4.0))
    assert torch.equal(dest["nested"]["w"], torch.ones(2, 2))
    assert dest["nested"]["step"] == 7
