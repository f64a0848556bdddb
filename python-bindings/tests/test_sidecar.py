"""Sidecar mode from Python: the same Checkpointer against a real `ckptd agent` process. A
SIGKILLed torch run resumes bitwise identically from the agent's memory; a trainer killed right
after a blocking save still gets its step committed; snapshot-now is answered at a heartbeat and
from the background thread the optimizer hooks allow."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptd

from .conftest import Agent, Child

torch = pytest.importorskip("torch")

import ckptd.torch as ct  # noqa: E402

from .test_torch import assert_state_equal, reference  # noqa: E402, F401


def test_sigkill_then_resume_from_the_agents_memory_is_bitwise_identical(
    tmp_path: Path, reference: dict[str, Any], agent: Agent  # noqa: F811
) -> None:
    env = {"CKPTD_SOCKET": agent.socket}
    unused = str(tmp_path / "unused")  # sidecar mode: the agent owns the store and the arena
    first = Child("train_helper.py", "--store", "file:///nonexistent", "--arena", unused, "--job", "crash",
                  "--pause-at", "12", env=env)
    first.until(lambda e: "paused" in e)
    first.kill()
    losses = {e["step"]: e["loss"] for e in first.events if "step" in e}

    out = tmp_path / "final.pt"
    second = Child("train_helper.py", "--store", "file:///nonexistent", "--arena", unused, "--job", "crash",
                   "--resume", "--out", str(out), env=env)
    events = second.finish()
    assert events[0] == {"restored": 10, "from_memory": True}
    resumed = {e["step"]: e["loss"] for e in events if "step" in e}
    assert resumed[11] == losses[11] and resumed[12] == losses[12]
    losses.update(resumed)
    assert {int(k): v for k, v in reference["losses"].items()} == losses
    final = torch.load(out)
    assert_state_equal(reference["model"], final["model"])
    assert_state_equal(reference["optimizer"], final["optimizer"])
    assert not Path(unused).exists(), "sidecar mode made no arena of its own"


KILLED_AFTER_SAVE = """
import sys, time, numpy as np, ckptd
ck = ckptd.Checkpointer("crash", socket=sys.argv[1])
ck.save({"w": np.arange(1_000_000, dtype=np.float32) * 3, "step": 3}, 3, blocking=True)
print("saved", flush=True)
time.sleep(600)
"""


def test_trainer_killed_right_after_a_blocking_save_still_commits(agent: Agent) -> None:
    child = subprocess.Popen([sys.executable, "-c", KILLED_AFTER_SAVE, agent.socket], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "saved"
    child.kill()  # SIGKILL, right after save() returned
    child.wait(timeout=30)
    deadline = time.monotonic() + 120
    while (r := agent.ctl("verify", "--store", agent.store, "--job", "crash", "--step", "3")).returncode != 0:
        assert time.monotonic() < deadline, f"step 3 never verified: {r.stdout} {r.stderr}"
        time.sleep(0.1)
    ck = ckptd.Checkpointer("crash", socket=agent.socket)
    state = {"w": np.zeros(1_000_000, dtype=np.float32), "step": 0}
    assert ck.load(state) == 3
    assert ck.last_load_from_memory
    assert state["step"] == 3 and np.array_equal(state["w"], np.arange(1_000_000, dtype=np.float32) * 3)
    ck.close()


def snapshot(agent: Agent) -> dict[str, Any]:
    r = agent.ctl("snapshot", "--socket", agent.socket, "--timeout", "60s", "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    reply: dict[str, Any] = json.loads(r.stdout)
    return reply


def test_snapshot_now_is_taken_at_the_next_heartbeat(agent: Agent) -> None:
    ck = ckptd.Checkpointer("crash", socket=agent.socket)
    assert ck.mode == "sidecar"
    w = np.zeros(1000, dtype=np.float64)
    ck.register_snapshot(lambda: {"w": w})
    answered: list[int] = []
    stop = threading.Event()

    def train() -> None:
        step = 0
        while not stop.is_set():
            step += 1
            w[:] = step
            if ck.heartbeat(step):
                answered.append(step)
                ck.fence()  # the next iteration writes `w`
            time.sleep(0.01)

    t = threading.Thread(target=train)
    t.start()
    try:
        reply = snapshot(agent)
    finally:
        stop.set()
        t.join()
    [rank] = reply["ranks"]
    assert rank["taken"] and rank["step"] == answered[0]
    ck.wait_all()
    got = {"w": np.zeros(1000)}
    assert ck.load(got, answered[0]) == answered[0]
    assert (got["w"] == answered[0]).all()
    ck.close()


def test_snapshot_now_from_the_background_thread_outside_the_optimizer_step(agent: Agent) -> None:
    ck = ckptd.Checkpointer("crash", socket=agent.socket)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ct.fence_before_step(opt, ck)
    taken_by: list[str] = []

    def state() -> dict[str, Any]:
        taken_by.append(threading.current_thread().name)
        return ct.capture(model, opt)

    ck.register_snapshot(state)

    def one_step() -> None:
        opt.zero_grad()
        model(torch.randn(8, 64)).sum().backward()
        opt.step()

    assert not ck.heartbeat(1)  # the only heartbeat: optimizer steps count on from step 1
    one_step()  # step 2
    stop = threading.Event()

    def train() -> None:
        while not stop.is_set():
            one_step()

    t = threading.Thread(target=train)
    t.start()
    try:
        reply = snapshot(agent)
    finally:
        stop.set()
        t.join()
    # Taken at the trainer's step: the optimizer steps the hooks counted since the heartbeat.
    step = reply["ranks"][0]["step"]
    assert reply["ranks"][0]["taken"] and step >= 2
    assert taken_by == ["ckptd-snapshot"]
    ck.wait_all()
    # What was saved is one consistent state: restoring it and re-capturing gives the same bytes.
    fresh = torch.nn.Linear(64, 64)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    assert ct.restore(ck, fresh, fresh_opt) == step
    ck.close()


def test_unreachable_agent_raises_agent_unavailable_naming_the_socket(tmp_path: Path) -> None:
    missing = tmp_path / "no-agent.sock"
    with pytest.raises(ckptd.AgentUnavailable, match="no-agent.sock"):
        ckptd.Checkpointer("crash", socket=str(missing))


def test_heartbeat_phase_is_validated(agent: Agent) -> None:
    ck = ckptd.Checkpointer("crash", socket=agent.socket)
    with pytest.raises(ckptd.ConfigError, match="checkpoint-load"):
        ck.heartbeat(1, "lunch")
    assert not ck.heartbeat(1, "checkpoint-load")
    ck.close()


def test_embedded_heartbeat_is_a_no_op(make_ck: Any) -> None:
    ck = make_ck()
    assert ck.mode == "embedded"
    assert not ck.heartbeat(5)



def test_a_sidecar_save_reports_when_its_shard_and_commit_happened(agent: Agent) -> None:
    with ckptd.Checkpointer("crash", socket=agent.socket) as ck:
        h = ck.save({"w": np.arange(1000, dtype=np.float32)}, 3)
        h.wait()
        t = h.timings()
    assert t is not None, "a successful save has timings"
    # One rank: its agent committed the step itself.
    assert t.manifest_written_ns is not None
    assert 0 < t.shard_durable_ns <= t.manifest_written_ns
