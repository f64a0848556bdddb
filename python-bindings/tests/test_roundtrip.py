"""Round trips of numpy states, scalars and key paths through a file:// store."""

from __future__ import annotations

import math
from collections import namedtuple
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import ckptd
from ckptd import _tree

NUMPY_DTYPES = [
    np.float64,
    np.float32,
    np.float16,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
    np.complex64,
    np.complex128,
]


def sample(dtype: Any, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.asarray(_sample(dtype, shape, seed))


def _sample(dtype: Any, shape: tuple[int, ...], seed: int) -> Any:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.integers(0, 2, size=shape).astype(dt)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    if dt.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
    return rng.standard_normal(shape).astype(dt)


def zeros_like(state: Any) -> Any:
    """The same structure with zeroed arrays and "wrong" scalars, to load into."""
    if isinstance(state, np.ndarray):
        return np.zeros_like(state)
    if isinstance(state, dict):
        return {k: zeros_like(v) for k, v in state.items()}
    if isinstance(state, list):
        return [zeros_like(v) for v in state]
    if isinstance(state, tuple):
        items = [zeros_like(v) for v in state]
        return type(state)(*items) if hasattr(state, "_fields") else tuple(items)
    if isinstance(state, bool):
        return not state
    if isinstance(state, (int, float)):
        return type(state)(0)
    if isinstance(state, str):
        return ""
    if isinstance(state, bytes):
        return b""
    return None


def assert_same(a: Any, b: Any, path: str = "") -> None:
    assert type(a) is type(b), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k!r}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    elif isinstance(a, float):
        assert a.hex() == b.hex(), path  # bit-exact, including -0.0
    else:
        assert a == b, path


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_numpy_dtype_round_trips(ck: ckptd.Checkpointer, dtype: Any) -> None:
    state = {
        "matrix": sample(dtype, (7, 13), 1),
        "scalar0d": sample(dtype, (), 2),
        "empty": sample(dtype, (0, 4), 3),
        "big": sample(dtype, (3, 100_003), 4),
    }
    ck.save(state, 1).wait()
    out = zeros_like(state)
    assert ck.load(out) == 1
    assert_same(state, out)
    desc = ck.describe()
    assert desc.tensors["matrix"] == ckptd.TensorInfo(np.dtype(dtype).name if dtype is not np.bool_ else "bool", (7, 13))
    assert desc.tensors["scalar0d"].shape == ()
    assert desc.tensors["empty"].shape == (0, 4)


Pair = namedtuple("Pair", ["left", "right"])


def nested_state() -> dict[str, Any]:
    return {
        "model": {"layer.0.weight": sample(np.float32, (4, 3), 5), "layer.0.bias": sample(np.float32, (4,), 6)},
        "optimizer": {
            "state": {0: {"step": np.array(3.0, dtype=np.float32), "exp_avg": sample(np.float32, (4, 3), 7)}},
            "param_groups": [{"params": [0, 1], "lr": 1e-3, "betas": (0.9, 0.999), "foreach": None}],
        },
        # int and str keys that print alike, and keys that need escaping
        "keys": {0: sample(np.int64, (2,), 8), "0": sample(np.int64, (3,), 9), "a/b": 1, "c.d": 2, "#e": 3, "~f": 4, "": 5},
        "scalars": {
            "none": None,
            "true": True,
            "false": False,
            "int": -(2**70),
            "zero": 0,
            "float": 0.1,
            "negzero": -0.0,
            "inf": float("inf"),
            "nan": float("nan"),
            "str": "héllo / wörld",
            "bytes": bytes(range(256)),
            "emptybytes": b"",
        },
        "lists": [[1, [2.5, "x"]], (), [], {}, (np.arange(5, dtype=np.int16), "t")],
        "named": Pair(np.ones(2, dtype=np.uint8), 7),
        "empties": {"d": {}, "l": [], "t": ()},
    }


def test_nested_state_with_scalars_round_trips(ck: ckptd.Checkpointer) -> None:
    state = nested_state()
    ck.save(state, 10).wait()
    out = zeros_like(state)
    tensors_before = {id(out["model"]["layer.0.weight"]), id(out["keys"][0])}
    assert ck.load(out) == 10
    assert_same(state, out)
    # in place: the same array objects were filled, and dicts/lists kept their identity
    assert {id(out["model"]["layer.0.weight"]), id(out["keys"][0])} == tensors_before


def test_describe_rebuilds_the_structure(ck: ckptd.Checkpointer) -> None:
    state = nested_state()
    ck.save(state, 4).wait()
    desc = ck.describe(4)
    assert desc.step == 4
    assert set(desc.tensors) == {
        "model/layer.0.weight",
        "model/layer.0.bias",
        "optimizer/state/#0/step",
        "optimizer/state/#0/exp_avg",
        "keys/#0",
        "keys/0",
        "lists/#4/#0",
        "named/#0",
    }
    fresh = desc.allocate()
    assert fresh["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert isinstance(fresh["optimizer"]["state"][0]["exp_avg"], np.ndarray)
    assert ck.load(fresh) == 4
    assert_same(state["optimizer"], fresh["optimizer"])
    part = desc.allocate(key="optimizer")
    assert part["state"][0]["exp_avg"].shape == (4, 3)


def test_multiple_steps_latest_and_older(ck: ckptd.Checkpointer) -> None:
    assert ck.latest_step() is None
    states = {}
    for step in (5, 10, 15):
        states[step] = {"w": sample(np.float64, (1000,), step), "step": step}
        ck.save(states[step], step).wait()
        assert ck.latest_step() == step
    out = zeros_like(states[5])
    assert ck.load(out) == 15
    assert_same(states[15], out)
    assert ck.load(out, step=5) == 5
    assert_same(states[5], out)
    assert ck.load(out, step=10) == 10
    assert_same(states[10], out)


def test_saves_overlap_and_wait_all(ck: ckptd.Checkpointer) -> None:
    handles = [ck.save({"w": np.full(50_000, s, dtype=np.int32)}, s) for s in range(1, 6)]
    ck.wait_all()
    assert all(h.done() for h in handles)
    assert [h.step for h in handles] == [1, 2, 3, 4, 5]
    assert ck.latest_step() == 5


def test_scalars_only_state(ck: ckptd.Checkpointer) -> None:
    state = {"epoch": 3, "name": "run"}
    ck.save(state, 1).wait()
    out = {"epoch": 0, "name": ""}
    assert ck.load(out) == 1
    assert out == state


def test_dlpack_and_array_interface_objects_load_in_place(ck: ckptd.Checkpointer) -> None:
    class DL:
        def __init__(self, a: np.ndarray) -> None:
            self.a = a

        def __dlpack__(self, **kw: Any) -> Any:
            return self.a.__dlpack__(**kw)

        def __dlpack_device__(self) -> Any:
            return self.a.__dlpack_device__()

    class AI:
        def __init__(self, a: np.ndarray) -> None:
            self.a = a
            self.__array_interface__ = a.__array_interface__

    src = {"dl": DL(np.arange(10, dtype=np.float32)), "ai": AI(np.arange(6, dtype=np.int64).reshape(2, 3))}
    ck.save(src, 1).wait()
    dst = {"dl": DL(np.zeros(10, dtype=np.float32)), "ai": AI(np.zeros((2, 3), dtype=np.int64))}
    ck.load(dst)
    assert dst["dl"].a.tolist() == list(range(10))
    assert dst["ai"].a.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_loads_from_the_memory_tier_and_from_storage(make_ck: Callable[..., ckptd.Checkpointer], tmp_path: Any) -> None:
    state = {"w": sample(np.float32, (256,), 1)}
    ck = make_ck()
    ck.save(state, 1).wait()
    ck.close(keep_arena=True)
    same_arena = make_ck()
    out = zeros_like(state)
    same_arena.load(out)
    assert same_arena.last_load_from_memory is True
    assert_same(state, out)
    fresh = make_ck(arena_dir=tmp_path / "other-arena")
    out = zeros_like(state)
    fresh.load(out)
    assert fresh.last_load_from_memory is False
    assert_same(state, out)


def test_context_manager_closes(make_ck: Callable[..., ckptd.Checkpointer]) -> None:
    with make_ck() as ck:
        ck.save({"w": np.ones(3)}, 1)
    assert ck.closed
    assert make_ck().latest_step() == 1  # close waited for the save


@pytest.mark.parametrize("key", [0, -3, 12, "", "0", "#0", "a/b", "~", "~1", "a.b", "x~0/#y", "é"])
def test_key_segments_round_trip(key: str | int) -> None:
    seg = _tree.encode_key(key)
    assert "/" not in seg
    back = _tree.decode_key(seg)
    assert back == key and type(back) is type(key)


def test_int_and_str_keys_stay_distinct() -> None:
    assert _tree.encode_key(0) != _tree.encode_key("0")
    assert _tree.join(_tree.join("", "a/b"), 1) == "a~1b/#1"
    assert _tree.split("a~1b/#1/~") == ["a/b", 1, ""]
