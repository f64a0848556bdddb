"""torch helpers: capture and restore a whole training state, and fence the optimizer step.

>>> ck = ckptd.Checkpointer("job")
>>> step = ckptd.torch.restore(ck, model, optimizer, scheduler)   # every rank, or NoCheckpoint
>>> ckptd.torch.fence_before_step(optimizer, ck)
>>> ck.save(ckptd.torch.capture(model, optimizer, scheduler), step)

The captured state is a dict with the keys ``model``, ``optimizer``, ``scheduler``, ``extra``
(each present when given) and ``rng``: the torch CPU generator, every CUDA generator (when CUDA
is initialised), numpy's global generator (when numpy is installed) and Python's ``random``.
``restore`` loads in place and re-applies them all, so a resumed run continues bitwise
identically.

In sidecar mode these helpers also keep the agent's hang detector informed: the hooks of
:func:`fence_before_step` report every optimizer step, and :func:`restore` reports phase
``checkpoint-load`` throughout, so a script needs no :meth:`ckptd.Checkpointer.heartbeat` calls.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from . import Checkpointer, CkptError, Description, NoCheckpoint, TensorInfo, _tree

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

__all__ = ["HookHandles", "capture", "fence_before_step", "read", "restore"]


def _rng_state() -> dict[str, Any]:
    rng: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        rng["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    try:
        import numpy
    except ImportError:
        pass
    else:
        rng["numpy"] = numpy.random.get_state(legacy=True)
    return rng


def _set_rng_state(rng: dict[str, Any]) -> None:
    if "python" in rng:
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        for i, state in enumerate(rng["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)
    if "numpy" in rng:
        import numpy

        numpy.random.set_state(tuple(rng["numpy"]))


def capture(
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    extra: Any = None,
) -> dict[str, Any]:
    """The training state to pass to :meth:`ckptd.Checkpointer.save`.

    Model and optimizer tensors are the live ones (no copy is made here: the checkpointer copies
    them into shared memory); ``extra`` is any state tree of your own (e.g. the data-loader
    position)."""
    state: dict[str, Any] = {}
    if model is not None:
        state["model"] = model.state_dict()
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if extra is not None:
        state["extra"] = extra
    state["rng"] = _rng_state()
    return state


def _empty(name: str, info: TensorInfo) -> Any:
    """A tensor to load ``info`` into; numpy's generator state stays a numpy array."""
    if name.startswith("rng/numpy/"):
        import numpy

        return numpy.empty(info.shape, dtype=numpy.dtype(info.dtype))
    return torch.empty(info.shape, dtype=getattr(torch, info.dtype))


def read(ck: Checkpointer, step: int | None = None) -> dict[str, Any]:
    """A new state holding ``step`` (default: the newest committed step) as CPU torch tensors
    (numpy's generator state stays numpy), like ``torch.load`` of a saved state dict."""
    state: dict[str, Any] = ck.read(step, make=_empty)
    return state


def _same_layout(live: Any, desc: Description, key: str) -> bool:
    """Whether the live part ``live`` has exactly the tensors and scalar paths that the stored
    ``state[key]`` has, so it can be loaded into in place."""
    try:
        flat = _tree.flatten({key: live}, writable=True)
    except CkptError:
        return False
    stored_tensors, stored_scalars = _tree.described_leaves(desc.state[key], _tree.encode_key(key))
    live_tensors = {leaf.name: TensorInfo(leaf.dtype, leaf.shape) for leaf in flat.tensors}
    return live_tensors == stored_tensors and set(flat.scalars) == set(stored_scalars)


def _collective_device() -> torch.device:
    """Where the default process group's collectives take tensors: the CPU for gloo (and any
    backend list with a ``cpu:`` entry, e.g. ``cpu:gloo,cuda:nccl``), the current CUDA device for
    nccl."""
    backend = str(torch.distributed.get_backend())
    if ":" in backend:
        devices = {part.split(":", 1)[0].strip() for part in backend.split(",")}
        on_cuda = "cpu" not in devices
    else:
        on_cuda = backend == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")


def _agreed_description(ck: Checkpointer) -> Description | None:
    """The description of the newest committed step of any rank, the same on every rank of the
    default process group; ``None`` when there is no group of more than one rank to agree with.

    Ranks restart at different times, and a step may be committed in between: a rank that looked
    earlier sees an older newest step. A committed step is whole (every rank's shard is durable),
    so the newest one any rank sees is loadable by all: one all_reduce(MAX) settles it. A rank
    that cannot look (a store error) makes every rank raise, rather than leave the others waiting
    for it in a later collective."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    mine: Description | None = None
    error: CkptError | None = None
    try:
        mine = ck.describe()
    except CkptError as e:
        error = e
    failed = 0 if error is None or isinstance(error, NoCheckpoint) else dist.get_rank() + 1
    # [newest step seen or -1, 1 + the highest rank that failed or 0]
    t = torch.tensor([-1 if mine is None else mine.step, failed], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    agreed, failed_rank = (int(v) for v in t.tolist())
    if failed_rank:
        if error is not None and not isinstance(error, NoCheckpoint):
            raise error
        raise CkptError(
            f"rank {failed_rank - 1} could not find its newest checkpoint (see its error): no rank restores"
        )
    if agreed < 0:
        assert error is not None  # every rank saw no checkpoint
        raise error
    if mine is not None and mine.step == agreed:
        return mine
    return ck.describe(agreed)


def restore(
    ck: Checkpointer,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    step: int | None = None,
    *,
    extra: Any = None,
    strict: bool = True,
    cast: bool = False,
    agree: bool = True,
) -> int:
    """Loads ``step`` (default: the newest committed step) into ``model`` and ``optimizer`` in
    place, re-applies the optimizer's and the scheduler's state dicts and the RNG states, fills
    ``extra`` (a dict or list) in place, and returns the step loaded.

    With ``step=None`` under ``torch.distributed`` (a default process group of more than one
    rank) and ``agree=True`` (the default), every rank returns the same step: each finds its
    newest committed step, and the ranks take the newest of them with one ``all_reduce`` (on the
    CPU for gloo, on the current CUDA device for nccl). Every rank must then call ``restore``,
    also when there may be no checkpoint: every rank raises :class:`ckptd.NoCheckpoint` when no
    rank finds one. ``agree=False`` loads each rank's own newest step, with no collective.

    An optimizer whose state does not exist yet (a fresh optimizer before its first step) gets
    it from the checkpoint. Parts of the checkpoint that are not asked for are read and dropped.
    ``strict`` and ``cast`` are those of :meth:`ckptd.Checkpointer.load` (``strict=False`` loads
    the keys present in both and reports the others in ``ck.last_load_keys``; ``cast=True``
    converts stored dtypes, e.g. an fp32 checkpoint into a bf16 model).

    In sidecar mode the agent is told that the rank is in phase ``checkpoint-load`` until this
    returns, and the optimizer steps that :func:`fence_before_step` reports count on from the
    step loaded.
    """
    with ck._phase("checkpoint-load"):
        desc = _agreed_description(ck) if step is None and agree else None
        if desc is None:
            desc = ck.describe(step)
        if desc.state is None or not isinstance(desc.state, dict):
            raise CkptError(f"step {desc.step} was not saved by ckptd.torch.capture")
        target: dict[str, Any] = {}
        for key in desc.state:
            if key == "model" and model is not None:
                target[key] = model.state_dict()
            elif key == "optimizer" and optimizer is not None:
                live = optimizer.state_dict()
                target[key] = live if _same_layout(live, desc, key) else desc.allocate(_empty, key=key)
            elif key == "extra" and extra is not None:
                target[key] = extra
            else:
                target[key] = desc.allocate(_empty, key=key)
        loaded = ck.load(target, desc.step, strict=strict, cast=cast)
        if optimizer is not None and "optimizer" in target:
            optimizer.load_state_dict(target["optimizer"])
        if scheduler is not None and "scheduler" in target:
            scheduler.load_state_dict(target["scheduler"])
        if "rng" in target:
            _set_rng_state(target["rng"])
        ck._resumed_at(loaded)
    return loaded


class HookHandles:
    """The hooks :func:`fence_before_step` registered; ``remove()`` unregisters them all."""

    def __init__(self, *handles: RemovableHandle, on_remove: Callable[[], None] | None = None) -> None:
        self._handles = handles
        self._on_remove = on_remove

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        if self._on_remove is not None:
            self._on_remove()


def _keys(tensors: Iterable[torch.Tensor]) -> Iterator[tuple[int, int]]:
    """``(device, address)`` of each tensor, as the flattened state names its leaves."""
    for t in tensors:
        device = -1 if t.device.type == "cpu" else int(t.device.index or 0)
        yield device, int(t.data_ptr())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for group in optimizer.param_groups:
        yield from group["params"]
    for per_param in optimizer.state.values():
        yield from (v for v in per_param.values() if isinstance(v, torch.Tensor))


def fence_before_step(
    optimizer: torch.optim.Optimizer, ck: Checkpointer, *, model: torch.nn.Module | None = None
) -> HookHandles:
    """Registers an optimizer step pre-hook that calls ``ck.fence()``, so ``optimizer.step()``
    never overwrites parameters or state that a save is still copying, and a post-hook that marks
    the step finished. Together they tell ``ck`` when the trainer is outside the optimizer step,
    so that a snapshot the agent requests can be taken from a background thread (see
    :meth:`ckptd.Checkpointer.register_snapshot`).

    They also tell ``ck`` which tensors are fenced: from then on, :meth:`ckptd.Checkpointer.save`
    copies every other saved tensor (buffers such as BatchNorm's running statistics, an EMA,
    your own tensors) before it returns, so that the forward pass after ``save()`` cannot change
    the snapshot. With ``model``, a forward pre-hook on it fences too, and the model's buffers are
    copied in the background instead: no extra memory, but the next forward waits for the copy.

    In sidecar mode the post-hook also reports each optimizer step to the agent (at most one
    round trip per ~100 ms), so its hang detector sees progress without
    :meth:`ckptd.Checkpointer.heartbeat` calls. The step reported counts optimizer steps from the
    newest step saved or restored (with several hooked optimizers, the first one's steps); a
    failed report is printed once and never raised into the training loop.

    Returns the hooks' handles (``.remove()`` unregisters them). The hooks do nothing once ``ck``
    is closed."""

    def pre(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        del opt, args, kwargs
        if not ck.closed:
            ck._enter_optimizer_step()
            ck.fence()

    def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        del opt, args, kwargs
        ck._leave_optimizer_step()
        if not ck.closed:
            ck._optimizer_stepped(counts=ck._counts_steps(fenced))

    def before_forward(module: torch.nn.Module, args: Any) -> None:
        del module, args
        if not ck.closed:
            ck.fence()

    def fenced() -> Iterator[tuple[int, int]]:
        yield from _keys(_optimizer_tensors(optimizer))
        if model is not None:
            yield from _keys(model.parameters())
            yield from _keys(model.buffers())

    handles = [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]
    if model is not None:
        handles.append(model.register_forward_pre_hook(before_forward))
    ck._hooks_registered(fenced)
    return HookHandles(*handles, on_remove=lambda: ck._hooks_removed(fenced))
