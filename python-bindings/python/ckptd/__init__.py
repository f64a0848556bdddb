"""ckptd: fast, crash-consistent checkpoints of a training state.

>>> ck = ckptd.Checkpointer("my-job", store="file:///tmp/ckpt", arena_dir="/tmp/arena")
>>> h = ck.save({"w": weights, "epoch": 3}, step=100)   # returns once the copies are enqueued
>>> ck.fence()                                           # before the next write to `weights`
>>> h.wait()                                             # durable and committed
>>> ck.load(state)                                       # fills `state` in place; returns the step

State: nested dicts, lists and tuples whose dict keys are ``str`` or ``int`` (as in
``optimizer.state_dict()``). Leaves are tensors (torch CPU or CUDA, C-contiguous numpy arrays,
objects with ``__dlpack__`` or ``__array_interface__``), saved as raw bytes, and Python scalars
(``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``), saved as typed JSON in the shard's
metadata. Nothing is pickled. ``load`` fills tensors in place and sets scalar leaves back into
their dicts and lists (a tuple holding scalars is replaced in its parent).

Tensor names are key paths: the keys from the root, joined by ``/``. An ``int`` key or index is
written ``#<n>``; in a ``str`` key ``~`` becomes ``~0``, ``/`` becomes ``~1``, ``#`` becomes ``~2``
and the empty string is ``~``. So ``state["optimizer"]["state"][0]["exp_avg"]`` is named
``optimizer/state/#0/exp_avg`` while a ``str`` key ``"0"`` stays ``0``, and
``model/layer.0.weight`` keeps its dots. Errors name leaves by these paths.

Errors are subclasses of :class:`CkptError`: :class:`StoreError`, :class:`CorruptCheckpoint`,
:class:`StateMismatch`, :class:`ArenaFull`, :class:`AgentUnavailable`, :class:`NoCheckpoint`,
:class:`ConfigError` (also a ``ValueError``) and :class:`CheckpointerClosed`.

In sidecar mode the agent may order this process to end (the job restarts from an earlier step, or
its node is being isolated). A script that does not take orders itself (:meth:`Checkpointer.restore_order`)
is ended by the library at its next ``save``/``fence``/``heartbeat``, or after
``CKPTD_RESTART_GRACE`` seconds (default 3; ``off``) when it is blocked (in a collective, say),
with exit code :data:`EXIT_RESTART` or :data:`EXIT_STOP`, for its launcher (torchrun
``--max-restarts``, the container's restart policy) to start it again.

torch is optional and never imported here; see :mod:`ckptd.torch` for model/optimizer helpers.
"""

from __future__ import annotations

import contextlib
import ctypes
import operator
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, NamedTuple

from . import _native, _tree
from ._native import (
    AgentUnavailable,
    ArenaFull,
    CheckpointerClosed,
    CkptError,
    ConfigError,
    CorruptCheckpoint,
    NoCheckpoint,
    StateMismatch,
    StoreError,
)
from ._tree import TensorInfo

__all__ = [
    "AgentUnavailable",
    "ArenaFull",
    "Checkpointer",
    "CheckpointerClosed",
    "CkptError",
    "ConfigError",
    "CorruptCheckpoint",
    "Description",
    "EXIT_RESTART",
    "EXIT_STOP",
    "IncompatibleKeys",
    "NoCheckpoint",
    "SaveHandle",
    "SaveStats",
    "SaveTimings",
    "StateMismatch",
    "StoreError",
    "TensorInfo",
    "__version__",
]

__version__: Final[str] = _native.__version__
#: Exit code of a worker the library ended on a restart order: its launcher restarts it.
EXIT_RESTART: Final[int] = _native.EXIT_RESTART
#: Exit code of a worker the library ended on a stop order (its node is being isolated).
EXIT_STOP: Final[int] = _native.EXIT_STOP

_ADVANCED: Final = frozenset(
    {"arena_dir", "chunk_size", "commit_timeout", "strict_restore", "on_resize", "parallel", "size_hint"}
)

#: The least time (seconds) between two progress reports in the same phase. A report is a round
#: trip to the agent; hang budgets are seconds to minutes, so a step waits at most this long to be
#: seen, a small fraction of any budget.
_REPORT_INTERVAL: Final = 0.1


class SaveTimings(NamedTuple):
    """When a save reached each point, as this process saw it: wall-clock nanoseconds since the
    Unix epoch (``time.time_ns()``'s clock), for measurements. A step's commit latency is the
    latest ``committed_ns`` of its ranks minus their latest ``shard_durable_ns``."""

    #: This rank's shard became durable (in sidecar mode, as the agent saw it).
    shard_durable_ns: int
    #: This process learned that the step is committed.
    committed_ns: int
    #: This rank (or its agent) wrote the MANIFEST; ``None`` when another rank did.
    manifest_written_ns: int | None


class SaveHandle:
    """A save in progress."""

    __slots__ = ("_native",)

    def __init__(self, native: _native._SaveHandle) -> None:
        self._native = native

    @property
    def step(self) -> int:
        """The step being saved."""
        return self._native.step

    def wait(self) -> None:
        """Blocks until the step is durable and committed on every rank; raises if it failed."""
        self._native.wait()

    def done(self) -> bool:
        """Whether the save finished, successfully or not (``wait()`` tells which)."""
        return self._native.done()

    def timings(self) -> SaveTimings | None:
        """When the shard became durable and the commit was learned of, once the save succeeded
        (``None`` before, and for a step that was found committed already)."""
        t = self._native.timings()
        return None if t is None else SaveTimings(*t)

    def __repr__(self) -> str:
        return f"SaveHandle(step={self.step}, done={self.done()})"


@dataclass(frozen=True)
class Description:
    """What a stored step holds, read without its tensor data (see :meth:`Checkpointer.describe`)."""

    #: The step described.
    step: int
    #: Every stored tensor by key path.
    tensors: dict[str, TensorInfo]
    #: The saved state's structure: scalars as saved, :class:`TensorInfo` at tensor leaves.
    #: ``None`` when the step was not written by this package (no state metadata).
    state: Any

    def allocate(self, make: Callable[[str, TensorInfo], Any] | None = None, *, key: str | int | None = None) -> Any:
        """A new state shaped like the saved one (or like its part ``state[key]``), with
        ``make(name, info)`` at each tensor leaf, ready to be loaded into. The default is an empty
        numpy array, or an empty torch tensor for dtypes numpy lacks (``bfloat16``, ``float8_*``);
        without torch those raise :class:`CkptError`."""
        if self.state is None:
            raise CkptError(f"step {self.step} has no ckptd state metadata to rebuild its structure from")
        if key is None:
            return _tree.materialize(self.state, make or _numpy_empty, "")
        return _tree.materialize(self.state[key], make or _numpy_empty, _tree.encode_key(key))


def _numpy_empty(name: str, info: TensorInfo) -> Any:
    try:
        import numpy

        dtype = numpy.dtype(info.dtype)
    except (ImportError, TypeError):
        try:
            import torch
        except ImportError:
            raise CkptError(
                f"`{name}`: a {info.dtype} tensor needs torch (numpy has no {info.dtype}): install torch, "
                "or pass make= to allocate()"
            ) from None
        return torch.empty(info.shape, dtype=getattr(torch, info.dtype))
    return numpy.empty(info.shape, dtype=dtype)


class SaveStats(NamedTuple):
    """:meth:`Checkpointer.stats`."""

    saves: int
    #: Saves that waited for an arena slot (every slot still persisting).
    waited: int
    #: Seconds those saves waited in all.
    wait_seconds: float


class IncompatibleKeys(NamedTuple):
    """The key paths that :meth:`Checkpointer.load` with ``strict=False`` left alone, as
    ``torch.nn.Module.load_state_dict`` reports them."""

    #: In the state but not in the checkpoint: left as they were.
    missing_keys: list[str]
    #: In the checkpoint but not in the state: read and dropped.
    unexpected_keys: list[str]


class _Scratch:
    """Host memory for one stored tensor: a load target that a caller's leaf cannot be (an
    unexpected tensor to drop, or one to cast)."""

    def __init__(self, name: str, info: TensorInfo) -> None:
        self.info = info
        size = _tree.ITEMSIZE[info.dtype]
        for d in info.shape:
            size *= d
        self.buf = bytearray(max(size, 1))
        addr = ctypes.addressof((ctypes.c_char * len(self.buf)).from_buffer(self.buf))
        self.leaf = (name, info.dtype, info.shape, addr, -1)

    def cast_into(self, target: Any) -> None:
        """Copies the loaded data into ``target``, converting to its dtype (and device)."""
        count = 1
        for d in self.info.shape:
            count *= d
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(target, torch.Tensor):
            dtype = getattr(torch, self.info.dtype)
            src = torch.frombuffer(self.buf, dtype=dtype, count=count) if count else torch.empty(0, dtype=dtype)
            with torch.no_grad():
                target.copy_(src.reshape(self.info.shape))
            return
        import numpy

        try:
            np_dtype = numpy.dtype(self.info.dtype)
        except TypeError:
            raise CkptError(
                f"`{self.leaf[0]}`: casting a stored {self.info.dtype} tensor needs a torch tensor to load into "
                f"(numpy has no {self.info.dtype})"
            ) from None
        src = numpy.frombuffer(self.buf, dtype=np_dtype, count=count).reshape(self.info.shape)
        numpy.copyto(numpy.asarray(target), src, casting="unsafe")


def _cuda_stream(device: int | None) -> int | None:
    """The raw current CUDA stream of ``device``, which copies must be ordered after."""
    if device is None:
        return None
    torch = sys.modules["torch"]
    return int(torch.cuda.current_stream(device).cuda_stream)


def _check_step(step: object, *, optional: bool = False) -> int | None:
    """``step`` as an ``int``: any integral type (numpy integers, 0-d integer tensors) in
    0..2**64; ``bool``, floats and other types raise :class:`ConfigError`."""
    if optional and step is None:
        return None
    dtype = str(getattr(step, "dtype", ""))
    value: int | None = None
    zero_dim = tuple(getattr(step, "shape", ())) == ()
    if zero_dim and not isinstance(step, bool) and dtype not in ("bool", "torch.bool"):
        try:
            value = operator.index(step)  # type: ignore[arg-type]
        except (TypeError, RuntimeError, ValueError):
            value = None
    if value is None or not 0 <= value < 2**64:
        raise ConfigError(f"step must be an int in 0..2**64 (any integral type), not {step!r}")
    return value


def _cuda_device(leaves: list[_tree.Leaf]) -> int | None:
    devices = {leaf.device for leaf in leaves if leaf.device >= 0}
    if len(devices) > 1:
        raise ConfigError(
            f"the state has tensors on CUDA devices {sorted(devices)}: use one Checkpointer per device"
        )
    return devices.pop() if devices else None


def _scalar_problems(
    flat: _tree.Flat, stored: dict[str, Any], stored_tensors: set[str], *, strict: bool
) -> tuple[list[str], list[str], list[str]]:
    """Compares the state's scalars with the stored ones: ``(problems, missing, unexpected)``.
    A leaf that is a scalar on one side and a tensor on the other is a problem even when not
    ``strict``; the tensor side reports nothing about it."""
    tensor_names = {leaf.name for leaf in flat.tensors}
    problems: list[str] = []
    missing: list[str] = []
    unexpected: list[str] = []
    for name in flat.scalars:
        if name in stored_tensors:
            problems.append(f"`{name}`: a tensor in the checkpoint, a {_tree.scalar_kind(flat.scalars[name])} in the state")
        elif name not in stored:
            (problems if strict else missing).append(name if not strict else f"`{name}`: not in the checkpoint")
    for name, v in stored.items():
        if name in tensor_names:
            problems.append(f"`{name}`: a {_tree.scalar_kind(v)} in the checkpoint, a tensor in the state")
        elif name not in flat.scalars:
            (problems if strict else unexpected).append(
                name if not strict else f"`{name}`: in the checkpoint but not in the state"
            )
    return problems, missing, unexpected


def _description(got: int, table: list[tuple[str, str, tuple[int, ...]]], metadata: bytes) -> Description:
    """A :class:`Description` from what the native layer reports of a step."""
    tensors = {name: TensorInfo(dtype, tuple(shape)) for name, dtype, shape in table}
    tree = _tree.decode_metadata(metadata)
    state = None if tree is None else _tree.build(tree, tensors, lambda _name, info: info)
    return Description(got, tensors, state)


class _LoadPlan:
    """What :meth:`Checkpointer.load` reads where: the state's tensors matched against a step's
    description, with every difference listed at once."""

    def __init__(self, flat: _tree.Flat, desc: Description, *, strict: bool, cast: bool) -> None:
        self.step = desc.step
        self.leaves: list[tuple[str, str, tuple[int, ...], int, int]] = []
        self.casts: list[tuple[_Scratch, Any]] = []
        self._scratch: list[_Scratch] = []
        problems: list[str] = []
        missing: list[str] = []
        unexpected: list[str] = []
        stored_scalars = _tree.described_scalars(desc.state) if desc.state is not None else {}
        for leaf in flat.tensors:
            info = desc.tensors.get(leaf.name)
            if info is None:
                if leaf.name in stored_scalars:
                    continue  # a scalar in the checkpoint: _scalar_problems names it
                if strict:
                    problems.append(f"`{leaf.name}`: not in the checkpoint")
                else:
                    missing.append(leaf.name)
            elif info.shape != leaf.shape or (info.dtype != leaf.dtype and not cast):
                problems.append(
                    f"`{leaf.name}`: expected {leaf.dtype} {list(leaf.shape)}, checkpoint has {info.dtype} {list(info.shape)}"
                )
            elif info.dtype != leaf.dtype:
                scratch = _Scratch(leaf.name, info)
                self.casts.append((scratch, leaf.owner))
                self.leaves.append(scratch.leaf)
            else:
                self.leaves.append(leaf.as_tuple())
        names = {leaf.name for leaf in flat.tensors}
        for name, info in desc.tensors.items():
            if name in names:
                continue
            if name in flat.scalars:
                pass  # a scalar in the state: _scalar_problems names it
            elif strict:
                problems.append(f"`{name}`: in the checkpoint but not in the state")
            else:
                unexpected.append(name)
            # Read and dropped: the native load reads every stored tensor.
            scratch = _Scratch(name, info)
            self._scratch.append(scratch)
            self.leaves.append(scratch.leaf)
        scalar_problems, scalar_missing, scalar_unexpected = _scalar_problems(
            flat, stored_scalars, set(desc.tensors), strict=strict
        )
        self.problems = problems + scalar_problems
        self.missing = sorted(missing + scalar_missing)
        self.unexpected = sorted(unexpected + scalar_unexpected)


class Checkpointer:
    """Saves and loads a training state to a store; see the module documentation.

    ``store`` is a URL (``file:///path``, ``s3://bucket/prefix``, ``oss://``, ``gs://``, ``az://``,
    ``memory://``); it defaults to ``$CKPTD_STORE`` or ``./ckptd-store``. ``socket`` selects sidecar
    mode (the agent's Unix socket; default ``$CKPTD_SOCKET``), else the checkpointer runs embedded.
    ``compression`` is ``none``, ``auto``, ``zstd`` or ``zstd:<level>``. ``slots`` is how many
    snapshots the arena holds (default 1: one copy of the state in host memory, and a save waits
    while the previous one still persists, counted by :meth:`stats`; 2 never waits, for twice the
    memory, and keeps the memory tier while a save is copied). Advanced options: ``size_hint``
    (about how many bytes the state has; embedded mode: the arena is created and its pages faulted
    in at construction, in the background, so the first save is as fast as the next ones),
    ``arena_dir`` (memory-backed directory of the snapshot arena; default ``$CKPTD_ARENA_DIR`` or
    ``/dev/shm/ckptd``), ``chunk_size`` (bytes), ``commit_timeout`` (seconds rank 0 waits for
    every rank's shard), ``strict_restore`` (``load()`` of the newest step raises
    :class:`CorruptCheckpoint` when that step's data is damaged, instead of restoring the newest
    sound step with a warning, the default), ``on_resize`` and ``parallel`` (embedded mode; the
    agent has ``--on-resize``): what ``load()`` does with a step saved by another number of ranks.
    ``"wait"`` (the default, else ``$CKPTD_ON_RESIZE``) raises :class:`StateMismatch`: the job waits
    for its ranks. ``"replicas"`` says the data-parallel replicas hold the same state (DDP, not
    ZeRO/FSDP sharding): each rank loads the saved shard of a replica at its own tensor- and
    pipeline-parallel position (ranks ordered tensor-parallel fastest, then data-parallel, then
    pipeline; ``parallel="dp=4,tp=2,pp=1"``, default ``$CKPTD_PARALLEL``, gives the sizes), so the
    job resumes at another data-parallel size; its per-rank ``extra`` is that replica's.
    """

    def __init__(
        self,
        job: str,
        *,
        store: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        socket: str | os.PathLike[str] | None = None,
        slots: int | None = None,
        compression: str = "none",
        **advanced: Any,
    ) -> None:
        unknown = sorted(set(advanced) - _ADVANCED)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}: accepted are {', '.join(sorted(_ADVANCED))}")
        hint = advanced.get("size_hint")
        if hint is not None and (isinstance(hint, bool) or not isinstance(hint, int) or hint <= 0):
            raise ConfigError(f"size_hint must be a positive whole number of bytes, not {hint!r}")
        self._native = _native._Checkpointer(
            job,
            store=store,
            rank=rank,
            world_size=world_size,
            socket=socket,
            slots=slots,
            compression=compression,
            **advanced,
        )
        self._job = job
        self._fence_device: int | None = None
        # Snapshot-now: where a requested snapshot's state comes from, the step it is taken at,
        # and the optimizer-step guard that lets a background thread take it safely. The step is
        # also the one progress reports carry: the newest of the steps saved, loaded or passed
        # to heartbeat(), counted on by each optimizer step (see _optimizer_stepped).
        self._snapshot_fn: Callable[[], Any] | None = None
        self._last_step: int | None = None
        # Progress reports to the agent (sidecar mode): the phase it was last told, when, and
        # whether a report already failed (logged once).
        self._sidecar = self._native.mode == "sidecar"
        self._progress = threading.Lock()
        self._phase_now = "init"
        self._reported_at = -_REPORT_INTERVAL
        self._report_failed = False
        self._guard = threading.Condition()
        self._in_optimizer_step = False
        self._snapshotting = False
        self._hooks = False
        self._worker: threading.Thread | None = None
        # Where the tensors come from whose writers wait for fence() (registered by
        # ckptd.torch.fence_before_step), as (device, address) pairs; see save().
        self._fenced: list[Callable[[], Iterable[tuple[int, int]]]] = []
        #: Whether the last :meth:`load` came from the shared-memory arena (memory tier) rather
        #: than the store; ``None`` before the first load.
        self.last_load_from_memory: bool | None = None
        #: The keys the last :meth:`load` left alone (always empty lists with ``strict=True``);
        #: ``None`` before the first load.
        self.last_load_keys: IncompatibleKeys | None = None
        self._report(force=True)  # phase init: the agent's hang detector starts its init budget

    @property
    def job(self) -> str:
        """The job name."""
        return self._job

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._native.closed

    @property
    def mode(self) -> str:
        """``"sidecar"`` when an agent persists the snapshots, else ``"embedded"``."""
        return self._native.mode

    def save(self, state: Any, step: int, *, blocking: bool = False) -> SaveHandle:
        """Starts saving ``state`` as ``step`` and returns once the copies are enqueued; the
        snapshot is the state as of this call.

        Plain use: call :meth:`fence` before the training loop next writes any saved tensor.
        With :func:`ckptd.torch.fence_before_step` hooks registered, the tensors those hooks
        fence (the optimizer's, and the model's when given) are copied in the background, and
        every other tensor (buffers, EMA, user tensors) is copied before this returns. Call
        ``wait()`` on the handle to know it is durable. With ``blocking=True`` it returns only
        after all copies are done (and, in sidecar mode, after the agent owns the snapshot, so it
        is persisted even if this process dies right after). A pending snapshot request from the
        agent is answered by this save. ``step`` is any integral type (int, numpy integer, 0-d
        integer tensor). In sidecar mode the agent is told that the rank is in phase
        ``checkpoint-save`` while this runs, so its hang detector applies the save budget.
        """
        value = _check_step(step)
        assert value is not None
        self._advance(value)
        with self._phase("checkpoint-save"):
            handle = self._save(state, value, copy_unfenced=not blocking)
            if blocking:
                # The host waits (even for CUDA tensors), so that the copies are done and, in
                # sidecar mode, the agent owns the snapshot when this returns.
                self._native.fence(None)
        return handle

    def _save(self, state: Any, step: int, *, copy_unfenced: bool = True) -> SaveHandle:
        value = _check_step(step)
        assert value is not None
        self._advance(value)
        flat = _tree.flatten(state, writable=False)
        if copy_unfenced and self._fenced:
            fenced = {key for source in self._fenced for key in source()}
            flat.tensors = [
                leaf if (leaf.device, leaf.addr) in fenced else leaf.snapshot() for leaf in flat.tensors
            ]
        device = _cuda_device(flat.tensors)
        metadata = _tree.encode_metadata(flat)
        native = self._native.save(
            [leaf.as_tuple() for leaf in flat.tensors],
            value,
            metadata,
            _cuda_stream(device),
            # The native checkpointer keeps these referenced until the save has finished.
            keepalive=[leaf.owner for leaf in flat.tensors],
        )
        self._fence_device = device
        return SaveHandle(native)

    def fence(self) -> None:
        """Returns once the newest save's copies have read the tensors, so they may be written.

        For CUDA tensors the trainer's current stream waits instead of the host."""
        self._native.fence(_cuda_stream(self._fence_device))

    def heartbeat(self, step: int, phase: str = "step") -> bool:
        """Reports progress to the agent. ``phase`` is ``init``, ``step``, ``checkpoint-save`` or
        ``checkpoint-load`` (a long load is then not a hang).

        Scripts with :func:`ckptd.torch.fence_before_step` hooks need not call it: the hooks
        report every optimizer step, and :meth:`save`, :meth:`load` and
        :func:`ckptd.torch.restore` report their phases. Without the hooks, call it once per
        training step, or the agent reports the rank as hung once its step budget passes.

        Returns ``True`` when the agent requested a snapshot. With a source registered by
        :meth:`register_snapshot`, the snapshot is taken here (this is a safe point); otherwise
        the caller should :meth:`save` now. Embedded mode never requests one.
        """
        value = _check_step(step)
        assert value is not None
        request = self._native.heartbeat(value, phase)
        with self._progress:
            self._last_step = value
            self._phase_now = phase
            self._reported_at = time.monotonic()
        if request is None:
            return False
        if self._snapshot_fn is not None:
            self._save(self._snapshot_fn(), value)
        return True

    def _advance(self, step: int) -> None:
        """The trainer is at least at ``step`` (a step saved or loaded)."""
        with self._progress:
            self._last_step = step if self._last_step is None else max(self._last_step, step)

    def _resumed_at(self, step: int) -> None:
        """The training state was restored to ``step``: optimizer steps count on from it (even
        when it is older than the step reported last, as after a rollback), so that every rank
        reports the step it really is at."""
        with self._progress:
            self._last_step = step

    def _optimizer_stepped(self, counts: bool) -> None:
        """An optimizer step finished: one more step when it ``counts`` (the step of the first
        hooked optimizer, so that two optimizers stepped per iteration count one step), and a
        progress report."""
        if counts:
            with self._progress:
                self._last_step = (self._last_step or 0) + 1
        self._report("step")

    def _report(self, phase: str | None = None, *, force: bool = False) -> None:
        """Tells the agent this rank's step and phase, for its hang detector (sidecar mode only).

        A new phase is reported at once; the same phase at most every ``_REPORT_INTERVAL``
        seconds, so that a fast training loop makes few round trips. Never raises: progress
        reports must not stop training when the agent is gone (the failure is printed once, and
        saves report the agent's loss themselves)."""
        if not self._sidecar:
            return
        with self._progress:
            if phase is not None and phase != self._phase_now:
                self._phase_now = phase
                force = True
            now = time.monotonic()
            if not force and now - self._reported_at < _REPORT_INTERVAL:
                return
            self._reported_at = now
            if self.closed:
                return
            try:
                self._native.heartbeat(self._last_step or 0, self._phase_now)
            except CkptError as e:
                if not self._report_failed:
                    self._report_failed = True
                    print(f"ckptd: cannot report progress to the agent, training goes on: {e}", file=sys.stderr)

    @contextlib.contextmanager
    def _phase(self, phase: str) -> Iterator[None]:
        """Reports ``phase`` for the duration of the block, then the phase before it again."""
        if not self._sidecar:
            yield
            return
        with self._progress:
            before = self._phase_now
        self._report(phase)
        try:
            yield
        finally:
            self._report(before)

    def restore_order(self) -> tuple[int, int] | None:
        """The isolator's newest restore order ``(step, generation)``, taken (so returned once):
        the whole job restarts from ``step``; call :meth:`load` with it and continue. ``None``
        when there is none (always, embedded)."""
        return self._native.take_restore_order()

    @property
    def stop_requested(self) -> str | None:
        """Why the agent asked this trainer to stop (its node is being isolated), or ``None``."""
        return self._native.stop_requested

    def register_snapshot(self, state_fn: Callable[[], Any]) -> None:
        """Registers where an agent-requested snapshot's state comes from (e.g.
        ``lambda: ckptd.torch.capture(model, optimizer)``).

        Requests are then answered at the next :meth:`heartbeat`, or at once from a background
        thread when :func:`ckptd.torch.fence_before_step` hooks tell that the trainer is outside
        the optimizer step (the only code that writes the saved tensors). A snapshot is saved as
        the trainer's current step: the step of the last :meth:`heartbeat`, save or load, plus
        the optimizer steps the hooks counted since (none are taken before a step is known).
        """
        self._snapshot_fn = state_fn
        self._maybe_start_worker()

    def _enter_optimizer_step(self) -> None:
        with self._guard:
            while self._snapshotting:
                self._guard.wait()
            self._in_optimizer_step = True

    def _leave_optimizer_step(self) -> None:
        with self._guard:
            self._in_optimizer_step = False
            self._guard.notify_all()

    def _hooks_registered(self, fenced: Callable[[], Iterable[tuple[int, int]]]) -> None:
        """Fence hooks now protect the tensors ``fenced()`` names by ``(device, address)``."""
        self._fenced.append(fenced)
        self._hooks = True
        self._maybe_start_worker()

    def _hooks_removed(self, fenced: Callable[[], Iterable[tuple[int, int]]]) -> None:
        if fenced in self._fenced:
            self._fenced.remove(fenced)

    def _counts_steps(self, fenced: Callable[[], Iterable[tuple[int, int]]]) -> bool:
        """Whether the optimizer whose hooks registered ``fenced`` counts steps: the first one
        hooked that is still hooked."""
        return bool(self._fenced) and self._fenced[0] is fenced

    def _maybe_start_worker(self) -> None:
        if self._worker is not None or not self._hooks or self._snapshot_fn is None or self.mode != "sidecar":
            return
        self._worker = threading.Thread(target=self._answer_requests, name="ckptd-snapshot", daemon=True)
        self._worker.start()

    def _answer_requests(self) -> None:
        """Background thread: takes requested snapshots while the optimizer step is not running."""
        while not self.closed:
            try:
                request = self._native.wait_snapshot_request(0.5)
            except CkptError:
                return  # closed, or the agent is gone: the training loop sees that error itself
            if request is None or self._snapshot_fn is None or self._last_step is None:
                continue
            with self._guard:
                while self._in_optimizer_step:
                    self._guard.wait()
                if self._native.snapshot_requested is None:
                    continue  # a heartbeat or save answered it meanwhile
                self._snapshotting = True
            try:
                self._save(self._snapshot_fn(), self._last_step)
            except CkptError as e:
                print(f"ckptd: requested snapshot failed: {e}", file=sys.stderr)
            finally:
                with self._guard:
                    self._snapshotting = False
                    self._guard.notify_all()

    def describe(self, step: int | None = None) -> Description:
        """What ``step`` (default: the newest committed step) holds, without reading tensor data."""
        value = _check_step(step, optional=True)
        with self._phase("checkpoint-load"):
            got, table, metadata = self._native.describe(value)
        return _description(got, table, metadata)

    def read(self, step: int | None = None, *, make: Callable[[str, TensorInfo], Any] | None = None) -> Any:
        """A new state holding ``step`` (default: the newest committed step), like
        ``torch.load``: built with :meth:`Description.allocate` (``make`` as there) and loaded."""
        with self._phase("checkpoint-load"):
            desc = self.describe(step)
            state = desc.allocate(make)
            self.load(state, desc.step)
        return state

    def load(self, state: Any, step: int | None = None, *, strict: bool = True, cast: bool = False) -> int:
        """Fills ``state`` in place from ``step`` (default: the newest committed step) and returns
        the step loaded.

        With ``strict=True`` (the default), ``state`` must have the saved structure: every
        difference (missing or extra keys, shape or dtype changes, a scalar where a tensor was) is
        reported at once as :class:`StateMismatch`, before anything is written. With
        ``strict=False``, keys in only one of them are left alone and reported in
        :attr:`last_load_keys` (as ``load_state_dict`` does); other differences still raise.
        With ``cast=True``, a tensor stored with another dtype (same shape) is read into a
        temporary and converted into the state's tensor (an fp32 checkpoint into a bf16 model).
        ``strict`` is about keys; the constructor's ``strict_restore`` is about damaged steps.
        In sidecar mode the agent is told that the rank is in phase ``checkpoint-load`` meanwhile.
        """
        with self._phase("checkpoint-load"):
            loaded = self._load(state, step, strict=strict, cast=cast)
            self._advance(loaded)
        return loaded

    def _load(self, state: Any, step: int | None, *, strict: bool, cast: bool) -> int:
        value = _check_step(step, optional=True)
        flat = _tree.flatten(state, writable=True)
        device = _cuda_device(flat.tensors)
        plan: _LoadPlan | None = None
        if not strict or cast:
            # Which stored tensors to read where depends on the stored table: look first.
            plan = _LoadPlan(flat, self.describe(value), strict=strict, cast=cast)
            if plan.problems:
                raise StateMismatch(f"state does not match checkpoint step {plan.step}: {'; '.join(plan.problems)}")
        leaves = plan.leaves if plan is not None else [leaf.as_tuple() for leaf in flat.tensors]
        stored: dict[str, Any] = {}

        def check(got: int, raw: bytes, table: list[tuple[str, str, tuple[int, ...]]]) -> list[str]:
            # Runs once, before any tensor is written, on the step actually read (an older one
            # when the newest is damaged). The default load reads nothing before this: every
            # difference is listed here, in one message.
            desc = _description(got, table, raw)
            stored.update(_tree.described_scalars(desc.state) if desc.state is not None else {})
            problems = _LoadPlan(flat, desc, strict=strict, cast=cast).problems
            if problems:
                raise StateMismatch(f"state does not match checkpoint step {got}: {'; '.join(problems)}")
            return []

        loaded, _metadata, from_memory = self._native.load(leaves, value, _cuda_stream(device), check)
        if plan is not None:
            for scratch, target in plan.casts:
                scratch.cast_into(target)
        _tree.assign_scalars(state, stored)
        self.last_load_from_memory = from_memory
        self.last_load_keys = IncompatibleKeys(plan.missing, plan.unexpected) if plan is not None else IncompatibleKeys([], [])
        return loaded

    @property
    def arena_ready(self) -> bool:
        """Whether the arena exists and its pages are resident (pinned, with a GPU), so that the next
        save copies into memory that is already faulted in. With ``size_hint`` it turns true in the
        background after construction; without, after the first save."""
        return self._native.arena_ready

    def stats(self) -> SaveStats:
        """How the saves went so far: how many started, how many waited for an arena slot because
        every slot was still persisting an earlier save, and how long they waited (part of their
        stall). With one slot, a save interval shorter than the time to persist shows here."""
        saves, waited, wait_seconds = self._native.stats()
        return SaveStats(saves, waited, wait_seconds)

    def latest_step(self) -> int | None:
        """The newest committed step that validates, or ``None``."""
        with self._phase("checkpoint-load"):
            return self._native.latest_step()

    def wait_all(self) -> None:
        """Waits for every save in flight to be durable; raises the first failure."""
        self._native.wait_all()

    def close(self, *, keep_arena: bool = False) -> None:
        """Waits for the saves in flight and stops. Closing twice does nothing.

        The embedded arena (the shared-memory snapshots of this rank) is removed, unless
        ``keep_arena`` keeps it, with its memory tier, for a planned restart of this process that
        should load without reading storage. A process that crashes never closes: its arena stays
        for the next start, which takes it over. In sidecar mode the agent owns the arena.
        """
        self._native.close(keep_arena=keep_arena)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer(job={self._job!r}, closed={self.closed})"
