"""Host memory (issue 16): a load from storage goes straight into the caller's tensors without an
arena, one arena slot by default and the saves that wait for it counted, and the size hint that
creates the arena before the first save."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import ckptd

from .conftest import shard_file

MiB = 1 << 20


def state(seed: int, mib: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = mib * MiB // 4
    return {
        "w": rng.standard_normal(n // 2, dtype=np.float32),
        "b": rng.integers(0, 1 << 30, size=n // 4, dtype=np.int32),
        "tiny": np.arange(3, dtype=np.int64) + seed,
        "empty": np.zeros((0, 4), dtype=np.float32),
        "m": rng.standard_normal(n // 4, dtype=np.float32).reshape(64, -1),
    }


def zeros_like(s: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, 7) for k, v in s.items()}


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"


def arena_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file()) if directory.exists() else []


def test_a_load_from_storage_fills_the_tensors_without_an_arena(
    make_ck: Callable[..., ckptd.Checkpointer], tmp_path: Path
) -> None:
    saved = state(1)
    with make_ck() as writer:
        writer.save(saved, 3).wait()
    # A new process on another node: its arena directory is empty.
    fresh = tmp_path / "fresh-arena"
    reader = make_ck(arena_dir=fresh)
    assert reader.arena_ready is False
    into = zeros_like(saved)
    assert reader.load(into) == 3
    assert reader.last_load_from_memory is False
    assert_same(into, saved)
    # The bytes went straight into `into`: no arena (no second copy of the state in host memory).
    assert arena_files(fresh) == [], f"the load created {arena_files(fresh)}"
    # The next save creates the arena, and the memory tier serves the load after it.
    reader.save(into, 4).wait()
    assert len(arena_files(fresh)) == 1
    again = zeros_like(saved)
    assert reader.load(again) == 4
    assert reader.last_load_from_memory is True
    assert_same(again, saved)


def test_a_damaged_newest_step_is_replaced_by_the_older_one_in_the_same_tensors(
    make_ck: Callable[..., ckptd.Checkpointer], store: str, job: str, tmp_path: Path
) -> None:
    old, new = state(1), state(2)
    with make_ck() as writer:
        writer.save(old, 1).wait()
        writer.save(new, 2).wait()
    # Damage step 2's first chunk (the data region starts at offset 0 of the shard).
    path = shard_file(Path(store.removeprefix("file://")) / job / "step-2", 0)
    data = bytearray(path.read_bytes())
    data[100] ^= 0x40
    path.write_bytes(bytes(data))
    reader = make_ck(arena_dir=tmp_path / "fresh-arena")
    into = zeros_like(old)
    assert reader.load(into) == 1
    # Every tensor holds step 1 whole: none keeps a byte of the damaged step 2 it was read into first.
    assert_same(into, old)
    # Named, step 2 is an error that says where the damage is.
    with pytest.raises(ckptd.CorruptCheckpoint, match="step 2"):
        reader.load(zeros_like(old), 2)


def test_one_slot_is_the_default_and_a_save_that_waits_for_it_is_counted(
    make_ck: Callable[..., ckptd.Checkpointer], arena: Path
) -> None:
    s = state(3, mib=32)
    state_bytes = sum(v.nbytes for v in s.values())
    # Rank 0 of two, alone: its persist waits for rank 1's shard until the commit timeout, so the
    # first save is still persisting when the second one starts.
    ck = make_ck(rank=0, world_size=2, commit_timeout=1.0)
    first = ck.save(s, 1)
    second = ck.save(s, 2)  # waits for the only slot
    with pytest.raises(ckptd.CkptError):
        first.wait()
    with pytest.raises(ckptd.CkptError):
        second.wait()
    stats = ck.stats()
    assert (stats.saves, stats.waited) == (2, 1), stats
    assert stats.wait_seconds > 0
    # One copy of the state (plus its headroom), not two.
    (arena_file,) = arena_files(arena)
    assert arena_file.stat().st_size < 1.15 * state_bytes, (arena_file.stat().st_size, state_bytes)


def test_two_slots_let_the_next_save_start_while_one_persists(make_ck: Callable[..., ckptd.Checkpointer]) -> None:
    s = state(4)
    ck = make_ck(rank=0, world_size=2, commit_timeout=1.0, slots=2)
    handles = [ck.save(s, 1), ck.save(s, 2)]
    for h in handles:
        with pytest.raises(ckptd.CkptError):
            h.wait()
    assert ck.stats() == ckptd.SaveStats(2, 0, 0.0)


def test_the_size_hint_creates_the_arena_before_the_first_save(
    make_ck: Callable[..., ckptd.Checkpointer], arena: Path
) -> None:
    s = state(5, mib=8)
    state_bytes = sum(v.nbytes for v in s.values())
    ck = make_ck(size_hint=state_bytes)
    (created,) = arena_files(arena)
    inode = created.stat().st_ino
    assert created.stat().st_size >= state_bytes
    # The pages are faulted in by a background thread: wait for it as a training script would not
    # need to (it builds its model meanwhile).
    deadline = time.monotonic() + 120
    while not ck.arena_ready:
        assert time.monotonic() < deadline, "the arena was never prepared"
        time.sleep(0.01)
    ck.save(s, 1).wait()
    # The first save used the arena the hint made instead of replacing it.
    (after,) = arena_files(arena)
    assert after.stat().st_ino == inode
    into = zeros_like(s)
    assert ck.load(into) == 1 and ck.last_load_from_memory is True
    assert_same(into, s)


def test_a_size_hint_below_the_state_grows_the_arena_at_the_first_save(
    make_ck: Callable[..., ckptd.Checkpointer], arena: Path
) -> None:
    s = state(6, mib=8)
    ck = make_ck(size_hint=1 << 10)
    ck.save(s, 1).wait()
    ck.wait_all()
    into = zeros_like(s)
    assert ck.load(into) == 1
    assert_same(into, s)
    with pytest.raises(ckptd.ConfigError, match="size_hint"):
        make_ck(size_hint=-1)
