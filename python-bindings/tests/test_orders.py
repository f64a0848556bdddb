"""Workers end on the agent's restart order, even when their main thread holds the GIL.

A real agent (no isolator) receives a fault drill (`ckptctl inject --xid 79`) and orders its
trainers to restart. A trainer whose main thread is stuck in a C call that holds the GIL (as one
blocked in a collective, or in a long kernel launch) is ended by the library's own thread after
CKPTD_RESTART_GRACE with ckptd.EXIT_RESTART; a trainer still training (calling `fence` every
step) is ended at its next call, long before its grace runs out; its restarted process is not
ended again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ckptd

from .conftest import Agent

TRAINER = r"""
import ctypes, sys, time
import numpy as np
import ckptd

socket, mode = sys.argv[1], sys.argv[2]
ck = ckptd.Checkpointer("orders", socket=socket, rank=0, world_size=1)
w = {"w": np.arange(1000, dtype=np.float32)}
if mode == "restarted":
    step = ck.load(w)
    print(f"loaded {step} {ck.last_load_from_memory}", flush=True)
    time.sleep(120)
ck.save(w, 1).wait()
print("ready", flush=True)
if mode == "gil":
    # A C call that keeps the GIL (PyDLL does not release it): no Python code runs from here on.
    ctypes.PyDLL(None).sleep(120)
else:
    for step in range(2, 100000):
        ck.fence()
        time.sleep(0.01)
"""


def start(tmp_path: Path, agent: Agent, mode: str, grace: str) -> subprocess.Popen[str]:
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    return subprocess.Popen(
        [sys.executable, str(script), agent.socket, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "CKPTD_RESTART_GRACE": grace},
    )


def wait_line(p: subprocess.Popen[str], prefix: str) -> str:
    assert p.stdout is not None
    while line := p.stdout.readline():
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"trainer ended before printing {prefix!r}: {p.stderr.read() if p.stderr else ''}")


@pytest.fixture
def drill_agent(tmp_path: Path) -> Agent:
    kmsg = tmp_path / "kmsg"
    kmsg.write_text("")
    return Agent(tmp_path, "orders", "--kmsg", str(kmsg), "--no-ib", "--no-nvml", "--allow-inject", "--world-size", "1")


def inject(agent: Agent) -> None:
    out = agent.ctl("inject", "--xid", "79", "--socket", agent.socket)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_trainer_holding_the_gil_is_ended_by_the_librarys_own_thread(tmp_path: Path, drill_agent: Agent) -> None:
    p = start(tmp_path, drill_agent, "gil", "0.5")
    try:
        wait_line(p, "ready")
        inject(drill_agent)
        rc = p.wait(timeout=120)
        err = p.stderr.read() if p.stderr else ""
        assert rc == ckptd.EXIT_RESTART, err
        assert "after waiting" in err and "step 1" in err, err

        # The launcher's restart: the order is news to it, it restores step 1 from memory and is
        # not ended (it would be within half a second).
        q = start(tmp_path, drill_agent, "restarted", "0.5")
        try:
            assert wait_line(q, "loaded") == "loaded 1 True"
            time.sleep(2)
            assert q.poll() is None, q.stderr.read() if q.stderr else ""
        finally:
            q.kill()
            q.wait()
    finally:
        p.kill()
        p.wait()
        drill_agent.stop()


def test_a_training_worker_ends_at_its_next_call_not_after_its_grace(tmp_path: Path, drill_agent: Agent) -> None:
    p = start(tmp_path, drill_agent, "train", "3600")
    try:
        wait_line(p, "ready")
        inject(drill_agent)
        rc = p.wait(timeout=120)
        err = p.stderr.read() if p.stderr else ""
        assert rc == ckptd.EXIT_RESTART, err
        assert "at its next call into ckptd" in err, err
    finally:
        p.kill()
        p.wait()
        drill_agent.stop()
