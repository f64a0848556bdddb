#!/usr/bin/env python3
"""The Python half of ``ckptd-benches compare``: ckptd and its peers on one training state.

    python benches/python/compare.py --sizes 64MiB,256MiB --reps 3 --dir DATA --json OUT.json \
        [--device auto|cpu|cuda] [--ranks 1,2,4,8 --shard 64MiB [--scaling-s3 http://HOST:PORT/BUCKET]]

``--sizes ''`` runs the scaling part alone.

It is normally started by ``cargo run --release -p ckptd-benches -- compare``, which adds the
limits measured in Rust (memcpy, write+fsync, read), merges the records, and draws the plots. It
reuses ``stall.py``'s training state (``build``) and its system classes (torch.save, DCP, ckptd
embedded and sidecar), and adds what a comparison needs that ``stall.py`` does not time: restores
(from the memory tier and from storage, with the files dropped from the page cache first), DCP's
synchronous save, safetensors, pinned CUDA copies, and multi-rank commits.

Each system runs in its own child process, so its peak RSS is its own. The output is JSON:
``{"machine": {...}, "records": [{system, size_bytes, metric, median_s, min_s, max_s,
peak_rss_bytes?}], "skipped": {system: reason}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stall  # noqa: E402  (the training state and the system classes are shared)

SYSTEMS = ("memcpy", "torch.save", "dcp", "dcp-cached", "safetensors", "ckptd", "ckptd-sidecar")


def device_of(arg: str) -> str:
    import torch

    if arg == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if arg == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False (no GPU or a CPU-only torch build)")
    return arg


def summary(xs: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs)}


def drop_cache(path: Path) -> None:
    """Drops a file's (or a tree's) pages from the page cache, so that the next read is a storage
    read: ``posix_fadvise(DONTNEED)`` needs no root (tmpfs and a VM host's cache keep theirs)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def to_device(tree: Any, device: str) -> Any:
    """The captured state with its tensors on ``device`` (RNG states, uint8, stay on the host)."""
    import torch

    if isinstance(tree, torch.Tensor):
        return tree.to(device) if tree.dtype != torch.uint8 else tree
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_device(v, device) for v in tree]
    if isinstance(tree, tuple):
        return tuple(to_device(v, device) for v in tree)
    return tree


def flat_tensors(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted name -> contiguous tensor, for safetensors (which takes a flat dict)."""
    import torch

    out: dict[str, Any] = {}
    if isinstance(tree, torch.Tensor):
        out[prefix or "t"] = tree.contiguous()
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flat_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(flat_tensors(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# One system in one child process


def child_system(args: argparse.Namespace) -> dict[str, Any]:
    import ckptd.torch
    import torch

    torch.set_num_threads(args.train_threads)
    model, opt, train_step, _ = stall.build(args.size, 32)
    train_step()
    state = to_device(ckptd.torch.capture(model, opt), args.device)
    del model, opt, train_step
    nbytes = stall.state_bytes(state)
    rss0 = stall.proc_status()["VmRSS"]
    hwm = stall.reset_hwm()
    work = Path(args.workdir)
    name = args.child
    samples: dict[str, list[float]] = {}
    add = lambda k, v: samples.setdefault(k, []).append(v)  # noqa: E731
    peak = None
    restore_peak = None  # host memory a storage restore takes beyond the tensors it fills

    if name == "memcpy":
        # The copy limit: torch copy_ into preallocated host buffers (pinned + non_blocking on the
        # CUDA copy engine when the state is on a GPU), and back.
        src = stall.tensors_of(state)
        pin = args.device == "cuda"
        dst = [torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin).zero_() for t in src]
        for _ in range(args.reps):
            sync(args.device)
            t0 = time.perf_counter()
            for s, d in zip(src, dst):
                d.copy_(s, non_blocking=pin)
            sync(args.device)
            add("save_stall", time.perf_counter() - t0)
            t0 = time.perf_counter()
            for s, d in zip(src, dst):
                s.copy_(d, non_blocking=pin)
            sync(args.device)
            add("restore_memory", time.perf_counter() - t0)
        peak = stall.proc_status()["VmHWM"] - rss0 if hwm else None
    elif name in ("torch.save", "safetensors"):
        path = work / ("state.pt" if name == "torch.save" else "state.safetensors")
        flat = flat_tensors(state) if name == "safetensors" else None
        for _ in range(args.reps):
            sync(args.device)
            t0 = time.perf_counter()
            if flat is None:
                with open(path, "wb") as f:
                    torch.save(state, f)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                from safetensors.torch import save_file

                save_file(flat, str(path))
                fsync_path(path)
            fsync_path(work)
            d = time.perf_counter() - t0
            add("save_stall", d)
            add("durable", d)
        peak = stall.proc_status()["VmHWM"] - rss0 if hwm else None
        for _ in range(args.reps):
            drop_cache(path)
            t0 = time.perf_counter()
            if flat is None:
                got = torch.load(path, map_location=args.device, weights_only=False)
            else:
                from safetensors.torch import load_file

                got = load_file(str(path), device=args.device)
            sync(args.device)
            add("restore_storage", time.perf_counter() - t0)
            del got
        path.unlink()
    elif name in ("dcp", "dcp-cached"):
        import torch.distributed.checkpoint as dcp

        system = stall.Dcp(work, cached=name == "dcp-cached")
        if name == "dcp-cached" and args.device == "cuda":
            # Pinned, reused staging buffers: what DCP offers for fast GPU->host staging.
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            system.setup = lambda st: (stall.Dcp.setup(system, st), setattr(system, "stager", DefaultStager(
                StagingOptions(use_pinned_memory=True, use_shared_memory=False, use_async_staging=False,
                               use_non_blocking_copy=True))))[0]
        system.setup(state)
        try:
            system.save_once(state, 1)  # staging buffers and the process group are made here
            for rep in range(args.reps):
                got = system.save_once(state, 2 + rep)
                add("save_stall", got["save_stall"])
                add("durable", got["durable"])
            peak = stall.proc_status()["VmHWM"] - rss0 if hwm else None
            ckpt = work / "dcp-sync"
            for _ in range(args.reps if name == "dcp" else 1):
                shutil.rmtree(ckpt, ignore_errors=True)
                t0 = time.perf_counter()
                dcp.save(state, checkpoint_id=str(ckpt))
                if name == "dcp":
                    add("sync_save", time.perf_counter() - t0)
            # Both variants read with dcp.load (staging does not change it): the goodput model
            # needs a restore time for each.
            for _ in range(args.reps):
                drop_cache(ckpt)
                t0 = time.perf_counter()
                dcp.load(state, checkpoint_id=str(ckpt))
                sync(args.device)
                add("restore_storage", time.perf_counter() - t0)
            shutil.rmtree(ckpt, ignore_errors=True)
        finally:
            system.close()
    elif name in ("ckptd", "ckptd-sidecar"):
        import ckptd

        arena = f"{args.arena_dir}-{name}"
        system = stall.Ckptd(work, arena) if name == "ckptd" else stall.CkptdSidecar(work, arena)
        system.setup(state)
        keep = 1000
        try:
            add("first_durable", system.save_once(state, 1)["durable"])  # the arena is created here
            for rep in range(args.reps):
                got = system.save_once(state, 2 + rep)
                for k in ("save_stall", "copy_done", "durable"):
                    add(k, got[k])
            peak = stall.proc_status()["VmHWM"] - rss0 if hwm else None
            system.ck.save(state, keep).wait()
            for _ in range(args.reps):
                t0 = time.perf_counter()
                system.ck.load(state, keep)
                sync(args.device)
                d = time.perf_counter() - t0
                if system.ck.last_load_from_memory:
                    add("restore_memory", d)
        finally:
            system.close()
        # From storage: a new embedded checkpointer with an empty arena (what a replacement node
        # sees), the store's files dropped from the page cache first. The sidecar's store is read
        # the same way: storage restores go through the same engine path in both modes.
        for rep in range(args.reps):
            fresh = f"{arena}-cold{rep}"
            ck = ckptd.Checkpointer(system.job, store=f"file://{system.store}", arena_dir=fresh)
            try:
                drop_cache(system.store)
                rss_before = stall.proc_status()["VmRSS"] if stall.reset_hwm() else None
                t0 = time.perf_counter()
                ck.load(state, keep)
                sync(args.device)
                d = time.perf_counter() - t0
                if rss_before is not None:
                    restore_peak = max(restore_peak or 0, stall.proc_status()["VmHWM"] - rss_before)
                if ck.last_load_from_memory is False:
                    add("restore_storage", d)
            finally:
                ck.close()
                shutil.rmtree(fresh, ignore_errors=True)
        shutil.rmtree(system.store, ignore_errors=True)
    else:
        raise SystemExit(f"unknown system {name}")

    records = []
    for metric, xs in samples.items():
        rec: dict[str, Any] = {"system": name, "size_bytes": nbytes, "metric": metric, **summary(xs), "n": len(xs)}
        if metric == "save_stall" and peak is not None:
            rec["peak_rss_bytes"] = max(0, peak)  # VmHWM is sampled by pages: tiny negatives are 0
        if metric == "restore_storage" and restore_peak is not None:
            rec["peak_rss_bytes"] = max(0, restore_peak)
        records.append(rec)
    return {"records": records}


# --------------------------------------------------------------------------------------------
# Scaling: N ranks, one process each, one store (file://, or S3 with --scaling-s3)


def child_rank(args: argparse.Namespace) -> dict[str, Any]:
    import ckptd
    import torch

    torch.set_num_threads(1)
    n = args.size // 4 // 8
    g = torch.Generator().manual_seed(args.rank)
    state = {f"w{i}": torch.rand(n, generator=g) for i in range(8)}
    arena = f"{args.arena_dir}-r{args.rank}"
    ck = ckptd.Checkpointer("scale", store=args.store, rank=args.rank, world_size=args.world, arena_dir=arena)
    bar = Path(args.workdir)
    out: dict[str, list[Any]] = {"call": [], "stall": [], "done": [], "shard_ns": [], "committed_ns": [],
                                 "manifest_ns": []}
    try:
        for rep in range(args.reps + 1):  # rep 0 warms the arena up and is not reported
            (bar / f"ready-{rep}-{args.rank}").touch()
            while len(list(bar.glob(f"ready-{rep}-*"))) < args.world:
                time.sleep(0.001)
            t0 = time.time()
            h = ck.save(state, rep + 1)
            t1 = time.time()
            h.wait()
            t2 = time.time()
            if rep:
                t = h.timings()
                if t is None:
                    raise SystemExit(f"rank {args.rank}: step {rep + 1} has no timings after wait()")
                out["call"].append(t0)
                out["stall"].append(t1 - t0)
                out["done"].append(t2)
                out["shard_ns"].append(t.shard_durable_ns)
                out["committed_ns"].append(t.committed_ns)
                out["manifest_ns"].append(t.manifest_written_ns)
    finally:
        ck.close()
        shutil.rmtree(arena, ignore_errors=True)
    return out


def scaling_store(args: argparse.Namespace, world: int) -> tuple[str, dict[str, str], str]:
    """(store URL, environment for the ranks, system name) of one scaling run."""
    env = dict(os.environ)
    if not args.scaling_s3:
        return f"file://{Path(args.workdir) / f'scale-{world}'}", env, "ckptd-scaling"
    endpoint, _, bucket = args.scaling_s3.rstrip("/").rpartition("/")
    if not endpoint.startswith(("http://", "https://")) or not bucket:
        raise SystemExit(f"--scaling-s3 {args.scaling_s3!r}: give http(s)://HOST:PORT/BUCKET")
    env["AWS_ENDPOINT_URL"] = endpoint
    env.setdefault("AWS_REGION", "us-east-1")
    if endpoint.startswith("http://"):
        env["AWS_ALLOW_HTTP"] = "true"
    # A loopback S3 server (moto) takes any key; a real endpoint needs the caller's.
    env.setdefault("AWS_ACCESS_KEY_ID", "test")
    env.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    return f"s3://{bucket}/compare-{os.getpid()}-{world}", env, "ckptd-scaling-s3"


def scaling(args: argparse.Namespace, ranks: list[int]) -> list[dict[str, Any]]:
    """N ranks save the same step; each reports (wall clock, ``time.time_ns()``) when its shard
    became durable and when it learned of the commit (``SaveHandle.timings()``). The commit
    latency of a step is the last rank to learn of it minus the last shard durable: what the job
    waits for the commit once every rank's data is safe. Wall clocks of one host agree."""
    records: list[dict[str, Any]] = []
    for world in ranks:
        store, env, system = scaling_store(args, world)
        bar = Path(tempfile.mkdtemp(prefix=f"bar-{world}-", dir=args.workdir))
        procs, paths = [], []
        for r in range(world):
            res = bar / f"rank-{r}.json"
            paths.append(res)
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--child", "rank", "--rank", str(r), "--world", str(world), "--size",
                 str(args.shard), "--reps", str(args.reps), "--store", store, "--workdir", str(bar),
                 "--arena-dir", args.arena_dir, "--result", str(res)], env=env))
        bad = [p.wait() for p in procs]
        if any(bad):
            raise SystemExit(f"scaling with {world} ranks: a rank failed (exit codes {bad})")
        outs = [json.loads(p.read_text()) for p in paths]
        wall, commit, written, stall_max = [], [], [], []
        for rep in range(args.reps):
            start = min(o["call"][rep] for o in outs)
            end = max(o["done"][rep] for o in outs)
            wall.append(end - start)
            stall_max.append(max(o["stall"][rep] for o in outs))
            last_shard = max(o["shard_ns"][rep] for o in outs)
            commit.append(max(0, max(o["committed_ns"][rep] for o in outs) - last_shard) / 1e9)
            by = [o["manifest_ns"][rep] for o in outs if o["manifest_ns"][rep] is not None]
            if by:
                written.append(max(0, max(by) - last_shard) / 1e9)
        total = world * args.shard
        base = {"system": system, "ranks": world, "size_bytes": total, "shard_bytes": args.shard}
        records.append({**base, "metric": "all_durable", **summary(wall)})
        records.append({**base, "metric": "save_stall_max_rank", **summary(stall_max)})
        records.append({**base, "metric": "commit_after_last_shard", **summary(commit)})
        if written:
            records.append({**base, "metric": "manifest_after_last_shard", **summary(written)})
        print(f"{system} x{world}: {total / 2**20:.0f} MiB in {statistics.median(wall):.3f} s "
              f"({total / statistics.median(wall) / 1e9:.2f} GB/s aggregate), commit "
              f"{statistics.median(commit) * 1e3:.1f} ms after the last shard", file=sys.stderr, flush=True)
        if store.startswith("file://"):
            shutil.rmtree(store.removeprefix("file://"), ignore_errors=True)
        shutil.rmtree(bar, ignore_errors=True)
    return records


# --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64MiB,256MiB")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--ranks", default="", help="scaling: comma-separated world sizes (empty: no scaling run)")
    ap.add_argument("--shard", type=stall.parse_size, default=64 << 20, help="scaling: bytes per rank")
    ap.add_argument("--scaling-s3", default="",
                    help="scaling: run against S3 at http(s)://HOST:PORT/BUCKET (e.g. moto) instead of file://")
    ap.add_argument("--train-threads", type=int, default=1)
    ap.add_argument("--dir", default="bench-out/data")
    ap.add_argument("--json", default="bench-out/python.json")
    ap.add_argument("--arena-dir", default=f"/dev/shm/ckptd-compare-{os.getpid()}")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        res = child_rank(args) if args.child == "rank" else child_system(args)
        Path(args.result).write_text(json.dumps(res))
        return 0

    args.device = device_of(args.device)
    sizes = [stall.parse_size(s) for s in args.sizes.split(",") if s]
    systems = [s for s in args.systems.split(",") if s]
    for s in systems:
        if s not in SYSTEMS:
            ap.error(f"unknown system {s!r}: choose from {', '.join(SYSTEMS)}")
    skipped: dict[str, str] = {}
    try:
        import safetensors  # noqa: F401
    except ImportError:
        skipped["safetensors"] = "not installed (pip install safetensors)"
    try:
        from torch.distributed.checkpoint import async_save  # noqa: F401
    except ImportError:
        skipped["dcp"] = skipped["dcp-cached"] = "this torch has no torch.distributed.checkpoint.async_save"
    os.makedirs(args.dir, exist_ok=True)
    args.workdir = os.path.abspath(tempfile.mkdtemp(prefix="compare-", dir=args.dir))
    records: list[dict[str, Any]] = []
    import torch

    machine = {"python": sys.version.split()[0], "torch": torch.__version__, "device": args.device,
               "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
               "dir_fstype": stall.fs_of(args.dir)[1], "arena_fstype": stall.fs_of("/dev/shm")[1]}
    try:
        for size in sizes:
            for name in systems:
                if name in skipped:
                    continue
                res = Path(args.workdir) / f"{name}-{size}.json"
                cmd = [sys.executable, __file__, "--child", name, "--size", str(size), "--reps", str(args.reps),
                       "--device", args.device, "--train-threads", str(args.train_threads), "--workdir",
                       args.workdir, "--arena-dir", args.arena_dir, "--result", str(res)]
                t0 = time.monotonic()
                rc = subprocess.run(cmd).returncode
                if rc != 0:
                    skipped[name] = f"failed at {stall.fmt_size(size)} (exit {rc}); see stderr"
                    print(f"compare: {name} at {stall.fmt_size(size)} failed (exit {rc})", file=sys.stderr)
                    continue
                got = json.loads(res.read_text())["records"]
                records += got
                print(f"compare: {name} {stall.fmt_size(size)} done in {time.monotonic() - t0:.0f} s",
                      file=sys.stderr, flush=True)
        ranks = [int(r) for r in args.ranks.split(",") if r]
        if ranks:
            records += scaling(args, ranks)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": machine, "records": records, "skipped": skipped}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
