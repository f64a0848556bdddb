"""Four ranks in four processes save and commit through file:// and the loopback S3 server; a
rank SIGKILLed before writing its shard of step N leaves step N-1 as the latest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptd

from .conftest import Child, s3_store_url

WORLD = 4


def ranks(store: str, arena: Path, job: str, *extra: str, pause_rank: int = -1, pause_before: int = -1) -> list[Child]:
    children = []
    for r in range(WORLD):
        args = ["--store", store, "--arena", str(arena), "--job", job, "--rank", str(r), "--world", str(WORLD), *extra]
        if r == pause_rank:
            args += ["--pause-before", str(pause_before)]
        children.append(Child("rank_helper.py", *args))
    return children


def check_committed_job(store: str, arena: Path, job: str) -> None:
    children = ranks(store, arena, job, "--steps", "2")
    for r, child in enumerate(children):
        events = child.finish()
        assert events == [{"committed": 1}, {"committed": 2}, {"latest": 2}, {"loaded": 2, "ok": True}], f"rank {r}"
    # A reader that is none of the writers sees the committed step of every rank.
    for r in range(WORLD):
        with ckptd.Checkpointer(job, store=store, rank=r, world_size=WORLD, arena_dir=arena / "reader") as ck:
            assert ck.latest_step() == 2
            out = {"w": np.zeros(100_000, dtype=np.float32), "rank": -1, "step": -1}
            assert ck.load(out, step=1) == 1
            assert out["rank"] == r and (out["w"] == r * 1000 + 1).all()


def test_four_ranks_commit_through_a_file_store(tmp_path: Path) -> None:
    check_committed_job((tmp_path / "store").as_uri(), tmp_path / "arena", "multi")


@pytest.mark.s3
def test_four_ranks_commit_through_s3(tmp_path: Path) -> None:
    check_committed_job(s3_store_url(), tmp_path / "arena", "multi")


def check_killed_rank_leaves_previous_step(store: str, arena: Path, job: str) -> None:
    children = ranks(store, arena, job, "--steps", "2", "--commit-timeout", "2", pause_rank=3, pause_before=2)
    victim = children[3]
    victim.until(lambda e: "paused" in e)
    assert victim.events == [{"committed": 1}, {"paused": 2}]
    victim.kill()
    for r, child in enumerate(children[:3]):
        events = child.finish()
        assert events[0] == {"committed": 1}, f"rank {r}"
        assert events[1]["failed"] == 2, f"rank {r}: {events[1]}"
        assert "step 2" in events[1]["message"], events[1]
        assert events[2:4] == [{"latest": 1}, {"loaded": 1, "ok": True}], f"rank {r}"
    # rank 0 names the missing rank
    failure = children[0].events[1]
    assert "ranks [3]" in failure["message"], failure
    with ckptd.Checkpointer(job, store=store, rank=0, world_size=WORLD, arena_dir=arena / "reader") as ck:
        assert ck.latest_step() == 1


def test_rank_killed_before_its_shard_leaves_the_previous_step_latest(tmp_path: Path) -> None:
    check_killed_rank_leaves_previous_step((tmp_path / "store").as_uri(), tmp_path / "arena", "killed")


@pytest.mark.s3
def test_rank_killed_before_its_shard_leaves_the_previous_step_latest_on_s3(tmp_path: Path) -> None:
    check_killed_rank_leaves_previous_step(s3_store_url(), tmp_path / "arena", "killed")


def test_exactly_one_rank_writes_the_manifest_and_every_rank_reports_its_times(make_ck: Any) -> None:
    handles = [make_ck(rank=r, world_size=2).save({"w": np.full(50_000, r, dtype=np.float32)}, 1) for r in (1, 0)]
    for h in handles:
        h.wait()
    times = [h.timings() for h in handles]
    assert all(t is not None for t in times), times
    written = [t for t in times if t is not None and t.manifest_written_ns is not None]
    assert len(written) == 1, f"one rank commits, the other learns of it: {times}"
    for t in times:
        assert t is not None and 0 < t.shard_durable_ns <= t.committed_ns
