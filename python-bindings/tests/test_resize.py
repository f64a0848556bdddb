"""A job that comes back at another world size (a node was isolated and no spare exists, or the
spare came back): by default a load refuses the step with what to do; with ``on_resize="replicas"``
each rank loads the shard of the saved data-parallel replica at its own tensor-/pipeline-parallel
position, embedded and through a real agent."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import ckptd

from .conftest import Agent

JOB = "resize"


def weights(rank: int) -> np.ndarray:
    """What saved rank `rank` holds. Every rank differs here, so that a load shows which saved
    rank it read; in a job that resumes this way the replicas hold the same state."""
    return np.arange(1000, dtype=np.float32) + 1000.0 * rank


def save_at(store: str, tmp: Path, world: int, step: int) -> None:
    """`world` ranks (threads, each its own embedded checkpointer and arena) save `step`."""

    def one(rank: int) -> None:
        with ckptd.Checkpointer(JOB, store=store, rank=rank, world_size=world, arena_dir=tmp / f"arena-{world}-{rank}") as ck:
            ck.save({"w": weights(rank)}, step).wait()

    threads = [threading.Thread(target=one, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_a_step_saved_by_four_ranks_is_refused_at_two_by_default(tmp_path: Path) -> None:
    store = (tmp_path / "store").as_uri()
    save_at(store, tmp_path, 4, 10)
    for rank, world in [(0, 2), (1, 2), (2, 3)]:
        with ckptd.Checkpointer(JOB, store=store, rank=rank, world_size=world, arena_dir=tmp_path / f"w{world}-{rank}") as ck:
            with pytest.raises(ckptd.StateMismatch, match=rf"saved by 4 ranks and this job runs {world}.*on-resize=replicas"):
                ck.load({"w": np.zeros(1000, dtype=np.float32)})
    with pytest.raises(ckptd.ConfigError, match="not a resize policy"):
        ckptd.Checkpointer(JOB, store=store, on_resize="shrink", arena_dir=tmp_path / "bad")


# Ranks are ordered tensor-parallel fastest, then data-parallel, then pipeline: with tp=2, pp=2
# the saved job of 8 (dp=2) has stage 1 at ranks 4-7, and a job of 4 (dp=1) loads 0, 1, 4, 5.
@pytest.mark.parametrize(
    ("saved", "now", "layout", "sources"),
    [(4, 2, "dp=4", [0, 1]), (2, 4, "dp=2", [0, 1, 0, 1]), (8, 4, "dp=2,tp=2,pp=2", [0, 1, 4, 5])],
)
def test_replicas_resume_at_another_data_parallel_size(
    tmp_path: Path, saved: int, now: int, layout: str, sources: list[int]
) -> None:
    store = (tmp_path / "store").as_uri()
    save_at(store, tmp_path, saved, 10)
    loaded: dict[int, np.ndarray] = {}

    def rank_of_the_new_job(rank: int) -> None:
        with ckptd.Checkpointer(
            JOB, store=store, rank=rank, world_size=now, arena_dir=tmp_path / f"l-{rank}", on_resize="replicas", parallel=layout
        ) as ck:
            state = {"w": np.zeros(1000, dtype=np.float32)}
            assert ck.load(state) == 10
            loaded[rank] = state["w"].copy()
            # Saving at the new size goes on from there, under this rank's own name.
            ck.save({"w": state["w"]}, 11).wait()

    threads = [threading.Thread(target=rank_of_the_new_job, args=(r,)) for r in range(now)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(loaded) == list(range(now)), "a rank of the new job failed (its traceback is above)"
    for rank in range(now):
        np.testing.assert_array_equal(loaded[rank], weights(sources[rank]), err_msg=f"rank {rank}")
    with ckptd.Checkpointer(JOB, store=store, rank=0, world_size=now, arena_dir=tmp_path / "check") as ck:
        state = {"w": np.zeros(1000, dtype=np.float32)}
        assert ck.load(state) == 11, "the step saved at the new size needs no policy"


def test_replicas_resume_through_the_agent(tmp_path: Path) -> None:
    agent = Agent(tmp_path, JOB, "--world-size", "2", "--on-resize", "replicas", "--parallel", "dp=2,tp=1")
    try:
        save_at(agent.store, tmp_path, 4, 10)
        for rank in range(2):
            with ckptd.Checkpointer(JOB, rank=rank, world_size=2, socket=agent.socket) as ck:
                state = {"w": np.zeros(1000, dtype=np.float32)}
                assert ck.load(state) == 10
                np.testing.assert_array_equal(state["w"], weights(rank))
    finally:
        agent.stop()
    # An agent that keeps the default refuses, saying what to do.
    (tmp_path / "second").mkdir()
    refusing = Agent(tmp_path / "second", JOB, "--world-size", "2")
    try:
        save_at(refusing.store, tmp_path / "second", 4, 10)
        with ckptd.Checkpointer(JOB, rank=0, world_size=2, socket=refusing.socket) as ck:
            with pytest.raises(ckptd.StateMismatch, match="saved by 4 ranks"):
                ck.load({"w": np.zeros(1000, dtype=np.float32)})
    finally:
        refusing.stop()


def test_a_memory_tier_of_another_pipeline_stage_is_not_served_after_a_resize(tmp_path: Path) -> None:
    # dp=2, pp=2 saved by 4 ranks whose arenas stay on this host (a crash keeps them); the job
    # comes back as dp=1, pp=2: rank 1 is pipeline stage 1 now, saved by rank 2, while the arena
    # of rank 1 still holds stage 0's state (old rank 1).
    store, arenas = (tmp_path / "store").as_uri(), tmp_path / "arenas"

    def one(rank: int) -> None:
        ck = ckptd.Checkpointer(JOB, store=store, rank=rank, world_size=4, arena_dir=arenas)
        ck.save({"w": weights(rank)}, 10).wait()
        ck.close(keep_arena=True)

    threads = [threading.Thread(target=one, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with ckptd.Checkpointer(JOB, store=store, rank=1, world_size=2, arena_dir=arenas, on_resize="replicas", parallel="dp=1,pp=2") as ck:
        state = {"w": np.zeros(1000, dtype=np.float32)}
        assert ck.load(state) == 10
        np.testing.assert_array_equal(state["w"], weights(2), err_msg="stage 1's state, saved by rank 2")
        assert ck.last_load_from_memory is False
    with ckptd.Checkpointer(JOB, store=store, rank=0, world_size=2, arena_dir=arenas, on_resize="replicas", parallel="dp=1,pp=2") as ck:
        state = {"w": np.zeros(1000, dtype=np.float32)}
        assert ck.load(state) == 10
        np.testing.assert_array_equal(state["w"], weights(0))
        assert ck.last_load_from_memory is True, "rank 0 restores its own shard: its memory tier serves"
