"""What torch users expect of load and save: key-tolerant and casting loads, read() without a
template, integral steps of any type, and configuration errors that are not "no checkpoint"."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptd


def test_non_strict_load_fills_common_keys_and_reports_the_rest(ck: ckptd.Checkpointer) -> None:
    ck.save({"a": np.full(3, 1.0), "gone": np.ones(2), "epoch": 4, "old": "x"}, 1).wait()
    out: dict[str, Any] = {"a": np.zeros(3), "new": np.zeros(2), "epoch": 0, "lr": 0.5}
    assert ck.load(out, strict=False) == 1
    assert (out["a"] == 1.0).all() and not out["new"].any()
    assert out["epoch"] == 4 and out["lr"] == 0.5
    assert ck.last_load_keys == ckptd.IncompatibleKeys(missing_keys=["lr", "new"], unexpected_keys=["gone", "old"])
    with pytest.raises(ckptd.StateMismatch, match="`new`: not in the checkpoint"):
        ck.load(out)
    ck.load({"a": out["a"], "gone": np.zeros(2), "epoch": 0, "old": ""})
    assert ck.last_load_keys == ckptd.IncompatibleKeys([], [])


def test_non_strict_load_still_refuses_shape_changes(ck: ckptd.Checkpointer) -> None:
    ck.save({"a": np.ones(3)}, 1).wait()
    out = {"a": np.zeros(4)}
    with pytest.raises(ckptd.StateMismatch, match=r"`a`: expected float64 \[4\], checkpoint has float64 \[3\]"):
        ck.load(out, strict=False)
    assert not out["a"].any()


def test_cast_loads_another_dtype(ck: ckptd.Checkpointer) -> None:
    ck.save({"a": np.arange(4, dtype=np.float32) + 0.25}, 1).wait()
    out = {"a": np.zeros(4, dtype=np.float64)}
    with pytest.raises(ckptd.StateMismatch, match="expected float64 \\[4\\], checkpoint has float32"):
        ck.load(out)
    ck.load(out, cast=True)
    assert out["a"].tolist() == [0.25, 1.25, 2.25, 3.25]


def test_scalar_changed_to_a_tensor_is_named_once(ck: ckptd.Checkpointer) -> None:
    ck.save({"a": 1, "b": np.ones(2)}, 1).wait()
    with pytest.raises(ckptd.StateMismatch) as e:
        ck.load({"a": np.zeros(1), "b": 2.0}, strict=False)
    msg = str(e.value)
    assert "`a`: a int in the checkpoint, a tensor in the state" in msg
    assert "`b`: a tensor in the checkpoint, a float in the state" in msg
    assert "not in the checkpoint" not in msg and "not in the state" not in msg, msg


def test_read_returns_the_saved_state(ck: ckptd.Checkpointer) -> None:
    ck.save({"w": np.arange(6, dtype=np.int32).reshape(2, 3), "meta": {"epoch": 2, "names": ["x"]}}, 5).wait()
    got = ck.read()
    assert got["meta"] == {"epoch": 2, "names": ["x"]}
    assert got["w"].dtype == np.int32 and got["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert ck.last_load_from_memory is True  # this process's arena still holds step 5


@pytest.mark.parametrize("step", [np.int64(3), np.uint32(3), 3])
def test_integral_steps(ck: ckptd.Checkpointer, step: Any) -> None:
    h = ck.save({"w": np.ones(1)}, step)
    assert h.step == 3 and type(h.step) is int
    h.wait()
    assert ck.load({"w": np.zeros(1)}, step) == 3


@pytest.mark.parametrize("step", [np.bool_(True), np.float64(3.0), 3.0])
def test_non_integral_steps(ck: ckptd.Checkpointer, step: Any) -> None:
    with pytest.raises(ckptd.ConfigError, match="step must be an int"):
        ck.save({"w": np.ones(1)}, step)


def test_torch_steps_and_casts(ck: ckptd.Checkpointer) -> None:
    torch = pytest.importorskip("torch")
    import ckptd.torch as ct

    ck.save({"w": torch.arange(4, dtype=torch.float32) / 3}, torch.tensor(7)).wait()
    for bad in (torch.tensor(True), torch.tensor(7.0), torch.tensor([7])):
        with pytest.raises(ckptd.ConfigError, match="step must be an int"):
            ck.save({"w": torch.ones(1)}, bad)
    out = {"w": torch.zeros(4, dtype=torch.bfloat16)}
    ck.load(out, cast=True)
    assert torch.equal(out["w"], (torch.arange(4, dtype=torch.float32) / 3).to(torch.bfloat16))
    assert ct.read(ck)["w"].dtype == torch.float32


def test_allocate_bfloat16(ck: ckptd.Checkpointer) -> None:
    torch = pytest.importorskip("torch")
    ck.save({"w": torch.ones(2, dtype=torch.bfloat16), "n": np.ones(2, dtype=np.int16)}, 1).wait()
    state = ck.describe().allocate()
    assert isinstance(state["w"], torch.Tensor) and state["w"].dtype == torch.bfloat16
    assert isinstance(state["n"], np.ndarray)
    ck.load(state)
    assert state["w"].tolist() == [1.0, 1.0]


def test_torch_restore_non_strict_and_cast(make_ck: Callable[..., ckptd.Checkpointer]) -> None:
    torch = pytest.importorskip("torch")
    import ckptd.torch as ct

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    ck = make_ck()
    ck.save(ct.capture(model), 1).wait()
    grown = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2), torch.nn.Linear(2, 2)).to(torch.bfloat16)
    with pytest.raises(ckptd.StateMismatch):
        ct.restore(ck, model=grown)
    assert ct.restore(ck, model=grown, strict=False, cast=True) == 1
    assert ck.last_load_keys == ckptd.IncompatibleKeys(["model/2.bias", "model/2.weight"], [])
    assert torch.equal(grown[0].weight, model[0].weight.detach().to(torch.bfloat16))


def test_store_errors_are_not_no_checkpoint(make_ck: Callable[..., ckptd.Checkpointer]) -> None:
    with pytest.raises(ckptd.ConfigError, match="store URL is empty"):
        make_ck(store="")
    with pytest.raises(ckptd.StoreError, match="/proc/ckptd-store") as e:
        make_ck(store="file:///proc/ckptd-store")  # cannot be created, even by root
    assert not isinstance(e.value, ckptd.NoCheckpoint)


def test_a_bare_path_is_a_directory_relative_to_the_cwd(
    make_ck: Callable[..., ckptd.Checkpointer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, job: str
) -> None:
    monkeypatch.chdir(tmp_path)
    ck = make_ck(store="rel/ckpt")
    ck.save({"w": np.ones(1)}, 1).wait()
    assert (tmp_path / "rel" / "ckpt" / job / "step-1").is_dir()
