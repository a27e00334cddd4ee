"""Peer replication (``TieredCheckpointManager(..., peer_replication=True)``) on two real ranks
(gloo), each rank a "node" with a local directory of its own.

Each node's files of every step are copied to the other node's ``<local>/peers/``; after node 1
loses its local disk, and with the durable tier gone (its directory deleted, reads refused), the
run resumes from node 0's copy of node 1's files. A damaged peer copy is rejected on receipt and
the replaced node reads from the durable tier instead.

Along the way, the local tiers hold what interrupted or foreign work leaves: stray names under
``peers/`` (ignored, never a crash or a hang), copies without a manifest (cleaned, then replicated
or restored again), and a file where one node's copy should go (that copy fails alone, the others
go on). A path to one of the run's own steps loads it as a step of the run.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from ckptio.errors import OptionError
from ckptio.tiered import TieredCheckpointManager

from tests.e2e._ranks import run_ranks

pytestmark = [pytest.mark.multirank]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _refuse_durable_reads(mgr: Any, reads: list[str]) -> None:
    """The durable tier is unreachable: every read of it is recorded and fails."""
    backend = mgr._durable.backend

    def refuse(name: str) -> Any:
        def fn(path: str, *args: Any, **kwargs: Any) -> Any:
            reads.append(f"{name} {path}")
            raise OSError(f"the durable tier is unreachable ({path})")

        return fn

    for name in ("open_read", "read_bytes", "read_into"):
        setattr(backend, name, refuse(name))


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


def _body(rank: int, world: int, base: str) -> dict[str, Any]:
    import torch.distributed as dist
    from ckptio.retention import KeepLatest

    from tests.tiered._states import check_state, make_state

    logging.basicConfig(level=logging.WARNING)
    records = _Records()
    logging.getLogger("ckptio").addHandler(records)
    local, durable = Path(base) / f"node{rank}", Path(base) / "durable"
    opts: dict[str, Any] = {"local": str(local), "peer_replication": True, "local_retention": KeepLatest(2)}
    out: dict[str, Any] = {}

    def barrier_then(fn: Any) -> None:
        dist.barrier()
        fn()
        dist.barrier()

    with TieredCheckpointManager(str(durable), async_save=True, **opts) as mgr:
        for step in (1, 2, 3):
            assert mgr.save(step, make_state(step, rank, world)) is None
        mgr.wait(durable=True)
    # node r keeps node 1-r's files of the steps it keeps itself (local retention: the last 2)
    peers = local / "peers" / f"node_{1 - rank:05d}"
    out["peer_steps"] = sorted(p.name for p in peers.iterdir())
    out["peer_files"] = _tree(peers / "step_00000003")
    out["own_files"] = _tree(local / "step_00000003")

    # 1. node 1 is replaced, and node 0's copy of node 1's files is damaged: node 1 reads from durable
    def damage() -> None:
        if rank == 1:
            shutil.rmtree(local)
        else:
            f = max((peers / "step_00000003").glob("*.bin"), key=lambda p: p.stat().st_size)
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
        # names that are no copy of the run's: left alone, never a crash (int("²") raises)
        for stray in (peers / "step_²", local / "peers" / "node_000001" / "step_00000004", peers / "step_4"):
            stray.mkdir(parents=True)
            (stray / "x.bin").write_bytes(b"x")
        # copies a kill cut short (a deletion, manifest first): cleaned by retention, or by the
        # replication of that step
        for s in (1, 4) if rank == 1 else (1,):
            (peers / f"step_{s:08d}").mkdir(parents=True, exist_ok=True)
            (peers / f"step_{s:08d}" / "partial.bin").write_bytes(b"partial")
        if rank == 0:  # where node 0 keeps node 1's copy of step 4, a file: that copy alone fails
            (peers / "step_00000004").write_bytes(b"not a directory")

    barrier_then(damage)
    records.messages.clear()
    with TieredCheckpointManager(str(durable), **opts) as mgr:
        state = make_state(0, rank, world, empty=True)
        result = mgr.load(state)
        out["damaged"] = (result.step, dict(result.tier_bytes), check_state(state, 3, rank))
        out["damaged_warnings"] = [m for m in records.messages if "peer copy" in m]
        # the copy node 1 keeps of node 0's files was sent again, damage elsewhere notwithstanding
        out["kept_again"] = (
            local / "peers" / f"node_{1 - rank:05d}" / "step_00000003" / "manifest.json"
        ).exists()
        # the run goes on: steps 4 and 5 are committed and replicated (step 4 to node 1 only)
        records.messages.clear()
        mgr.save(4, make_state(4, rank, world))
        mgr.save(5, make_state(5, rank, world))
        mgr.wait(durable=True)
        out["save_warnings"] = list(records.messages)
        out["copies"] = {
            s: (
                (peers / f"step_{s:08d}" / "manifest.json").exists(),
                (peers / f"step_{s:08d}" / "partial.bin").exists(),
            )
            for s in (1, 4, 5)
        }
        out["strays"] = sorted(p.name for p in peers.iterdir())
        out["file_left"] = (peers / "step_00000004").is_file()
        # the run's own step by its path, on the local and the durable tier: a step of the run
        state = make_state(0, rank, world, empty=True)
        by_path = mgr.load(state, str(local / "step_00000005"))
        out["by_local_path"] = (by_path.step, type(by_path).__name__, check_state(state, 5, rank))
        state = make_state(0, rank, world, empty=True)
        by_path = mgr.load(state, str(durable / "step_00000004"))
        out["by_durable_path"] = (by_path.step, type(by_path).__name__, check_state(state, 4, rank))

    # 2. node 1 is replaced again, and the durable tier is gone: node 1 restores from its peer
    def lose() -> None:
        if rank == 1:
            shutil.rmtree(local)
            # what a deletion cut short left of its own copy: cleaned, then restored
            (local / "step_00000005").mkdir(parents=True)
            (local / "step_00000005" / "partial.bin").write_bytes(b"partial")
        else:
            shutil.rmtree(durable)

    barrier_then(lose)
    reads: list[str] = []
    records.messages.clear()
    with TieredCheckpointManager(str(durable), **opts) as mgr:
        _refuse_durable_reads(mgr, reads)
        state = make_state(0, rank, world, empty=True)
        result = mgr.load(state)
        out["restored"] = (result.step, dict(result.tier_bytes), check_state(state, 5, rank))
        out["locations"] = mgr.step_locations()
    out["durable_reads"] = reads
    out["partial_left"] = (local / "step_00000005" / "partial.bin").exists()

    # 3. both nodes lose the copies they keep for each other, and node 0 cannot take its own back
    # (a file where it goes): node 1's is restored all the same
    def lose_peers() -> None:
        shutil.rmtree(local / "peers")
        if rank == 0:
            peers.mkdir(parents=True)
            (peers / "step_00000005").write_bytes(b"not a directory")

    barrier_then(lose_peers)
    records.messages.clear()
    with TieredCheckpointManager(str(durable), **opts) as mgr:
        state = make_state(0, rank, world, empty=True)
        result = mgr.load(state)
        out["peers_lost"] = (result.step, check_state(state, 5, rank))
    out["restore_warnings"] = list(records.messages)
    out["kept_once_more"] = (peers / "step_00000005" / "manifest.json").exists()
    return out


def test_peer_replication_restores_a_lost_node_without_the_durable_tier(tmp_path: Path) -> None:
    results = run_ranks(_body, 2, args=(str(tmp_path),), timeout=240)
    for rank, out in enumerate(results):
        # retention removed the peer copy of step 1 with the local one
        assert out["peer_steps"] == ["step_00000002", "step_00000003"], rank
        other = results[1 - rank]["own_files"]
        assert out["peer_files"] == other and "manifest.json" in other, rank
        step, tiers, problem = out["damaged"]
        assert (step, problem) == (3, None), rank
        if rank == 1:  # the damaged peer copy was refused: its bytes came from the durable tier
            assert tiers["durable"] > 0, tiers
            assert any("damaged" in m for m in out["damaged_warnings"]), out["damaged_warnings"]
            assert out["kept_again"]
        # the cut-short copies were cleaned: step 1's by retention, step 4's by its replication;
        # node 0 could not keep node 1's copy of step 4 (a file there), node 1 kept node 0's all the same
        assert out["copies"] == {1: (False, False), 4: (rank == 1, False), 5: (True, False)}, (
            rank,
            out["copies"],
        )
        assert {"step_4", "step_²"} <= set(out["strays"]), out["strays"]  # not ours: left alone
        failed = [m for m in out["save_warnings"] if "peer replication failed" in m]
        if rank == 0:
            assert len(failed) == 1 and "step 4" in failed[0] and "node 1 -> node 0" in failed[0], failed
            assert "node 0 -> node 1" not in failed[0], failed
        assert not any("retention" in m for m in out["save_warnings"]), out["save_warnings"]
        assert out["file_left"] == (rank == 0), rank
        assert out["by_local_path"] == (5, "TieredLoadResult", None), out["by_local_path"]
        assert out["by_durable_path"] == (4, "TieredLoadResult", None), out["by_durable_path"]
        step, tiers, problem = out["restored"]
        assert (step, problem) == (5, None), rank
        assert tiers["durable"] == 0 and tiers["local"] > 0, (rank, tiers)
        assert out["durable_reads"] == [], rank
        assert out["locations"][5] == {"local"}, out["locations"]
        assert not out["partial_left"], rank
        assert out["peers_lost"] == (5, None), rank
        assert out["kept_once_more"] == (rank == 1), rank
        if rank == 0:  # the copy node 0 keeps could not be restored; node 1's was
            failed = [m for m in out["restore_warnings"] if "restoring from the peer copies failed" in m]
            assert len(failed) == 1 and "the copy node 0 keeps" in failed[0], out["restore_warnings"]
            assert "node 1 keeps" not in failed[0], failed


def test_peer_replication_option(tmp_path: Path) -> None:
    with pytest.raises(OptionError):
        TieredCheckpointManager(str(tmp_path / "d"), local=str(tmp_path / "l"), peer_replicaton=True)
    with pytest.raises(ValueError):
        TieredCheckpointManager(str(tmp_path / "d"), local=str(tmp_path / "l"), peer_replication=1)  # type: ignore[arg-type]
    # one process, one node: nothing to replicate to, and nothing else changes
    from tests.tiered._states import check_state, make_state

    with TieredCheckpointManager(
        str(tmp_path / "d"), local=str(tmp_path / "l"), peer_replication=True
    ) as mgr:
        mgr.save(1, make_state(1, 0, 1))
        mgr.wait(durable=True)
        state = make_state(0, 0, 1, empty=True)
        assert mgr.load(state).source == "local" and check_state(state, 1, 0) is None
    assert not (tmp_path / "l" / "peers").exists()

    # one node still prunes what it keeps under peers/ (copies left by an earlier layout): a copy a
    # kill cut short (no manifest) goes, whatever its step; names that are no copy stay
    peers = tmp_path / "l" / "peers" / "node_00001"
    for name, files in {
        "step_00000001": ["partial.bin"],  # step 1 is kept locally: its copy without a manifest goes
        "step_00000009": ["a.bin", "manifest.json"],  # a committed copy of a step not kept: goes
        "step_²": ["x.bin"],
        "step_9": ["x.bin"],
    }.items():
        (peers / name).mkdir(parents=True)
        for f in files:
            (peers / name / f).write_bytes(b"{}")
    (tmp_path / "l" / "peers" / "node_000001").mkdir()
    with TieredCheckpointManager(
        str(tmp_path / "d"), local=str(tmp_path / "l"), peer_replication=True
    ) as mgr:
        mgr.save(2, make_state(2, 0, 1))
        mgr.wait(durable=True)
        # the run's own steps by their paths, on either tier: steps of the run (not foreign loads)
        for path, step in ((tmp_path / "d" / "step_00000001", 1), (tmp_path / "l" / "step_00000002", 2)):
            state = make_state(0, 0, 1, empty=True)
            result = mgr.load(state, str(path))
            assert (result.step, type(result).__name__, check_state(state, step, 0)) == (
                step,
                "TieredLoadResult",
                None,
            ), path
    assert sorted(p.name for p in peers.iterdir()) == ["step_9", "step_²"]
    assert (tmp_path / "l" / "peers" / "node_000001").exists()


def test_peer_names() -> None:
    """Only canonical names are copies of the run's (``int("²")`` raises; ``node_000001`` is no one's)."""
    from ckptio import peer
    from ckptio.manager import parse_step_dir

    assert peer.parse_node_dir("node_00001") == 1 and peer.parse_node_dir("node_123456789") == 123456789
    for name in ("node_000001", "node_1", "node_0000²", "node_00001 ", "node_-0001"):
        assert peer.parse_node_dir(name) is None, name
    assert parse_step_dir("step_00000003") == 3
    for name in ("step_3", "step_²", "step_000000003", "step_0000000٣", "step_00000003.tmp"):
        assert parse_step_dir(name) is None, name
    for name in ("a.bin", "sub/a.bin", ".metadata"):
        assert peer.safe_name(name), name
    for name in ("", "../a.bin", "sub/../../a.bin", "/etc/a.bin", "a//b", "./a", "a\\b", "a\x00b"):
        assert not peer.safe_name(name), name


def test_peer_receive_refuses_escaping_names(tmp_path: Path) -> None:
    """``_recv_all`` checks names again (defence in depth): nothing lands outside its directory."""
    import xxhash
    from ckptio.manager import CheckpointManager
    from ckptio.peer import Transfer, _recv_all

    (tmp_path / "in").mkdir()
    empty = xxhash.xxh3_64(b"").hexdigest()  # empty files: nothing to receive over the group
    with CheckpointManager(str(tmp_path / "root")) as mgr:
        backend = mgr.backend
        bad = [
            Transfer(name, 0, empty, 0, 0, "", 7) for name in ("../escaped.bin", str(tmp_path / "abs.bin"))
        ]
        errors = _recv_all(backend, bad, {7: str(tmp_path / "in")}, None)
        assert 7 in errors and "refusing to receive" in str(errors[7])
        fine = [Transfer("sub/fine.bin", 0, empty, 0, 0, "", 7)]
        assert _recv_all(backend, fine, {7: str(tmp_path / "in")}, None) == {}
    assert not (tmp_path / "escaped.bin").exists() and not (tmp_path / "abs.bin").exists()
    assert (tmp_path / "in" / "sub" / "fine.bin").exists()


def test_peer_copies_follow_retention_while_local_deletions_lag(tmp_path: Path) -> None:
    """Local retention deletes in the background: a step it dropped is still listed until its
    thread gets there. The peer copies of that step go at once all the same (the CI failure of
    stop 19: a slow deleter left node 0's copy of step 1 behind), and retention applied twice
    meanwhile queues the step once."""
    import threading

    from ckptio.retention import KeepLatest

    from tests.tiered._states import make_state

    peers = tmp_path / "l" / "peers" / "node_00001"
    release = threading.Event()
    queued: list[str] = []
    with TieredCheckpointManager(
        str(tmp_path / "d"), local=str(tmp_path / "l"), peer_replication=True, local_retention=KeepLatest(2)
    ) as mgr:
        local = mgr._local
        delete = local._delete_path

        def slow_delete(path: str) -> None:
            queued.append(path)
            release.wait(30)
            delete(path)

        local._delete_path = slow_delete  # type: ignore[method-assign]
        for step in (1, 2, 3):
            if step == 3:  # committed copies this node keeps of node 1's files of steps 1 to 3
                for s in (1, 2, 3):
                    (peers / f"step_{s:08d}").mkdir(parents=True)
                    (peers / f"step_{s:08d}" / "manifest.json").write_bytes(b"{}")
            mgr.save(step, make_state(step, 0, 1))
            mgr.wait(durable=True)
        assert (tmp_path / "l" / "step_00000001" / "manifest.json").exists()  # still being deleted
        assert sorted(p.name for p in peers.iterdir()) == ["step_00000002", "step_00000003"]
        mgr._retain(local, "local")  # again, with step 1's deletion still pending
        release.set()
    assert [Path(p).name for p in queued] == ["step_00000001"]
    assert not (tmp_path / "l" / "step_00000001").exists()
