"""Every bad input maps to its exception class, with a message that names what is wrong."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptd

from .conftest import shard_file


def test_hierarchy() -> None:
    for cls in (
        ckptd.StoreError,
        ckptd.CorruptCheckpoint,
        ckptd.StateMismatch,
        ckptd.ArenaFull,
        ckptd.AgentUnavailable,
        ckptd.NoCheckpoint,
        ckptd.ConfigError,
        ckptd.CheckpointerClosed,
    ):
        assert issubclass(cls, ckptd.CkptError)
        assert cls.__module__ == "ckptd._native"
    assert issubclass(ckptd.CkptError, Exception)
    assert issubclass(ckptd.ConfigError, ValueError)


def test_non_contiguous_array_names_its_key_path(ck: ckptd.Checkpointer) -> None:
    w = np.arange(12.0).reshape(3, 4)[:, ::2]
    with pytest.raises(ckptd.ConfigError, match=r"`model/layers/#1/w`: the array is not C-contiguous"):
        ck.save({"model": {"layers": [{"w": np.ones(2)}, {"w": w}]}}, 1)


def test_non_contiguous_transpose_is_refused_too(ck: ckptd.Checkpointer) -> None:
    with pytest.raises(ckptd.ConfigError, match=r"`t`: the array is not C-contiguous"):
        ck.save({"t": np.ones((3, 4)).T}, 1)


@pytest.mark.parametrize(
    ("leaf", "what"),
    [(object(), "builtins.object"), ({1, 2}, "builtins.set"), (np.float32(1.0), "numpy scalar"), (1 + 2j, "builtins.complex")],
)
def test_unsupported_leaf_names_its_key_path(ck: ckptd.Checkpointer, leaf: Any, what: str) -> None:
    with pytest.raises(ckptd.ConfigError, match=rf"`a/#1/~1x`: .*{what}"):
        ck.save({"a": [1, {"/x": leaf}]}, 1)


def test_unsupported_key_type(ck: ckptd.Checkpointer) -> None:
    with pytest.raises(ckptd.ConfigError, match=r"`a`: key \(1, 2\) of type tuple"):
        ck.save({"a": {(1, 2): np.ones(1)}}, 1)
    with pytest.raises(ckptd.ConfigError, match=r"key True of type bool"):
        ck.save({True: 1}, 1)


def test_root_must_be_a_container(ck: ckptd.Checkpointer) -> None:
    with pytest.raises(ckptd.ConfigError, match="must be a dict or a list"):
        ck.save(np.ones(3), 1)


def test_unsupported_numpy_dtypes(ck: ckptd.Checkpointer) -> None:
    with pytest.raises(ckptd.ConfigError, match=r"`s`: numpy dtype <U1 is not supported"):
        ck.save({"s": np.array(["a"])}, 1)
    with pytest.raises(ckptd.ConfigError, match=r"`o`: numpy dtype object"):
        ck.save({"o": np.array([None])}, 1)
    with pytest.raises(ckptd.ConfigError, match=r"`be`: big-endian"):
        ck.save({"be": np.ones(3, dtype=">f4")}, 1)


def test_shape_and_dtype_mismatch_lists_every_offending_key(ck: ckptd.Checkpointer) -> None:
    ck.save({"a": np.ones(3, np.float32), "b": np.ones((2, 2), np.int64), "c": np.ones(1), "ok": np.ones(2)}, 1).wait()
    out = {"a": np.zeros(4, np.float32), "b": np.zeros((2, 2), np.float64), "d": np.zeros(1), "ok": np.zeros(2)}
    with pytest.raises(ckptd.StateMismatch) as e:
        ck.load(out)
    msg = str(e.value)
    assert "`a`: expected float32 [4], checkpoint has float32 [3]" in msg
    assert "`b`: expected float64 [2, 2], checkpoint has int64 [2, 2]" in msg
    assert "`c`: in the checkpoint but not in the state" in msg
    assert "`d`: not in the checkpoint" in msg
    assert "`ok`" not in msg
    assert not out["ok"].any(), "nothing may be written when the state does not match"


def test_scalar_mismatch_is_reported_with_tensor_mismatches(ck: ckptd.Checkpointer) -> None:
    ck.save({"w": np.ones(2), "epoch": 1, "sub": {"x": 1}}, 1).wait()
    out = {"w": np.zeros(3), "lr": 0.1, "sub": {"x": 0}}
    with pytest.raises(ckptd.StateMismatch) as e:
        ck.load(out)
    msg = str(e.value)
    assert "`w`: expected float64 [3], checkpoint has float64 [2]" in msg
    assert "`epoch`: in the checkpoint but not in the state" in msg
    assert "`lr`: not in the checkpoint" in msg
    assert out["sub"]["x"] == 0 and not out["w"].any()


def test_load_with_no_checkpoint(ck: ckptd.Checkpointer, job: str) -> None:
    with pytest.raises(ckptd.NoCheckpoint, match=f"no committed checkpoint of job `{job}`"):
        ck.load({"w": np.zeros(1)})
    with pytest.raises(ckptd.NoCheckpoint):
        ck.describe()
    ck.save({"w": np.ones(1)}, 3).wait()
    with pytest.raises(ckptd.NoCheckpoint, match="step 7"):
        ck.load({"w": np.zeros(1)}, step=7)


def test_corrupt_shard_names_the_chunk(make_ck: Callable[..., ckptd.Checkpointer], tmp_path: Path, job: str) -> None:
    ck = make_ck(chunk_size=1 << 16)
    state = {"w": np.arange(100_000, dtype=np.float32)}  # 400 KB: several chunks
    ck.save(state, 1).wait()
    ck.close()
    shard = shard_file(tmp_path / "store" / job / "step-1", 0)
    data = bytearray(shard.read_bytes())
    data[3 * (1 << 16) + 123] ^= 0x40  # inside chunk 3
    shard.write_bytes(bytes(data))
    # A fresh arena: the memory tier of the first process would otherwise serve the load.
    fresh = make_ck(arena_dir=tmp_path / "fresh-arena")
    out = {"w": np.zeros(100_000, dtype=np.float32)}
    with pytest.raises(ckptd.CorruptCheckpoint, match=r"step-1/rank-0\.[0-9a-f]{16}\.ckpt \(step 1, rank 0\) chunk 3"):
        fresh.load(out)
    assert fresh.last_load_from_memory is None


def test_damaged_newest_step_falls_back_unless_strict(
    make_ck: Callable[..., ckptd.Checkpointer], tmp_path: Path, job: str
) -> None:
    ck = make_ck()
    ck.save({"w": np.full(50_000, 1.0, dtype=np.float32)}, 1).wait()
    ck.save({"w": np.full(50_000, 2.0, dtype=np.float32)}, 2).wait()
    ck.close()
    shard = shard_file(tmp_path / "store" / job / "step-2", 0)
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0x01
    shard.write_bytes(bytes(data))

    strict = make_ck(arena_dir=tmp_path / "strict-arena", strict_restore=True)
    with pytest.raises(ckptd.CorruptCheckpoint, match=r"step-2/rank-0\.[0-9a-f]{16}\.ckpt"):
        strict.load({"w": np.zeros(50_000, dtype=np.float32)})
    strict.close()

    # A fresh arena, as after a pod move: step 2 is damaged, step 1 restores.
    fresh = make_ck(arena_dir=tmp_path / "fresh-arena")
    out = {"w": np.zeros(50_000, dtype=np.float32)}
    assert fresh.load(out) == 1
    assert (out["w"] == 1.0).all()
    assert fresh.last_load_from_memory is False


@pytest.mark.parametrize("mode", ["lz4", "zstd:99", ""])
def test_bad_compression(make_ck: Callable[..., ckptd.Checkpointer], mode: str) -> None:
    with pytest.raises(ckptd.ConfigError, match="compression") as e:
        make_ck(compression=mode)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"rank": 4, "world_size": 4}, "rank"),
        ({"slots": 0}, "slots"),
        ({"commit_timeout": -1.0}, "commit_timeout"),
        ({"commit_timeout": float("nan")}, "commit_timeout"),
        ({"chunk_size": 1 << 40}, "chunk_size"),
        ({"chunk_size": 1}, "chunk_size"),
        ({"job": "../escape"}, "job"),
        ({"store": "ftp://nowhere/x"}, "ftp"),
        ({"bogus_option": 1}, "bogus_option"),
    ],
)
def test_bad_configuration(make_ck: Callable[..., ckptd.Checkpointer], kw: dict[str, Any], field: str) -> None:
    with pytest.raises(ckptd.ConfigError, match=field):
        make_ck(**kw)


def test_socket_means_sidecar_mode_which_is_unavailable(make_ck: Callable[..., ckptd.Checkpointer], tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    with pytest.raises(ckptd.AgentUnavailable, match=f"no ckptd agent at {sock}"):
        make_ck(socket=sock)


def test_use_after_close(ck: ckptd.Checkpointer) -> None:
    ck.save({"w": np.ones(1)}, 1)
    ck.close()
    ck.close()  # idempotent
    calls: list[Callable[[], Any]] = [
        lambda: ck.save({"w": np.ones(1)}, 2),
        lambda: ck.load({"w": np.zeros(1)}),
        lambda: ck.describe(),
        lambda: ck.fence(),
        lambda: ck.latest_step(),
        lambda: ck.wait_all(),
    ]
    for call in calls:
        with pytest.raises(ckptd.CheckpointerClosed, match="closed"):
            call()


def test_read_only_array_cannot_be_loaded_into(ck: ckptd.Checkpointer) -> None:
    ck.save({"w": np.ones(3)}, 1).wait()
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(ckptd.ConfigError, match="`w`: the array is read-only"):
        ck.load({"w": ro})


def test_self_containing_state(ck: ckptd.Checkpointer) -> None:
    state: dict[str, Any] = {"a": []}
    state["a"].append(state["a"])
    with pytest.raises(ckptd.ConfigError, match="contains itself"):
        ck.save(state, 1)


@pytest.mark.parametrize("step", [-1, 2**64, 1.5, "3", True])
def test_bad_step(ck: ckptd.Checkpointer, step: Any) -> None:
    with pytest.raises(ckptd.ConfigError, match="step must be an int"):
        ck.save({"w": np.ones(1)}, step)
    with pytest.raises(ckptd.ConfigError, match="step must be an int"):
        ck.load({"w": np.ones(1)}, step)
