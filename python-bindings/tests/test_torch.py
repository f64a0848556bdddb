"""torch on CPU: dtypes, capture/restore, and a SIGKILLed training run that resumes bitwise
identically (from the memory tier and from storage)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import ckptd  # noqa: E402
import ckptd.torch as ct  # noqa: E402
from ckptd import _native  # noqa: E402

from .conftest import Child  # noqa: E402

TORCH_DTYPES = [
    name
    for name in (
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
        "complex64",
        "complex128",
    )
    if hasattr(torch, name)
]


def random_tensor(dtype: Any, shape: tuple[int, ...], seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=g).to(torch.bool)
    raw = torch.randint(0, 256, (*shape, dtype.itemsize), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape) if shape else raw.view(dtype).reshape(())


@pytest.mark.parametrize("name", TORCH_DTYPES)
def test_every_torch_dtype_round_trips_in_place(ck: ckptd.Checkpointer, name: str) -> None:
    dtype = getattr(torch, name)
    state = {"m": random_tensor(dtype, (5, 7), 1), "s": random_tensor(dtype, (), 2), "e": torch.empty(0, 3, dtype=dtype)}
    ck.save(state, 1).wait()
    assert ck.describe().tensors["m"] == ckptd.TensorInfo(name, (5, 7))
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    ptrs = {k: v.data_ptr() for k, v in out.items()}
    ck.load(out)
    for k in state:
        assert out[k].data_ptr() == ptrs[k]
        assert out[k].reshape(-1).view(torch.uint8).tolist() == state[k].reshape(-1).view(torch.uint8).tolist(), k


def test_non_contiguous_tensor_names_its_key_path(ck: ckptd.Checkpointer) -> None:
    with pytest.raises(ckptd.ConfigError, match=r"`opt/state/#0/m`: the tensor is not contiguous"):
        ck.save({"opt": {"state": {0: {"m": torch.ones(4, 4).t()}}}}, 1)


def test_unsupported_torch_tensors(ck: ckptd.Checkpointer) -> None:
    with pytest.raises(ckptd.ConfigError, match=r"`q`: dtype .* is not supported"):
        ck.save({"q": torch.ones(2, dtype=torch.complex32)}, 1)
    with pytest.raises(ckptd.ConfigError, match=r"`sp`: a torch.sparse_coo tensor"):
        ck.save({"sp": torch.eye(3).to_sparse()}, 1)
    with pytest.raises(ckptd.ConfigError, match=r"`meta`: tensors on device `meta`"):
        ck.save({"meta": torch.ones(2, device="meta")}, 1)
    with pytest.raises(ckptd.ConfigError, match=r"`c`: a lazily conjugated"):
        ck.save({"c": torch.ones(2, dtype=torch.complex64).conj()}, 1)


def small_model() -> tuple[Any, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.3), torch.nn.Linear(32, 1))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def assert_state_equal(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_state_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_state_equal(x, y, f"{path}/{i}")
    else:
        assert a == b, path


def test_train_save_every_five_and_restore_into_fresh_objects(make_ck: Callable[..., ckptd.Checkpointer]) -> None:
    ck = make_ck()
    model, opt = small_model()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    hook = ct.fence_before_step(opt, ck)
    handles = []
    for step in range(1, 31):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
        if step % 5 == 0:
            handles.append(ck.save(ct.capture(model, opt, sched, extra={"epoch": step // 10}), step))
    for h in handles:
        h.wait()
    assert [h.step for h in handles] == [5, 10, 15, 20, 25, 30]
    assert ck.latest_step() == 30
    desc = ck.describe()
    assert {"model/0.weight", "optimizer/state/#0/exp_avg", "optimizer/state/#3/step", "rng/torch"} <= set(desc.tensors)
    assert desc.state["scheduler"]["last_epoch"] == 30
    hook.remove()
    ck.close()  # one writer per rank: the restoring checkpointer below is this rank's next one

    rng_after = torch.get_rng_state()
    torch.manual_seed(123)  # the restore must bring the generator back
    model2, opt2 = small_model()
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=7, gamma=0.5)
    extra: dict[str, Any] = {"epoch": -1}
    assert len(opt2.state) == 0
    with make_ck() as restoring:  # closed before the next checkpointer of this rank opens
        assert ct.restore(restoring, model2, opt2, sched2, extra=extra) == 30
    assert extra == {"epoch": 3}
    assert_state_equal(model.state_dict(), model2.state_dict())
    assert_state_equal(opt.state_dict(), opt2.state_dict())
    assert sched.state_dict() == sched2.state_dict()
    assert torch.equal(torch.get_rng_state(), rng_after)

    # Restoring an older step into objects that already have state loads in place.
    exp_avg = opt2.state_dict()["state"][0]["exp_avg"]
    with make_ck() as restoring:
        assert ct.restore(restoring, model2, opt2, sched2, step=15) == 15
    assert opt2.state_dict()["state"][0]["exp_avg"] is exp_avg
    assert sched2.state_dict()["last_epoch"] == 15


def test_fence_hook_is_skipped_once_closed(make_ck: Callable[..., ckptd.Checkpointer]) -> None:
    ck = make_ck()
    model, opt = small_model()
    ct.fence_before_step(opt, ck)
    ck.save(ct.capture(model, opt), 1)
    ck.close()
    model(torch.ones(1, 8)).sum().backward()
    opt.step()  # must not raise CheckpointerClosed


# ------------------------------------------------------------------- crash and resume


# Slowed host copies (test builds): a save's copies then run while the next step's forward pass
# updates the BatchNorm buffers, so a snapshot that took them after save() returned would resume
# differently.
SLOW_COPIES = {"CKPTD_TEST_COPY_DELAY_US": "2000"} if _native._TEST_HOOKS else {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted 30-step run."""
    d = tmp_path_factory.mktemp("reference")
    out = d / "final.pt"
    Child(
        "train_helper.py", "--store", (d / "store").as_uri(), "--arena", str(d / "arena"), "--job", "ref",
        "--out", str(out),
    ).finish()
    ref: dict[str, Any] = torch.load(out)
    assert sorted(ref["losses"]) == list(range(1, 31))
    return ref


@pytest.mark.parametrize("same_arena", [True, False], ids=["memory-tier", "from-storage"])
def test_sigkill_two_steps_after_a_save_then_resume_is_bitwise_identical(
    tmp_path: Path, reference: dict[str, Any], same_arena: bool
) -> None:
    store = (tmp_path / "store").as_uri()
    arena = tmp_path / "arena"
    first = Child(
        "train_helper.py", "--store", store, "--arena", str(arena), "--job", "crash", "--pause-at", "12", env=SLOW_COPIES
    )
    first.until(lambda e: "paused" in e)
    first.kill()
    losses = {e["step"]: e["loss"] for e in first.events if "step" in e}
    assert sorted(losses) == list(range(1, 13))

    arena2 = arena if same_arena else tmp_path / "fresh-arena"
    out = tmp_path / "final.pt"
    second = Child(
        "train_helper.py", "--store", store, "--arena", str(arena2), "--job", "crash", "--resume", "--out", str(out),
        env=SLOW_COPIES,
    )
    events = second.finish()
    assert events[0] == {"restored": 10, "from_memory": same_arena}
    resumed = {e["step"]: e["loss"] for e in events if "step" in e}
    assert sorted(resumed) == list(range(11, 31))
    # Steps 11 and 12 ran twice: before the kill and after the restore, identically.
    assert resumed[11] == losses[11] and resumed[12] == losses[12]
    losses.update(resumed)
    assert {int(k): v for k, v in reference["losses"].items()} == losses

    final = torch.load(out)
    assert_state_equal(reference["model"], final["model"])
    assert_state_equal(reference["optimizer"], final["optimizer"])
