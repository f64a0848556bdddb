"""Shared fixtures: every test gets its own store directory, arena directory and job name."""

from __future__ import annotations

import json
import os
import re
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
    """A helper script running in its own process, speaking one JSON object per stdout line
    (with ``stdin=True``, :meth:`send` writes lines to it)."""

    def __init__(self, script: str, *args: str, env: dict[str, str] | None = None, stdin: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / script), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
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

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

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


REPO = HERE.parents[1]

SHARD_NAME = re.compile(r"rank-(0|[1-9][0-9]*)(\.[0-9a-f]{16})?\.ckpt")


def shard_file(step_dir: Path, rank: int) -> Path:
    """Rank `rank`'s shard in a `file://` step directory: `rank-<r>.<tag>.ckpt`, the tag chosen by its writer."""
    found = [p for p in step_dir.iterdir() if (m := SHARD_NAME.fullmatch(p.name)) and int(m.group(1)) == rank]
    assert len(found) == 1, f"expected one shard of rank {rank} in {step_dir}: {sorted(p.name for p in step_dir.iterdir())}"
    return found[0]


def ckptd_binary(name: str) -> Path:
    """The `ckptd` or `ckptctl` binary: `$CKPTD_BIN_DIR/<name>`, else the workspace's debug build."""
    directory = Path(os.environ.get("CKPTD_BIN_DIR", REPO / "target" / "debug"))
    path = directory / name
    if not path.exists():
        pytest.fail(f"{path} does not exist: build it with `cargo build -p ckptd` or run `bash scripts/test.sh`")
    return path


class Agent:
    """A real `ckptd agent` process on a Unix socket in the test's directory."""

    def __init__(self, tmp: Path, job: str, *extra: str) -> None:
        import socket as sock

        self.socket = str(tmp / "agent.sock")
        self.store = (tmp / "agent-store").as_uri()
        self.job = job
        s = sock.socket()
        s.bind(("127.0.0.1", 0))
        self.metrics_addr = f"127.0.0.1:{s.getsockname()[1]}"
        s.close()
        self.log = tmp / "agent.log"
        self.proc = subprocess.Popen(
            [
                str(ckptd_binary("ckptd")), "agent", "--socket", self.socket, "--store", self.store,
                "--job", job, "--arena-dir", str(tmp / "agent-arena"), "--metrics-addr", self.metrics_addr,
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("w"),
            env={**os.environ, "CKPTD_LOG": "ckptd=info"},
        )
        import socket as sock2
        import time

        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                c = sock2.socket(sock2.AF_UNIX)
                c.connect(self.socket)
                c.close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("agent never listened") from None
                time.sleep(0.02)

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(ckptd_binary("ckptctl")), *args], capture_output=True, text=True, timeout=timeout, check=False
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: graceful
            self.proc.wait(timeout=120)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path, "crash")
    yield a
    a.stop()
