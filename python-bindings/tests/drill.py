"""The recovery drill: a real torch.distributed job, a real fault, automatic recovery, measured.

On 127.0.0.1 only: two "pods", each a `ckptd agent` (its own arena directory and node name) and a
`torchrun --nnodes 2 --nproc-per-node 2` (c10d rendezvous, gloo on CPU) running
`drill_train.py`; with `isolator`, a `ckptd isolator` against kmock (a Kubernetes API emulator)
that holds the nodes and pods. Scenarios:

- ``xid``: ``ckptctl inject --xid 79`` on pod B. The isolator cordons and taints B's node, records
  an Event and deletes B's pod; the harness plays the training operator: it ends pod B (SIGTERM,
  as a pod deletion does) and starts B' (a fresh agent and arena, a new node name). Every worker
  restarts and resumes from one committed step: pod A's from memory, B' from storage.
- ``hang``: one worker of pod B is stopped (SIGSTOP). Its agent reports a hang, the isolator
  orders a restart; the stopped worker is ended by its agent (SIGKILL, the last resort), the
  others by their library; both launchers restart their workers, which resume from memory.
- ``local``: agents without an isolator; a local fatal fault (XID 79) on pod B. Pod B's agent
  restarts its own workers; pod A's workers see their collective fail and are restarted by their
  launcher; every rank resumes from one committed step.

Every scenario ends with the job's final weights and optimizer state compared bitwise with an
uninterrupted run of the same job. The result (a JSON object) holds the recovery timeline: fault →
detected → isolated → workers exited → restarted → rendezvous → restored → first step done.

Run alone: ``python drill.py --scenario xid`` (needs the `ckptd`/`ckptctl` binaries, see
``CKPTD_BIN_DIR``, and for ``xid``/``hang`` kmock). ``test_drill.py`` runs it under pytest.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KMOCK_SERVER = REPO / "sidecar" / "tests" / "support" / "kmock_server.py"
TOKEN = "drill-token-0123456789abcdef"
JOB = "drill"
NAMESPACE = "train"
#: The longest the harness waits for anything; a safety net, never a measurement.
PATIENCE = 240.0

STEPS = 48
SAVE_EVERY = 4
STEP_SLEEP = 0.1
#: The fault is injected once this step is committed.
FAULT_AFTER = 16


def binary(name: str) -> Path:
    directory = Path(os.environ.get("CKPTD_BIN_DIR", REPO / "target" / "debug"))
    path = directory / name
    if not path.exists():
        raise SystemExit(f"{path} does not exist: build it with `cargo build -p ckptd --features server`")
    return path


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def wait_for(what: str, check: Callable[[], Any], limit: float = PATIENCE, poll: float = 0.05) -> Any:
    deadline = time.monotonic() + limit
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"drill: gave up waiting for {what}")
        time.sleep(poll)


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z")


def log_times(path: Path, needle: str) -> list[float]:
    """Wall-clock times of the log lines of `path` that contain `needle` (tracing's UTC stamps)."""
    try:
        return log_times_of(path.read_text(errors="replace").splitlines(), needle)
    except FileNotFoundError:
        return []


def log_times_of(lines: list[str], needle: str) -> list[float]:
    out = []
    for line in lines:
        m = _STAMP.match(re.sub(r"\x1b\[[0-9;]*m", "", line))
        if m and needle in line:
            stamp = m.group(1)
            if "." in stamp:
                head, frac = stamp.split(".")
                stamp = f"{head}.{frac[:6]}"
                fmt = "%Y-%m-%dT%H:%M:%S.%f"
            else:
                fmt = "%Y-%m-%dT%H:%M:%S"
            dt = datetime.datetime.strptime(stamp, fmt).replace(tzinfo=datetime.timezone.utc)
            out.append(dt.timestamp())
    return out


def log_ranks(path: Path, needle: str) -> list[tuple[float, int]]:
    """(time, rank) of the log lines of `path` that contain `needle` and a `rank=` field."""
    out = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        if needle not in line:
            continue
        m = re.search(r"\brank=(\d+)", line)
        times = log_times_of([line], needle)
        if m and times:
            out.append((times[0], int(m.group(1))))
    return out


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, sig: int = signal.SIGTERM, wait: float = 30) -> None:
        if self.alive():
            self.signal_group(sig)
            try:
                self.popen.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.popen.wait(timeout=30)
        # The launcher's workers are in its process group: none may outlive the drill.
        self.signal_group(signal.SIGKILL)

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""


def spawn(name: str, args: list[str], log: Path, env: dict[str, str] | None = None, **kw: Any) -> Proc:
    f = log.open("ab")
    popen = subprocess.Popen(
        args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
        start_new_session=True, **kw,
    )
    f.close()
    return Proc(name, popen, log)


@dataclass
class Pod:
    name: str
    node: str
    ranks: str
    agent: Proc
    socket: Path
    launcher: Proc | None = None


@dataclass
class Drill:
    scenario: str
    work: Path
    python: str = sys.executable
    procs: list[Proc] = field(default_factory=list)
    kmock_url: str | None = None
    isolator_url: str | None = None
    rdzv_port: int = 0
    rdzv_store: Any = None
    timeline: dict[str, float] = field(default_factory=dict)

    # -- infrastructure ------------------------------------------------------------------------

    @property
    def store(self) -> str:
        return (self.work / "store").as_uri()

    def start_kmock(self) -> None:
        log = self.work / "kmock.log"
        p = subprocess.Popen(
            [self.python, str(KMOCK_SERVER), "--nodes", "3", "--pods-namespace", NAMESPACE],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
            start_new_session=True,
        )
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line.startswith("KMOCK_URL="):
            raise AssertionError(f"kmock did not start: {log.read_text()}")
        self.kmock_url = line.strip().split("=", 1)[1]
        self.procs.append(Proc("kmock", p, log))  # type: ignore[arg-type]

    def kube(self, path: str) -> Any:
        assert self.kmock_url
        try:
            with urllib.request.urlopen(f"{self.kmock_url}{path}", timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def start_isolator(self) -> None:
        token = self.work / "token"
        token.write_text(TOKEN + "\n")
        log = self.work / "isolator.log"
        p = spawn(
            "isolator",
            [
                str(binary("ckptd")), "isolator", "--listen", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0",
                "--token-file", str(token), "--kube-url", str(self.kmock_url), "--max-isolated", "2",
                "--max-isolated-fraction", "1", "--snapshot-timeout", "3s",
            ],
            log,
            env={"CKPTD_LOG": "info"},
        )
        # The isolator prints its addresses on stdout, which `spawn` sent to the log.
        line = wait_for("the isolator's addresses", lambda: re.search(r"grpc=(\S+)", p.tail(100_000)), limit=60)
        self.isolator_url = f"http://{line.group(1)}"
        self.procs.append(p)

    def start_rendezvous(self) -> None:
        """The rendezvous endpoint both launchers use (a stable service, as in a cluster): a
        TCPStore in this process, so that no pod's death takes the rendezvous with it."""
        import torch.distributed as dist

        self.rdzv_port = free_port()
        self.rdzv_store = dist.TCPStore("127.0.0.1", self.rdzv_port, is_master=True, wait_for_workers=False)

    def start_agent(self, name: str, node: str, ranks: str, *, extra: Sequence[str] = ()) -> Pod:
        home = self.work / name
        home.mkdir()
        sock = home / "agent.sock"
        kmsg = home / "kmsg"
        kmsg.write_text("")
        args = [
            str(binary("ckptd")), "agent", "--socket", str(sock), "--store", self.store, "--job", JOB,
            "--arena-dir", str(home / "arena"), "--world-size", "4", "--ranks", ranks,
            "--node", node, "--pod", name, "--namespace", NAMESPACE, "--kmsg", str(kmsg), "--kmsg-poll", "50ms",
            "--no-ib", "--no-nvml", "--allow-inject", "--restart-kill-after", "4s", "--commit-timeout", "60s",
            *extra,
        ]
        if self.isolator_url:
            args += ["--isolator", self.isolator_url, "--isolator-token-file", str(self.work / "token")]
        agent = spawn(f"agent-{name}", args, home / "agent.log", env={"CKPTD_LOG": "ckptd=info"})
        self.procs.append(agent)

        def listening() -> bool:
            if not agent.alive():
                raise AssertionError(f"agent {name} exited: {agent.tail()}")
            c = socket.socket(socket.AF_UNIX)
            try:
                c.connect(str(sock))
                return True
            except OSError:
                return False
            finally:
                c.close()

        wait_for(f"agent {name} to listen", listening, limit=60)
        return Pod(name, node, ranks, agent, sock)

    def start_launcher(self, pod: Pod) -> None:
        env = {
            "CKPTD_SOCKET": str(pod.socket),
            "OMP_NUM_THREADS": "1",
            "CKPTD_LOG": "ckptd=warn",
            "PYTHONUNBUFFERED": "1",
            # A fresh worker store per rendezvous round: the shared one keeps the previous
            # round's gloo addresses, and restarted workers connect to dead peers.
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        }
        conf = "is_host=false,keep_alive_interval=1,keep_alive_max_attempt=3,join_timeout=180"
        args = [
            self.python, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{self.rdzv_port}", "--rdzv-id", JOB,
            "--rdzv-conf", conf, "--max-restarts", "10", "--monitor-interval", "0.2",
            "--local-addr", "127.0.0.1",
            str(HERE / "drill_train.py"), str(self.work / "events"), str(self.work / "final"),
            str(STEPS), str(SAVE_EVERY), str(STEP_SLEEP),
        ]
        pod.launcher = spawn(f"torchrun-{pod.name}", args, self.work / pod.name / "torchrun.log", env=env)
        self.procs.append(pod.launcher)

    def ctl(self, pod: Pod, *args: str) -> str:
        out = subprocess.run(
            [str(binary("ckptctl")), *args, "--socket", str(pod.socket)], capture_output=True, text=True, timeout=60,
        )
        if out.returncode != 0:
            raise AssertionError(f"ckptctl {' '.join(args)} failed: {out.stdout}{out.stderr}")
        return out.stdout

    # -- observations --------------------------------------------------------------------------

    def committed(self) -> list[int]:
        root = self.work / "store" / JOB
        if not root.exists():
            return []
        return sorted(int(p.parent.name.split("-")[1]) for p in root.glob("step-*/MANIFEST"))

    def events(self) -> list[dict[str, Any]]:
        out = []
        for f in sorted((self.work / "events").glob("rank-*.jsonl")):
            for line in f.read_text().splitlines():
                if line.strip():
                    out.append(json.loads(line))
        return out

    def worker_pids(self, pod: Pod) -> list[int]:
        """The live worker processes of `pod`'s newest attempt."""
        ranks = range(0, 2) if pod.ranks == "0-1" else range(2, 4)
        latest: dict[int, dict[str, Any]] = {}
        for e in self.events():
            if e["event"] == "start" and e["rank"] in ranks:
                latest[e["rank"]] = e
        return [e["pid"] for e in latest.values()]

    # -- the run -------------------------------------------------------------------------------

    def check_launchers(self, pods: list[Pod]) -> None:
        for p in pods:
            if p.launcher is not None and p.launcher.popen.poll() not in (None, 0):
                raise AssertionError(f"{p.launcher.name} failed ({p.launcher.popen.returncode}):\n{p.launcher.tail()}")

    def finish(self, pods: list[Pod]) -> None:
        def done() -> bool:
            self.check_launchers(pods)
            return all(p.launcher is not None and p.launcher.popen.poll() == 0 for p in pods)

        wait_for("the job to finish", done, poll=0.2)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop(signal.SIGTERM, wait=20)


def baseline(work: Path, python: str = sys.executable) -> Path:
    """The uninterrupted run (4 workers, one launcher, embedded ckptd on its own store); its
    final states, one file per rank."""
    (work / "events").mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CKPTD_STORE": (work / "store").as_uri(),
           "CKPTD_ARENA_DIR": str(work / "arena")}
    env.pop("CKPTD_SOCKET", None)
    out = subprocess.run(
        [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         str(HERE / "drill_train.py"), str(work / "events"), str(work / "final"),
         str(STEPS), str(SAVE_EVERY), "0"],
        env=env, capture_output=True, text=True, timeout=PATIENCE,
    )
    if out.returncode != 0:
        raise AssertionError(f"baseline run failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    return work / "final"


def same_state(a: Path, b: Path) -> list[str]:
    """Ranks whose final model or optimizer state differs bitwise between runs `a` and `b`."""
    import torch

    def flat(x: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(x, dict):
            return {k: v for key, val in x.items() for k, v in flat(val, f"{prefix}/{key}").items()}
        if isinstance(x, (list, tuple)):
            return {k: v for i, val in enumerate(x) for k, v in flat(val, f"{prefix}/{i}").items()}
        return {prefix: x}

    bad = []
    for r in range(4):
        x = flat(torch.load(a / f"rank-{r}.pt", weights_only=True))
        y = flat(torch.load(b / f"rank-{r}.pt", weights_only=True))
        same = x.keys() == y.keys() and all(
            (torch.equal(x[k], y[k]) and x[k].dtype == y[k].dtype) if isinstance(x[k], torch.Tensor) else x[k] == y[k]
            for k in x
        )
        if not same:
            bad.append(f"rank {r}")
    return bad


def run(scenario: str, work: Path, reference: Path | None = None) -> dict[str, Any]:
    """Runs one scenario in `work`; returns its result (see the module documentation)."""
    if scenario not in ("xid", "hang", "local"):
        raise ValueError(f"unknown scenario {scenario}")
    if reference is None:
        reference = baseline(work / "baseline")
    d = Drill(scenario, work / scenario)
    d.work.mkdir(parents=True)
    (d.work / "events").mkdir()
    try:
        return _run(d, reference)
    except BaseException:
        print(f"drill {scenario} failed; its logs are in {d.work}", file=sys.stderr)
        raise
    finally:
        d.close()


def _run(d: Drill, reference: Path) -> dict[str, Any]:
    with_isolator = d.scenario in ("xid", "hang")
    if with_isolator:
        d.start_kmock()
        d.start_isolator()
    d.start_rendezvous()
    hang = ["--hang-floor", "3s", "--hang-init", "60s", "--hang-load", "60s", "--hang-save", "60s"]
    a = d.start_agent("train-0", "node-0", "0-1", extra=hang)
    b = d.start_agent("train-1", "node-1", "2-3", extra=hang)
    pods = [a, b]
    for p in pods:
        d.start_launcher(p)

    def fault_point() -> bool:
        d.check_launchers(pods)
        return any(s >= FAULT_AFTER for s in d.committed())

    wait_for(f"step {FAULT_AFTER} to commit", fault_point, poll=0.1)
    fault = time.time()
    t = d.timeline
    t["fault"] = fault

    if d.scenario in ("xid", "local"):
        d.ctl(b, "inject", "--xid", "79")
    else:
        victim = max(d.worker_pids(b))
        os.kill(victim, signal.SIGSTOP)

    if d.scenario == "xid":
        # The isolator acts on node-1 in the cluster; the harness is the training operator.
        def isolated() -> bool:
            n = d.kube("/api/v1/nodes/node-1")
            pod_gone = d.kube(f"/api/v1/namespaces/{NAMESPACE}/pods/train-1") is None
            spec = (n or {}).get("spec", {})
            tainted = any(x.get("key") == "ckptd.io/unhealthy" for x in spec.get("taints", []) or [])
            return bool(spec.get("unschedulable")) and tainted and pod_gone

        wait_for("node-1 to be isolated", isolated, poll=0.05)
        t["isolated"] = time.time()
        events = d.kube("/api/v1/events") or {}
        if not any((e.get("involvedObject") or {}).get("name") == "node-1" for e in events.get("items", [])):
            raise AssertionError(f"no Event on node-1: {events}")
        # Pod deletion: SIGTERM to the pod's containers, then its replacement on another node.
        assert b.launcher is not None
        b.launcher.stop(signal.SIGTERM, wait=10)
        b.agent.stop(signal.SIGTERM, wait=10)
        t["replaced"] = time.time()
        b2 = d.start_agent("train-1b", "node-2", "2-3", extra=hang)
        d.start_launcher(b2)
        pods = [a, b2]
        survivors = [a]
    else:
        survivors = [a, b]

    d.finish(pods)
    done = time.time()

    # What happened, from the workers' own events and the agents' logs.
    ev = d.events()
    after = [e for e in ev if e["t"] >= fault]
    restored = [e for e in after if e["event"] == "restored"]
    by_rank: dict[int, dict[str, Any]] = {}
    for e in restored:
        by_rank[e["rank"]] = e  # the newest restore of each rank
    if sorted(by_rank) != [0, 1, 2, 3]:
        raise AssertionError(f"not every rank restored after the fault: {sorted(by_rank)}; events {after[:40]}")
    steps = {e["step"] for e in by_rank.values()}
    if len(steps) != 1:
        raise AssertionError(f"ranks resumed from different steps: {by_rank}")
    step = steps.pop()
    if step not in d.committed():
        raise AssertionError(f"resumed from step {step}, which is not committed ({d.committed()})")
    memory = {r: e["memory"] for r, e in by_rank.items()}
    survivor_ranks = {r for p in survivors for r in ((0, 1) if p.ranks == "0-1" else (2, 3))}
    if not all(memory[r] for r in survivor_ranks):
        raise AssertionError(f"a rank of a surviving pod did not restore from memory: {memory}")
    if d.scenario == "xid" and any(memory[r] for r in (2, 3)):
        raise AssertionError(f"the replaced pod's ranks cannot have restored from memory: {memory}")
    bad = same_state(reference, d.work / "final")
    if bad:
        raise AssertionError(f"final state differs bitwise from the uninterrupted run on {bad}")

    # The timeline: each phase ends when the slowest rank (or pod) is through it.
    logs = [p.agent.log for p in pods] + ([b.agent.log] if b not in pods else [])
    detected = [x for log in logs for x in log_times(log, "health fault") if x >= fault]
    if detected:
        t["detected"] = min(detected)
    ordered = [x for log in logs for x in log_times(log, "restore ordered") if x >= fault]
    if ordered:
        t["ordered"] = min(ordered)
    # A worker of the old attempt is gone when its agent saw its session end; the replaced pod's
    # agent was ended with it, so its workers were gone when the harness replaced the pod.
    exited: dict[int, float] = {}
    for log in logs:
        for x, r in log_ranks(log, "trainer detached"):
            if fault <= x <= by_rank[r]["t"]:
                exited[r] = min(x, exited.get(r, x))
    for r in range(4):
        if r not in exited and "replaced" in t:
            exited[r] = t["replaced"]
    t["workers_exited"] = max(exited.values())
    restarted, rendezvous, first = [], [], []
    for r, res in by_rank.items():
        mine = [e for e in after if e["rank"] == r and e["t"] <= res["t"]]
        restarted.append(max(e["t"] for e in mine if e["event"] == "start"))
        rendezvous.append(max(e["t"] for e in mine if e["event"] == "rendezvous"))
        first.append(min(e["t"] for e in after if e["rank"] == r and e["event"] == "step" and e["t"] >= res["t"]))
    t["restarted"] = max(restarted)
    t["rendezvous"] = max(rendezvous)
    t["restored"] = max(e["t"] for e in by_rank.values())
    t["first_step"] = max(first)
    t["done"] = done
    phases = {k: round(v - fault, 3) for k, v in sorted(t.items(), key=lambda kv: kv[1])}
    return {
        "scenario": d.scenario,
        "resumed_step": step,
        "memory": {str(r): m for r, m in sorted(memory.items())},
        "load_s": {str(r): round(e["load_s"], 3) for r, e in sorted(by_rank.items())},
        "since_fault_s": phases,
        "mttr_s": phases.get("first_step"),
        "bitwise_identical": True,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", action="append", choices=["xid", "hang", "local"])
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ckptd-drill-"))
    ref = baseline(work / "baseline")
    results = [run(s, work, ref) for s in (args.scenario or ["xid", "hang", "local"])]
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
