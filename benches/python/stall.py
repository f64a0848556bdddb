#!/usr/bin/env python3
"""Trainer-side stall of ckptd (embedded mode) next to memcpy, torch.save and DCP async_save.

    python benches/python/stall.py --sizes 256MiB,1GiB --reps 3 --dir /data/scratch --out bench-out

This is a benchmark, not a test: it prints a markdown table and writes OUT/stall.json.

For every state size one training state is built: a small transformer-like MLP stack (float32
``Linear`` and ``LayerNorm`` weights and biases, a bfloat16 embedding table sized to reach the
requested bytes) and its ``torch.optim.Adam`` state (``exp_avg``, ``exp_avg_sq``, 0-dim ``step``
tensors), captured with ``ckptd.torch.capture`` (which adds the RNG states). Every system saves
exactly that dict, to the same ``--dir``.

Each system runs in its own child process (so that its peak RSS is its own) which measures:

* ``save_stall``: wall time of the call that the trainer blocks on (``ck.save``, ``dcp.async_save``,
  ``torch.save`` + fsync, ``copy_`` / ``np.copyto`` into preallocated buffers);
* ``copy_done`` (ckptd): from ``save`` until ``fence()`` returns, i.e. until the tensors may be
  written again;
* ``durable``: from the save call until the step is durable (``handle.wait()``, the DCP future);
* ``first_save_stall``: the first, unmeasured-elsewhere save (arena / staging buffers created);
* ``peak_rss_overhead``: VmHWM during the save phase minus VmRSS once the state exists (the
  high-water mark is reset with ``/proc/self/clear_refs`` after the state is allocated);
* ``loop_stall_per_save``: a real training loop (forward + backward on the model, Adam step,
  ``zero_grad``) of N steps, saving every K steps, timed with and without checkpointing in the same
  process (alternating order); (time with − time without) / saves. ckptd fences with
  ``ckptd.torch.fence_before_step``; DCP waits for the previous future before the next
  ``async_save``; torch.save is synchronous; memcpy copies into its buffers. Work still running
  when the last step returns is reported separately (``loop_drain``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
ALL_SYSTEMS = ("memcpy", "torch.save", "dcp", "dcp-cached", "ckptd", "ckptd-sidecar")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 256MiB, 1GiB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def fmt_size(n: float) -> str:
    for unit, f in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= f:
            v = n / f
            return f"{v:.0f} {unit}" if abs(v - round(v)) < 0.02 else f"{v:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    if abs(s) < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if abs(s) < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


# --------------------------------------------------------------------------------------------
# /proc helpers


def proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if v.strip().endswith("kB"):
                out[k] = int(v.split()[0]) * 1024
    return out


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def fs_of(path: str) -> tuple[str, str]:
    """(mount point, fs type) of the mount holding ``path``."""
    p = os.path.realpath(path)
    best = ("", "?")
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mnt, typ = parts[1], parts[2]
            if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, typ)
    return best


def machine_facts(args: argparse.Namespace) -> dict[str, Any]:
    import numpy
    import torch

    import ckptd

    mem = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            mem[k] = int(v.split()[0]) * 1024
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dir_mnt, dir_fs = fs_of(args.dir)
    arena_parent = os.path.dirname(args.arena_dir.rstrip("/")) or "/"
    arena_mnt, arena_fs = fs_of(arena_parent)
    native = ckptd._native.__file__
    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "mem_total_bytes": mem.get("MemTotal"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "train_threads": args.train_threads,
        "numpy": numpy.__version__,
        "ckptd": ckptd.__version__,
        "ckptd_native": native,
        "ckptd_native_bytes": os.path.getsize(native),
        "dir": os.path.realpath(args.dir),
        "dir_mount": dir_mnt,
        "dir_fstype": dir_fs,
        "arena_dir": args.arena_dir,
        "arena_mount": arena_mnt,
        "arena_fstype": arena_fs,
        "arena_is_tmpfs": arena_fs == "tmpfs",
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
    }


# --------------------------------------------------------------------------------------------
# The training state


def hidden_for(size: int) -> int:
    if size < 512 << 20:
        return 512
    if size < 2 << 30:
        return 1024
    return 2048


def build(size: int, tokens: int, seed: int = 0) -> tuple[Any, Any, Callable[[], None], Any]:
    """A model + Adam whose captured state is ~``size`` bytes; returns (model, opt, step_fn, batch)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    d = hidden_for(size)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(d)
            self.fc1 = nn.Linear(d, 4 * d)
            self.fc2 = nn.Linear(4 * d, d)

        def forward(self, x: Any) -> Any:
            return x + self.fc2(torch.relu(self.fc1(self.ln(x))))

    block_params = 8 * d * d + 4 * d + d + 2 * d
    block_bytes = 3 * 4 * block_params  # param + exp_avg + exp_avg_sq, float32
    layers = max(1, int(0.75 * size) // block_bytes)
    rest = size - layers * block_bytes - 3 * 4 * 2 * d
    vocab = max(16, rest // (3 * 2 * d))  # bfloat16 embedding + its two moments

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, d, dtype=torch.bfloat16)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln_f = nn.LayerNorm(d)

        def forward(self, idx: Any) -> Any:
            x = self.emb(idx).float()
            for b in self.blocks:
                x = b(x)
            return self.ln_f(x)

    model = Model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, vocab, (tokens,), generator=g)

    def step() -> None:
        loss = model(batch).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    return model, opt, step, batch


def tensors_of(state: Any) -> list[Any]:
    import numpy
    import torch

    out: list[Any] = []

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, numpy.ndarray):
            out.append(torch.from_numpy(x))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(state)
    return out


def state_bytes(state: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(state))


# --------------------------------------------------------------------------------------------
# Systems (one per child process)


class System:
    name = "?"

    def __init__(self, dirpath: Path) -> None:
        self.dir = dirpath

    def setup(self, state: Any) -> None:
        pass

    def save_once(self, state: Any, step: int) -> dict[str, float]:
        """One save with the trainer idle; returns the timings of this save."""
        raise NotImplementedError

    # training-loop hooks
    def loop_begin(self, opt: Any) -> None:
        pass

    def loop_save(self, state: Any, step: int) -> None:
        raise NotImplementedError

    def loop_end(self) -> None:
        """Waits for background work (timed by the caller as the drain)."""

    def loop_cleanup(self) -> None:
        pass

    def close(self) -> None:
        pass


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Memcpy(System):
    """Plain snapshot into preallocated host buffers: torch ``copy_`` and numpy ``np.copyto``."""

    name = "memcpy"

    def setup(self, state: Any) -> None:
        import torch

        self.src = tensors_of(state)
        self.dst = [torch.empty_like(t) for t in self.src]
        for d in self.dst:  # fault the pages in: this measures a steady-state copy
            d.zero_()
        # numpy sees every tensor as flat bytes (numpy has no bfloat16).
        flat = lambda t: t.reshape(-1).view(torch.uint8).numpy()  # noqa: E731
        self.np_pairs = [(flat(d), flat(s)) for s, d in zip(self.src, self.dst)]

    def save_once(self, state: Any, step: int) -> dict[str, float]:
        import numpy as np

        t0 = time.perf_counter()
        for s, d in zip(self.src, self.dst):
            d.copy_(s)
        t1 = time.perf_counter()
        for d, s in self.np_pairs:
            np.copyto(d, s)
        t2 = time.perf_counter()
        return {"save_stall": t1 - t0, "save_stall_numpy": t2 - t1}

    def loop_save(self, state: Any, step: int) -> None:
        for s, d in zip(tensors_of(state), self.dst):
            d.copy_(s)


class TorchSave(System):
    """``torch.save`` to a file in the same directory, then fsync (file and directory)."""

    name = "torch.save"

    def _save(self, state: Any, step: int) -> Path:
        import torch

        path = self.dir / f"torchsave-{step}.pt"
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.dir)
        return path

    def save_once(self, state: Any, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        path = self._save(state, step)
        t1 = time.perf_counter()
        path.unlink()
        return {"save_stall": t1 - t0, "durable": t1 - t0}

    def loop_save(self, state: Any, step: int) -> None:
        self._save(state, step)

    def loop_cleanup(self) -> None:
        for p in self.dir.glob("torchsave-*.pt"):
            p.unlink()


class Dcp(System):
    """``torch.distributed.checkpoint.async_save``, one process, gloo group, FileSystemWriter
    (fsyncs by default). ``cached``: a persistent ``DefaultStager`` with shared-memory staging
    buffers reused across saves (pinned memory and async staging need CUDA, absent here);
    otherwise the default (a fresh staging copy per save)."""

    def __init__(self, dirpath: Path, cached: bool) -> None:
        super().__init__(dirpath)
        self.cached = cached
        self.name = "dcp-cached" if cached else "dcp"
        self.future: Any = None
        self.stager: Any = None
        self.pg = False

    def setup(self, state: Any) -> None:
        import torch.distributed as dist
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        store_file = self.dir / "pg-filestore"
        if store_file.exists():
            store_file.unlink()
        dist.init_process_group("gloo", init_method=f"file://{store_file.resolve()}", rank=0, world_size=1)
        self.pg = True
        if self.cached:
            self.stager = DefaultStager(
                StagingOptions(use_pinned_memory=False, use_shared_memory=True, use_async_staging=False,
                               use_non_blocking_copy=False)
            )

    def _start(self, state: Any, step: int) -> Any:
        import torch.distributed.checkpoint as dcp

        path = self.dir / f"dcp-{step}"
        kwargs: dict[str, Any] = {"checkpoint_id": str(path)}
        if self.stager is not None:
            kwargs["async_stager"] = self.stager
        fut = dcp.async_save(state, **kwargs)
        # Newer torch returns AsyncSaveResponse(staging_completion, upload_completion) when the
        # stager stages asynchronously; here staging is synchronous and a Future comes back.
        return getattr(fut, "upload_completion", fut)

    def save_once(self, state: Any, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        fut = self._start(state, step)
        t1 = time.perf_counter()
        fut.result()
        t2 = time.perf_counter()
        shutil.rmtree(self.dir / f"dcp-{step}")
        return {"save_stall": t1 - t0, "durable": t2 - t0}

    def loop_save(self, state: Any, step: int) -> None:
        if self.future is not None:  # one save in flight at a time, as DCP's docs recommend
            self.future.result()
        self.future = self._start(state, step)

    def loop_end(self) -> None:
        if self.future is not None:
            self.future.result()
            self.future = None

    def loop_cleanup(self) -> None:
        for p in self.dir.glob("dcp-*"):
            shutil.rmtree(p)

    def close(self) -> None:
        import torch.distributed as dist

        if self.stager is not None:
            self.stager.close()
        if self.pg:
            dist.destroy_process_group()


class Ckptd(System):
    """ckptd embedded mode: copies into the /dev/shm arena on host threads, a persist thread
    writes the shard to ``file://DIR/ckptd-store`` and commits."""

    name = "ckptd"

    def __init__(self, dirpath: Path, arena_dir: str) -> None:
        super().__init__(dirpath)
        self.arena_dir = arena_dir
        self.handles: list[Any] = []
        self.hooks: list[Any] = []
        self.fence_s = 0.0

    def setup(self, state: Any) -> None:
        import ckptd

        self.store = self.dir / "ckptd-store"
        self.job = "stall"
        self.ck = ckptd.Checkpointer(self.job, store=f"file://{self.store}", arena_dir=self.arena_dir)

    def _drop_step(self, step: int) -> None:
        shutil.rmtree(self.store / self.job / f"step-{step}", ignore_errors=True)

    def save_once(self, state: Any, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        h = self.ck.save(state, step)
        t1 = time.perf_counter()
        self.ck.fence()
        t2 = time.perf_counter()
        h.wait()
        t3 = time.perf_counter()
        self._drop_step(step)
        return {"save_stall": t1 - t0, "copy_done": t2 - t0, "durable": t3 - t0}

    def loop_begin(self, opt: Any) -> None:
        import ckptd.torch

        self.fence_s = 0.0
        t: list[float] = [0.0]

        def before(*_: Any) -> None:
            t[0] = time.perf_counter()

        def after(*_: Any) -> None:
            self.fence_s += time.perf_counter() - t[0]

        # Hooks run in registration order: the timing hooks bracket the real fence hook.
        self.hooks = [
            opt.register_step_pre_hook(before),
            ckptd.torch.fence_before_step(opt, self.ck),
            opt.register_step_pre_hook(after),
        ]

    def loop_save(self, state: Any, step: int) -> None:
        self.handles.append(self.ck.save(state, step))

    def loop_end(self) -> None:
        for h in self.handles:
            h.wait()

    def loop_cleanup(self) -> None:
        for h in self.handles:
            self._drop_step(h.step)
        self.handles = []
        for hk in self.hooks:
            hk.remove()
        self.hooks = []

    def close(self) -> None:
        try:
            if hasattr(self, "ck"):
                self.ck.close()
        finally:
            shutil.rmtree(self.arena_dir, ignore_errors=True)


class CkptdSidecar(Ckptd):
    """ckptd sidecar mode: a ``ckptd agent`` process (started here, from ``$CKPTD_BIN_DIR`` or
    ``target/release``) owns the arena and persists; the trainer only copies and hands over. The
    trainer's RSS therefore holds no persist buffers."""

    name = "ckptd-sidecar"

    def setup(self, state: Any) -> None:
        import socket as sock

        import ckptd

        root = Path(__file__).resolve().parents[2]
        binary = Path(os.environ.get("CKPTD_BIN_DIR", root / "target" / "release")) / "ckptd"
        if not binary.exists():
            raise SystemExit(f"{binary} is missing: cargo build --release -p ckptd (or set CKPTD_BIN_DIR)")
        self.store = self.dir / "ckptd-sidecar-store"
        self.job = "stall"
        self.socket = str(self.dir / "agent.sock")
        self.agent = subprocess.Popen(
            [str(binary), "agent", "--socket", self.socket, "--store", f"file://{self.store}", "--job", self.job,
             "--arena-dir", self.arena_dir],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            c = sock.socket(sock.AF_UNIX)
            try:
                c.connect(self.socket)
                break
            except OSError:
                if self.agent.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the ckptd agent did not start") from None
                time.sleep(0.02)
            finally:
                c.close()
        self.ck = ckptd.Checkpointer(self.job, socket=self.socket)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if hasattr(self, "agent"):
                self.agent.terminate()
                self.agent.wait(timeout=120)


def make_system(name: str, dirpath: Path, arena_dir: str) -> System:
    if name == "memcpy":
        return Memcpy(dirpath)
    if name == "torch.save":
        return TorchSave(dirpath)
    if name == "dcp":
        return Dcp(dirpath, cached=False)
    if name == "dcp-cached":
        return Dcp(dirpath, cached=True)
    if name == "ckptd":
        return Ckptd(dirpath, arena_dir)
    if name == "ckptd-sidecar":
        return CkptdSidecar(dirpath, arena_dir)
    raise ValueError(name)


# --------------------------------------------------------------------------------------------
# Child processes


def child_calibrate(args: argparse.Namespace) -> dict[str, Any]:
    import ckptd.torch
    import torch

    torch.set_num_threads(args.train_threads)

    model, opt, step, _ = build(args.size, args.tokens)
    step()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    state = ckptd.torch.capture(model, opt)
    n = len(tensors_of(state))
    nbytes = state_bytes(state)
    # Durable write bandwidth of --dir: 256 MiB, fsync.
    buf = os.urandom(1 << 20) * 256
    path = Path(args.workdir) / "calibrate.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    disk = len(buf) / (time.perf_counter() - t0)
    path.unlink()
    return {"step_s": statistics.median(times), "tensors": n, "state_bytes": nbytes, "disk_bps": disk}


def child_run(args: argparse.Namespace) -> dict[str, Any]:
    import ckptd.torch
    import torch

    torch.set_num_threads(args.train_threads)
    model, opt, train_step, _ = build(args.size, args.tokens)
    train_step()  # creates the Adam state and the gradients
    state = ckptd.torch.capture(model, opt)
    nbytes = state_bytes(state)
    gc.collect()
    rss0 = proc_status()["VmRSS"]
    hwm_reset = reset_hwm()
    ru0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    workdir = Path(args.workdir)
    system = make_system(args.child, workdir, args.arena_dir)
    res: dict[str, Any] = {"system": system.name, "size_bytes": nbytes, "samples": {}}
    samples: dict[str, list[float]] = res["samples"]
    try:
        system.setup(state)
        # Save phase, trainer idle. The first save creates buffers (arena, staging): reported alone.
        first = system.save_once(state, 1)
        res["first"] = first
        for rep in range(args.reps):
            c0 = cpu_seconds()
            got = system.save_once(state, 2 + rep)
            # Process CPU time of the whole save (every thread: copies, encoding, writing), until
            # durable: what a save costs the cores the trainer would otherwise use.
            got["cpu_per_save"] = cpu_seconds() - c0
            for k, v in got.items():
                samples.setdefault(k, []).append(v)
        st = proc_status()
        peak = st["VmHWM"] if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        res["rss"] = {
            "base_bytes": rss0,
            "peak_bytes": peak,
            "overhead_bytes": peak - rss0,
            "method": "VmHWM after clear_refs" if hwm_reset else f"ru_maxrss (max before: {ru0})",
            "after_saves": {k: st.get(k) for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")},
        }

        # Training loop, with and without checkpointing, alternating which goes first.
        k, saves = args.every, args.saves
        n_steps = k * saves
        loop: dict[str, list[float]] = {"base": [], "ckpt": [], "drain": [], "fence": []}
        for rep in range(args.loop_reps):
            order = (False, True) if rep % 2 == 0 else (True, False)
            for with_ckpt in order:
                gc.collect()
                if with_ckpt:
                    system.loop_begin(opt)
                t0 = time.perf_counter()
                for i in range(n_steps):
                    train_step()
                    if with_ckpt and i % k == 0:
                        system.loop_save(ckptd.torch.capture(model, opt), 1000 + 100 * rep + i)
                t1 = time.perf_counter()
                if with_ckpt:
                    system.loop_end()
                    t2 = time.perf_counter()
                    loop["ckpt"].append(t1 - t0)
                    loop["drain"].append(t2 - t1)
                    loop["fence"].append(getattr(system, "fence_s", 0.0))
                    system.loop_cleanup()
                else:
                    loop["base"].append(t1 - t0)
        res["loop"] = loop
        res["loop_cfg"] = {"every": k, "saves": saves, "steps": n_steps}
        res["peak_rss_whole_child_bytes"] = proc_status()["VmHWM"]
        res["torch_threads"] = torch.get_num_threads()
    finally:
        system.close()
    return res


# --------------------------------------------------------------------------------------------
# Parent


def run_child(args: argparse.Namespace, mode: str, size: int, extra: list[str]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("r", suffix=".json", dir=args.out, delete=False) as f:
        result_path = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--size", str(size),
           "--tokens", str(args.tokens), "--train-threads", str(args.train_threads), "--workdir", args.workdir, "--arena-dir", args.arena_dir,
           "--result", result_path, *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd)
    try:
        if p.returncode != 0:
            raise RuntimeError(f"child {mode} ({fmt_size(size)}) failed with exit code {p.returncode}")
        with open(result_path) as f:
            res = json.load(f)
    finally:
        os.unlink(result_path)
    print(f"  [{mode} {fmt_size(size)}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    return res


def summary(xs: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs), "n": len(xs)}


def cell(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "–"
    if rec["n"] == 1:
        return fmt_time(rec["median_s"])
    return f"{fmt_time(rec['median_s'])} ({fmt_time(rec['min_s'])}–{fmt_time(rec['max_s'])})"


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    if not a or not b or not b["median_s"] or a["median_s"] is None:
        return "–"
    r = a["median_s"] / b["median_s"]
    return f"{r:.3g}×"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256MiB,1GiB,4GiB")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every save measurement")
    ap.add_argument("--loop-reps", type=int, default=None, help="training-loop pairs (default: --reps)")
    ap.add_argument("--saves", type=int, default=3, help="saves per training loop")
    ap.add_argument("--every", type=int, default=None,
                    help="steps between saves (default: enough steps to cover a durable write)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per training step")
    ap.add_argument("--train-threads", type=int, default=1,
                    help="torch intra-op threads in the children (default 1: on a small shared machine "
                         "OpenMP's spinning threads make 2 threads slower and very noisy)")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS))
    ap.add_argument("--dir", default="bench-out/stall-data", help="directory the checkpoints are written to")
    ap.add_argument("--out", default="bench-out", help="where stall.json goes")
    ap.add_argument("--arena-dir", default=f"/dev/shm/ckptd-bench-{os.getpid()}")
    # child-only
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        res = child_calibrate(args) if args.child == "calibrate" else child_run(args)
        with open(args.result, "w") as f:
            json.dump(res, f)
        return 0

    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    systems = [s for s in args.systems.split(",") if s]
    for s in systems:
        if s not in ALL_SYSTEMS:
            ap.error(f"unknown system {s!r}: choose from {', '.join(ALL_SYSTEMS)}")
    loop_reps = args.loop_reps if args.loop_reps is not None else args.reps
    os.makedirs(args.dir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    facts = machine_facts(args)
    if facts["dir_fstype"] in ("tmpfs", "ramfs"):
        print(f"warning: --dir {args.dir} is on {facts['dir_fstype']}: 'durable' means nothing there",
              file=sys.stderr)
    args.workdir = os.path.abspath(tempfile.mkdtemp(prefix="stall-", dir=args.dir))
    command = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])

    records: list[dict[str, Any]] = []
    children: dict[tuple[str, int], dict[str, Any]] = {}
    calib: dict[int, dict[str, Any]] = {}
    try:
        for size in sizes:
            cal = run_child(args, "calibrate", size, [])
            every = args.every
            if every is None:
                durable_est = cal["state_bytes"] / cal["disk_bps"]
                every = max(3, math.ceil(1.5 * durable_est / cal["step_s"]) + 1)
            cal["every"] = every
            calib[size] = cal
            print(f"{fmt_size(size)}: {cal['tensors']} tensors, {fmt_size(cal['state_bytes'])}, step "
                  f"{fmt_time(cal['step_s'])}, disk {cal['disk_bps'] / 1e6:.0f} MB/s -> save every {every} steps",
                  file=sys.stderr, flush=True)
            for sysname in systems:
                extra = ["--reps", str(args.reps), "--loop-reps", str(loop_reps), "--saves", str(args.saves),
                         "--every", str(every)]
                children[(sysname, size)] = run_child(args, sysname, size, extra)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
        shutil.rmtree(args.arena_dir, ignore_errors=True)
    facts["loadavg_end"] = open("/proc/loadavg").read().split()[:3]

    # Records.
    def add(system: str, size_bytes: int, metric: str, xs: list[float], **more: Any) -> dict[str, Any]:
        rec = {"system": system, "size_bytes": size_bytes, "metric": metric, **summary(xs), **more}
        records.append(rec)
        return rec

    table: dict[tuple[str, int, str], dict[str, Any]] = {}
    for (sysname, size), res in children.items():
        nb = res["size_bytes"]
        for metric, xs in res["samples"].items():
            if sysname == "memcpy" and metric == "cpu_per_save":
                continue  # covers both the torch and the numpy copy: meaningless
            name = "memcpy-numpy" if metric == "save_stall_numpy" else sysname
            m = "save_stall" if metric == "save_stall_numpy" else metric
            table[(name, size, m)] = add(name, nb, m, xs)
        for metric, v in res["first"].items():
            if metric == "save_stall":
                table[(sysname, size, "first_save_stall")] = add(sysname, nb, "first_save_stall", [v])
        rss = res["rss"]
        rec = {"system": sysname, "size_bytes": nb, "metric": "peak_rss_overhead", "median_s": None,
               "min_s": None, "max_s": None, "peak_rss_bytes": rss["overhead_bytes"],
               "rss_base_bytes": rss["base_bytes"], "rss_peak_bytes": rss["peak_bytes"],
               "rss_method": rss["method"], "rss_after_saves": rss["after_saves"]}
        records.append(rec)
        table[(sysname, size, "rss")] = rec
        loop = res["loop"]
        per_save = [(c - b) / res["loop_cfg"]["saves"] for c, b in zip(loop["ckpt"], loop["base"])]
        table[(sysname, size, "loop")] = add(sysname, nb, "loop_stall_per_save", per_save, **res["loop_cfg"])
        table[(sysname, size, "drain")] = add(sysname, nb, "loop_drain", loop["drain"])
        table[(sysname, size, "step")] = add(sysname, nb, "step_time",
                                             [b / res["loop_cfg"]["steps"] for b in loop["base"]])
        if any(loop["fence"]):
            table[(sysname, size, "fence")] = add(sysname, nb, "loop_fence_wait_per_save",
                                                  [f / res["loop_cfg"]["saves"] for f in loop["fence"]])

    out = {"machine": facts, "command": command, "calibration": {str(k): v for k, v in calib.items()},
           "records": records}
    with open(os.path.join(args.out, "stall.json"), "w") as f:
        json.dump(out, f, indent=1)

    # Markdown.
    lines = []
    lines.append(f"Machine: {facts['nproc']} CPUs ({facts['cpu']}), {fmt_size(facts['mem_total_bytes'])} RAM, "
                 f"kernel {facts['kernel']}, Python {facts['python']}, torch {facts['torch']} "
                 f"(torch.set_num_threads({args.train_threads}) in the children), numpy {facts['numpy']}; --dir on "
                 f"{facts['dir_fstype']} ({facts['dir_mount']}), arena dir {facts['arena_dir']} on "
                 f"{facts['arena_fstype']}; load average {' '.join(facts['loadavg_start'])} at start, "
                 f"{' '.join(facts['loadavg_end'])} at end.")
    lines.append("")
    show = [s for s in ("memcpy", "memcpy-numpy", "torch.save", "dcp", "dcp-cached", "ckptd", "ckptd-sidecar")
            if any(k[0] == s for k in table)]
    head = "| size | metric | " + " | ".join(show) + " |"
    lines.append(head)
    lines.append("|" + "---|" * (2 + len(show)))
    metrics = [("save_stall", "save call stall"), ("first_save_stall", "first save stall (buffers created)"),
               ("copy_done", "until tensors writable (fence)"), ("durable", "until durable"), ("cpu_per_save", "CPU time per save (all threads)"),
               ("loop", "training-loop stall per save"), ("fence", "  of which fence wait"),
               ("drain", "work left after the loop"), ("rss", "peak RSS overhead")]
    for size in sizes:
        nb = next((r["size_bytes"] for (s, z), r in children.items() if z == size), size)
        for key, label in metrics:
            cells = []
            for s in show:
                rec = table.get((s, size, key))
                if key == "rss":
                    cells.append(fmt_size(rec["peak_rss_bytes"]) if rec and rec["peak_rss_bytes"] > 0
                                 else ("0" if rec else "–"))
                else:
                    cells.append(cell(rec))
            if all(c == "–" for c in cells):
                continue
            lines.append(f"| {fmt_size(nb)} | {label} | " + " | ".join(cells) + " |")
        cal = calib[size]
        step = table.get(("ckptd", size, "step")) or next(
            (v for k, v in table.items() if k[1] == size and k[2] == "step"), None)
        lines.append(f"| {fmt_size(nb)} | loop: step time without saves; saves every | "
                     + " | ".join((cell(table.get((s, size, "step"))) + f"; {cal['every']}")
                                  if (s, size, "step") in table else "–" for s in show) + " |")
    lines.append("")
    lines.append("Ratios (medians):")
    lines.append("")
    lines.append("| size | ckptd stall / torch memcpy | ckptd stall / numpy memcpy | ckptd stall / DCP async_save "
                 "stall | ckptd stall / DCP-cached stall | torch.save / ckptd durable | DCP durable / ckptd durable "
                 "| ckptd loop stall / memcpy loop stall | ckptd loop stall / DCP loop stall "
                 "| RSS overhead ckptd / memcpy | ckptd / DCP | ckptd / DCP-cached | ckptd / torch.save |")
    lines.append("|" + "---|" * 13)
    for size in sizes:
        nb = next((r["size_bytes"] for (s, z), r in children.items() if z == size), size)
        g = lambda s, m: table.get((s, size, m))  # noqa: E731

        def rss_ratio(a: str, b: str) -> str:
            ra, rb = g(a, "rss"), g(b, "rss")
            if not ra or not rb or rb["peak_rss_bytes"] <= 0:
                return "–"
            return f"{ra['peak_rss_bytes'] / rb['peak_rss_bytes']:.3g}×"

        lines.append(
            f"| {fmt_size(nb)} | {ratio(g('ckptd', 'save_stall'), g('memcpy', 'save_stall'))} "
            f"| {ratio(g('ckptd', 'save_stall'), g('memcpy-numpy', 'save_stall'))} "
            f"| {ratio(g('ckptd', 'save_stall'), g('dcp', 'save_stall'))} "
            f"| {ratio(g('ckptd', 'save_stall'), g('dcp-cached', 'save_stall'))} "
            f"| {ratio(g('torch.save', 'durable'), g('ckptd', 'durable'))} "
            f"| {ratio(g('dcp', 'durable'), g('ckptd', 'durable'))} "
            f"| {ratio(g('ckptd', 'loop'), g('memcpy', 'loop'))} "
            f"| {ratio(g('ckptd', 'loop'), g('dcp', 'loop'))} "
            f"| {rss_ratio('ckptd', 'memcpy')} | {rss_ratio('ckptd', 'dcp')} | {rss_ratio('ckptd', 'dcp-cached')} "
            f"| {rss_ratio('ckptd', 'torch.save')} |")
    lines.append("")
    for (sysname, size), res in children.items():
        if sysname == "ckptd":
            a = res["rss"]["after_saves"]
            lines.append(f"ckptd {fmt_size(res['size_bytes'])}: RSS after the saves: anon {fmt_size(a['RssAnon'] or 0)}, "
                         f"shmem (arena) {fmt_size(a['RssShmem'] or 0)}, file {fmt_size(a['RssFile'] or 0)}.")
    print("\n".join(lines))
    print(f"\n(command: {command}; records in {os.path.join(args.out, 'stall.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
