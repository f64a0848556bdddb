"""A snapshot is the training state as of save(): tensors the forward pass updates in place
(BatchNorm's running statistics, an EMA, a user's tensors) keep their save-time values in the
checkpoint although the forward pass runs while the save's copies are still in flight. Host copies
are slowed down (feature `test-hooks`, CKPTD_TEST_COPY_DELAY_US) so that a copy made after
save() returned would see the forward pass's writes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import ckptd
from ckptd import _native

torch = pytest.importorskip("torch")

import ckptd.torch as ct  # noqa: E402

pytestmark = pytest.mark.skipif(
    not _native._TEST_HOOKS, reason="the extension was built without the `test-hooks` feature"
)

# Each 4 MiB piece of a host copy sleeps this long first: every tensor is copied at least 2 ms
# after save() returns, long after the forward pass that follows it.
DELAY_US = "2000"
ROUNDS = 100


def bn_model() -> tuple[Any, Any]:
    torch.manual_seed(0)
    # The large weight comes first in the copy order, the BatchNorm buffers after it.
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024, bias=False), torch.nn.BatchNorm1d(1024))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def train_step(model: Any, opt: Any, step: int) -> None:
    x = torch.randn(8, 1024, generator=torch.Generator().manual_seed(step))
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def save_then_forward(
    make_ck: Callable[..., ckptd.Checkpointer], monkeypatch: pytest.MonkeyPatch, **fence: Any
) -> list[int]:
    """Trains ROUNDS steps, saving each and running the next forward at once; returns the steps
    whose snapshot differs from the state at save()."""
    monkeypatch.setenv("CKPTD_TEST_COPY_DELAY_US", DELAY_US)
    ck = make_ck()  # the copy pool reads the variable when it starts
    model, opt = bn_model()
    ct.fence_before_step(opt, ck, **({"model": model} if fence.get("model") else {}))
    ema = {"w": torch.zeros(1024, 1024)}  # the user's own tensor, after the model in copy order
    wrong = []
    for step in range(1, ROUNDS + 1):
        train_step(model, opt, step)
        ema["w"].mul_(0.5).add_(model[0].weight.detach())
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        expected_ema = ema["w"].clone()
        h = ck.save(ct.capture(model, opt, extra={"ema": ema}), step)
        model(torch.randn(8, 1024))  # updates running_mean, running_var, num_batches_tracked
        ema["w"].add_(1.0)
        h.wait()
        fresh, _ = bn_model()
        got_extra: dict[str, Any] = {"ema": {"w": torch.empty(1024, 1024)}}
        assert ct.restore(ck, model=fresh, step=step, extra=got_extra) == step
        got = fresh.state_dict()
        if any(not torch.equal(got[k], v) for k, v in expected.items()) or not torch.equal(
            got_extra["ema"]["w"], expected_ema
        ):
            wrong.append(step)
    return wrong


def test_buffers_and_user_tensors_are_saved_as_of_save(
    make_ck: Callable[..., ckptd.Checkpointer], monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = save_then_forward(make_ck, monkeypatch)
    assert wrong == [], f"{len(wrong)} of {ROUNDS} snapshots hold values written after save(): steps {wrong}"


def test_model_fenced_before_forward_is_saved_as_of_save(
    make_ck: Callable[..., ckptd.Checkpointer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # With model=, the buffers are not copied by save() but fenced before the next forward.
    wrong = save_then_forward(make_ck, monkeypatch, model=True)
    assert wrong == [], f"{len(wrong)} of {ROUNDS} snapshots hold values written after save(): steps {wrong}"


def test_save_copies_only_what_no_hook_fences(make_ck: Callable[..., ckptd.Checkpointer]) -> None:
    ck = make_ck()
    model, opt = bn_model()
    hooks = ct.fence_before_step(opt, ck)
    extra = {"t": torch.ones(3)}
    with _count_clones() as clones:
        ck.save(ct.capture(model, opt, extra=extra), 1).wait()
    # The buffers, the user's tensor and the RNG states are copied; the parameters and the
    # optimizer's state, which the optimizer step's fence protects, are read in place.
    assert {"model/1.running_mean", "model/1.running_var", "model/1.num_batches_tracked", "extra/t", "rng/torch"} <= set(
        clones
    )
    assert not [c for c in clones if c.startswith(("model/0.", "model/1.weight", "model/1.bias", "optimizer/"))]
    hooks.remove()
    with _count_clones() as clones:
        ck.save(ct.capture(model, opt, extra=extra), 2).wait()
    assert clones == [], "without fence hooks the caller fences: nothing is copied by save()"


class _count_clones:
    """Records the key paths of the leaves that save() copies before returning."""

    def __enter__(self) -> list[str]:
        from ckptd import _tree

        self._orig = _tree.Leaf.snapshot
        names: list[str] = []

        def snapshot(leaf: Any) -> Any:
            names.append(leaf.name)
            return self._orig(leaf)

        _tree.Leaf.snapshot = snapshot  # type: ignore[method-assign]
        self._names = names
        return names

    def __exit__(self, *exc: object) -> None:
        from ckptd import _tree

        _tree.Leaf.snapshot = self._orig  # type: ignore[method-assign]
        self._names.sort()
