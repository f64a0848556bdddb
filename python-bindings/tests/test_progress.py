"""Progress without manual calls, and one global step at resume.

Against a real agent with hang budgets of a few seconds: the README's training loop (no
heartbeat calls) runs for longer than every budget and is never reported hung, while a SIGSTOPped
trainer is; a restore that stalls is reported in phase checkpoint-load. In a real two-process
gloo group, a rank whose view of the store is older than its peer's restores the peer's newer
committed step."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ckptd

from .conftest import Agent, Child

torch = pytest.importorskip("torch")

import ckptd.torch as ct  # noqa: E402

# Few enough seconds that the runs below outlast them.
BUDGET = "4s"
# Steps of the README loop that take at least 10 ms each: at least 5 s, longer than BUDGET.
LONG_RUN = 500


def health(agent: Agent) -> dict[str, Any]:
    r = agent.ctl("health", "--socket", agent.socket, "--json")
    assert r.returncode == 0, r.stderr + r.stdout
    status: dict[str, Any] = json.loads(r.stdout)
    return status


def hangs(agent: Agent) -> list[dict[str, Any]]:
    return [f["finding"] for f in health(agent)["active_faults"] if f["finding"]["kind"] == "hang"]


def wait_for_hang(agent: Agent, what: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + 120  # generous: only a ceiling, nothing measures how fast
    while True:
        found = [f for f in hangs(agent) if what(f)]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no such hang reported; health: {health(agent)}"
        time.sleep(0.2)


def quiet_agent(tmp_path: Path, *budgets: str) -> Agent:
    return Agent(tmp_path, "my-job", "--no-kmsg", "--no-nvml", "--no-ib", "--progress-poll", "100ms", *budgets)


def readme_loop(agent: Agent, *args: str) -> Child:
    return Child("readme_helper.py", *args, env={"CKPTD_SOCKET": agent.socket})


def test_the_readme_loop_is_never_a_hang_and_a_stopped_trainer_is(tmp_path: Path) -> None:
    agent = quiet_agent(tmp_path, "--hang-init", BUDGET, "--hang-floor", BUDGET)
    try:
        # A first run from scratch, then a second that restores it (from the agent's memory) and
        # keeps training: each outlasts the init and step budgets.
        first = readme_loop(agent, "--steps", str(LONG_RUN)).finish()
        assert first[-1] == {"step": LONG_RUN}
        second = readme_loop(agent, "--steps", "1000000")
        assert second.until(lambda e: "restored" in e) == {"restored": LONG_RUN}
        second.until(lambda e: e.get("step") == 2 * LONG_RUN)
        assert hangs(agent) == [], "the README loop was reported hung"

        os.kill(second.proc.pid, signal.SIGSTOP)
        finding = wait_for_hang(agent, lambda f: f["source"] == "progress")
        second.proc.kill()
        while second.next_event() is not None:
            pass
        second.proc.wait(timeout=30)
        assert finding["rank"] == 0
        m = re.search(r"in phase (\S+) at step (\d+)", finding["evidence"])
        assert m is not None, finding["evidence"]
        # The step reported is the trainer's own (optimizer steps counted on from the restored
        # step), at most a rate-limit interval behind the last step it printed (or one ahead: the
        # hook reports a step before the loop prints it).
        last = max(e["step"] for e in second.events if "step" in e)
        assert m.group(1) == "step"
        assert last - 100 < int(m.group(2)) <= last + 1, (finding["evidence"], last)
    finally:
        agent.stop()


def test_a_stalled_restore_is_reported_in_phase_checkpoint_load(tmp_path: Path) -> None:
    # Only the load budget is short: a hang found can only be one in checkpoint-load.
    agent = quiet_agent(tmp_path, "--hang-load", "2s", "--hang-init", "10m", "--hang-floor", "10m")
    try:
        assert readme_loop(agent, "--steps", "100").finish()[-1] == {"step": 100}
        stalled = readme_loop(agent, "--steps", "200", "--stall-in-restore")
        stalled.until(lambda e: e.get("stalled") is True)
        finding = wait_for_hang(agent, lambda f: f["source"] == "progress")
        stalled.kill()
        assert "in phase checkpoint-load" in finding["evidence"], finding["evidence"]
    finally:
        agent.stop()


def test_a_lost_agent_does_not_break_the_training_loop(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    agent = quiet_agent(tmp_path)
    try:
        ck = ckptd.Checkpointer("my-job", socket=agent.socket)
    finally:
        agent.proc.kill()  # SIGKILL: the session breaks
        agent.proc.wait(timeout=30)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ct.fence_before_step(opt, ck)
    before = model.weight.detach().clone()
    for _ in range(5):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()  # its post-hook reports to an agent that is gone
        time.sleep(0.11)  # past the rate limit: every step tries to report
    assert not torch.equal(model.weight, before), "the optimizer steps did not run"
    err = capfd.readouterr().err
    assert err.count("cannot report progress to the agent") == 1, err
    with pytest.raises(ckptd.CkptError):
        ck.save(ct.capture(model, opt), 5).wait()  # the save itself says the agent is gone
    try:
        ck.close()
    except ckptd.CkptError:
        pass


def two_ranks(
    tmp_path: Path, job: str, store: str, rank0: tuple[str, ...] = (), rank1: tuple[str, ...] = ()
) -> list[Child]:
    """Ranks 0 and 1 of a gloo group restoring `job`, each with its own command-line extras."""
    rendezvous = str(tmp_path / f"rendezvous-{job}")
    arena = str(tmp_path / "restore-arena")
    common = ("--rendezvous", rendezvous, "--store", store, "--arena", arena, "--job", job)
    return [
        Child("agree_helper.py", "--rank", "0", *common, *rank0, stdin="--wait-go" in rank0),
        Child("agree_helper.py", "--rank", "1", *common, *rank1),
    ]


def captured(step: int, rank: int) -> dict[str, Any]:
    return ct.capture(extra={"w": torch.full((4,), float(step * 10 + rank))})


def test_ranks_with_different_views_restore_the_same_newest_step(
    tmp_path: Path, store: str, job: str, make_ck: Callable[..., ckptd.Checkpointer]
) -> None:
    # The job before its restart: two ranks commit step 3; rank 1 has written its shard of step
    # 6, rank 0 not yet.
    writers = [make_ck(rank=r, world_size=2, arena_dir=tmp_path / "writer-arena", commit_timeout=120) for r in (0, 1)]
    for h in [w.save(captured(3, r), 3) for r, w in enumerate(writers)]:
        h.wait()
    late = writers[1].save(captured(6, 1), 6)

    # The restart: rank 1 looks first and sees step 3 as the newest ...
    rank0, rank1 = two_ranks(tmp_path, job, store, rank0=("--wait-go",), rank1=("--report-collective",))
    assert rank1.until(lambda e: "contributed" in e) == {"contributed": 3}
    # ... then rank 0's last shard lands and step 6 is committed, and only then does rank 0 look.
    writers[0].save(captured(6, 0), 6).wait()
    late.wait()
    rank0.send("go")
    assert rank0.finish()[-1] == {"restored": 6, "w": [60.0] * 4}
    assert rank1.finish()[-1] == {"restored": 6, "w": [61.0] * 4}


def test_with_no_checkpoint_every_rank_raises_no_checkpoint(tmp_path: Path, store: str, job: str) -> None:
    events = [child.finish()[-1] for child in two_ranks(tmp_path, job, store)]
    assert all("no_checkpoint" in e for e in events), events
    assert events[0] == events[1]
