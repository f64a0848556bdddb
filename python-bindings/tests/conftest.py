"""Shared fixtures: every test gets its own store directory, arena directory and job name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ckptd

HERE = Path(__file__).resolve().parent


@pytest.fixture
def store(tmp_path: Path) -> str:
    return (tmp_path / "store").as_uri()


@pytest.fixture
def arena(tmp_path: Path) -> Path:
    return tmp_path / "arena"


@pytest.fixture
def job() -> str:
    return f"job-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_ck(store: str, arena: Path, job: str) -> Iterator[Callable[..., ckptd.Checkpointer]]:
    """Opens checkpointers on the test's store (closed at teardown); keyword arguments override."""
    opened: list[ckptd.Checkpointer] = []

    def make(**kw: Any) -> ckptd.Checkpointer:
        args: dict[str, Any] = {"store": store, "arena_dir": arena}
        args.update(kw)
        ck = ckptd.Checkpointer(args.pop("job", job), **args)
        opened.append(ck)
        return ck

    yield make
    for ck in opened:
        try:
            ck.close()
        except ckptd.CkptError:
            pass


@pytest.fixture
def ck(make_ck: Callable[..., ckptd.Checkpointer]) -> ckptd.Checkpointer:
    return make_ck()


def s3_store_url() -> str:
    """A fresh prefix on the loopback S3 server, or a failure that says how to start it."""
    if os.environ.get("CKPTD_SKIP_S3_TESTS") == "1":
        pytest.skip("CKPTD_SKIP_S3_TESTS=1")
    bucket = os.environ.get("CKPTD_TEST_S3_BUCKET")
    if not os.environ.get("CKPTD_TEST_S3_ENDPOINT") or not bucket:
        pytest.fail(
            "CKPTD_TEST_S3_ENDPOINT / CKPTD_TEST_S3_BUCKET are not set: run the suite through "
            "`bash scripts/test.sh` (it starts a loopback S3 server), or set CKPTD_SKIP_S3_TESTS=1"
        )
    return f"s3://{bucket}/pytest-{uuid.uuid4().hex}"


class Child:
    """A helper script running in its own process, speaking one JSON object per stdout line."""

    def __init__(self, script: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.events: list[dict[str, Any]] = []

    def next_event(self) -> dict[str, Any] | None:
        """The next event, or None at end of output."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            return None
        event: dict[str, Any] = json.loads(line)
        self.events.append(event)
        return event

    def until(self, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        while (event := self.next_event()) is not None:
            if pred(event):
                return event
        raise AssertionError(f"{self.describe()} ended without the expected event")

    def finish(self, timeout: float = 240) -> list[dict[str, Any]]:
        """Reads the rest of the output and checks that the process exited 0."""
        while self.next_event() is not None:
            pass
        rc = self.proc.wait(timeout=timeout)
        assert rc == 0, f"{self.describe()} exited {rc}"
        return self.events

    def describe(self) -> str:
        err = self.proc.stderr.read() if self.proc.stderr is not None and self.proc.poll() is not None else ""
        return f"{self.proc.args[1:]} (stderr: {err[-3000:]})"

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL
        self.proc.wait(timeout=30)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
