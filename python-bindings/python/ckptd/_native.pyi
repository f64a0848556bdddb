"""The private native module of ckptd (Rust, PyO3). Use the ``ckptd`` package instead."""

import os
from collections.abc import Callable
from pathlib import Path
from typing import Final, final

__all__ = [
    "__version__",
    "_TEST_HOOKS",
    "EXIT_RESTART",
    "EXIT_STOP",
    "_Checkpointer",
    "_SaveHandle",
    "CkptError",
    "StoreError",
    "CorruptCheckpoint",
    "StateMismatch",
    "ArenaFull",
    "AgentUnavailable",
    "NoCheckpoint",
    "CheckpointerClosed",
    "ConfigError",
]

__version__: Final[str]
_TEST_HOOKS: Final[bool]
EXIT_RESTART: Final[int]
EXIT_STOP: Final[int]

#: `(name, dtype, shape, addr, device)`; device -1 is host memory, n is cuda:n.
_Tensor = tuple[str, str, tuple[int, ...], int, int]

class CkptError(Exception): ...
class StoreError(CkptError): ...
class CorruptCheckpoint(CkptError): ...
class StateMismatch(CkptError): ...
class ArenaFull(CkptError): ...
class AgentUnavailable(CkptError): ...
class NoCheckpoint(CkptError): ...
class ConfigError(CkptError, ValueError): ...
class CheckpointerClosed(CkptError): ...

@final
class _SaveHandle:
    def wait(self) -> None: ...
    def done(self) -> bool: ...
    def timings(self) -> tuple[int, int, int | None] | None: ...
    @property
    def step(self) -> int: ...

@final
class _Checkpointer:
    def __new__(
        cls,
        job: str,
        *,
        store: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        socket: str | os.PathLike[str] | None = None,
        slots: int | None = None,
        compression: str = "none",
        arena_dir: str | os.PathLike[str] | None = None,
        chunk_size: int | None = None,
        commit_timeout: float | None = None,
        strict_restore: bool = False,
        on_resize: str | None = None,
        parallel: str | None = None,
        size_hint: int | None = None,
    ) -> _Checkpointer: ...
    def save(
        self,
        tensors: list[_Tensor],
        step: int,
        metadata: bytes,
        stream: int | None = None,
        *,
        keepalive: object = None,
    ) -> _SaveHandle: ...
    def load(
        self,
        tensors: list[_Tensor],
        step: int | None = None,
        stream: int | None = None,
        check: Callable[[int, bytes, list[tuple[str, str, tuple[int, ...]]]], list[str]] | None = None,
    ) -> tuple[int, bytes, bool]: ...
    def describe(
        self, step: int | None = None
    ) -> tuple[int, list[tuple[str, str, tuple[int, ...]]], bytes]: ...
    def fence(self, stream: int | None = None) -> None: ...
    def latest_step(self) -> int | None: ...
    def stats(self) -> tuple[int, int, float]: ...
    @property
    def arena_ready(self) -> bool: ...
    def wait_all(self) -> None: ...
    def close(self, *, keep_arena: bool = False) -> None: ...
    def heartbeat(self, step: int, phase: str = "step") -> int | None: ...
    def wait_snapshot_request(self, timeout: float) -> int | None: ...
    def take_restore_order(self) -> tuple[int, int] | None: ...
    @property
    def stop_requested(self) -> str | None: ...
    @property
    def snapshot_requested(self) -> int | None: ...
    @property
    def mode(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    @property
    def arena_path(self) -> Path: ...
