"""fence(): after it returns, the training loop may overwrite the saved tensors; the checkpoint
still holds the values at save time. Host copies are slowed down (feature `test-hooks`,
CKPTD_TEST_COPY_DELAY_US) so that an unfenced write would land while the copy still runs."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import ckptd
from ckptd import _native

pytestmark = pytest.mark.skipif(
    not _native._TEST_HOOKS, reason="the extension was built without the `test-hooks` feature"
)

# Each 4 MiB piece of a host copy sleeps this long first: 20 ms.
DELAY_US = "20000"
N, LEN = 16, 1 << 20  # 16 arrays of 4 MiB: 16 pieces, >= 160 ms of copying on 2 threads


@pytest.fixture
def slow_ck(make_ck: Callable[..., ckptd.Checkpointer], monkeypatch: pytest.MonkeyPatch) -> ckptd.Checkpointer:
    monkeypatch.setenv("CKPTD_TEST_COPY_DELAY_US", DELAY_US)
    return make_ck()  # the copy pool reads the variable when it starts


def numpy_state() -> dict[str, np.ndarray]:
    return {f"w{i}": np.full(LEN, i, dtype=np.float32) for i in range(N)}


def overwrite(state: dict[str, np.ndarray]) -> None:
    for a in state.values():
        a[:] = -1.0  # what optimizer.step() would do


def loaded(ck: ckptd.Checkpointer) -> dict[str, np.ndarray]:
    out = {f"w{i}": np.zeros(LEN, dtype=np.float32) for i in range(N)}
    ck.load(out)
    return out


def test_writes_after_fence_do_not_reach_the_checkpoint(slow_ck: ckptd.Checkpointer) -> None:
    state = numpy_state()
    h = slow_ck.save(state, 1)
    assert not h.done(), "the save returned after its copies: the delay hook is not active"
    slow_ck.fence()
    overwrite(state)
    h.wait()
    out = loaded(slow_ck)
    for i in range(N):
        assert (out[f"w{i}"] == i).all(), f"w{i} holds values written after the fence"


def test_control_without_fence_the_write_races_the_copy(slow_ck: ckptd.Checkpointer) -> None:
    # Proves the test above can fail: with no fence, overwritten values reach the checkpoint.
    state = numpy_state()
    h = slow_ck.save(state, 1)
    overwrite(state)
    h.wait()
    out = loaded(slow_ck)
    assert any((out[f"w{i}"] == -1.0).any() for i in range(N))


def test_saved_arrays_stay_alive_until_the_save_finishes(slow_ck: ckptd.Checkpointer) -> None:
    h = slow_ck.save(numpy_state(), 1)  # nothing but the checkpointer references these arrays
    assert not h.done()
    gc.collect()
    reuse = [np.full(LEN, -7.0, dtype=np.float32) for _ in range(N)]  # would take freed memory
    h.wait()
    out = loaded(slow_ck)
    for i in range(N):
        assert (out[f"w{i}"] == i).all(), f"w{i} was freed while its copy ran"
    del reuse


def _torch_check(ck: ckptd.Checkpointer, hook: bool) -> bool:
    """Saves, steps the optimizer at once, and tells whether the checkpoint holds the pre-step
    parameters."""
    torch: Any = pytest.importorskip("torch")
    import ckptd.torch as ct

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024, bias=False) for _ in range(8)))  # 8 x 4 MiB
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    if hook:
        ct.fence_before_step(opt, ck)
    before = [p.detach().clone() for p in model.parameters()]

    h = ck.save(ct.capture(model, opt), 1)
    assert not h.done(), "the save returned after its copies: the delay hook is not active"
    opt.step()
    h.wait()
    assert not torch.equal(next(model.parameters()), before[0]), "the step changed nothing"
    state = ck.describe().allocate(lambda _n, info: torch.zeros(info.shape, dtype=getattr(torch, info.dtype)))
    ck.load(state)
    saved = [state["model"][f"{i}.weight"] for i in range(8)]
    return all(torch.equal(s, b) for s, b in zip(saved, before, strict=True))


def test_fence_before_step_keeps_pre_step_parameters(slow_ck: ckptd.Checkpointer) -> None:
    assert _torch_check(slow_ck, hook=True)


def test_control_without_the_hook_the_step_races_the_copy(slow_ck: ckptd.Checkpointer) -> None:
    assert not _torch_check(slow_ck, hook=False)
