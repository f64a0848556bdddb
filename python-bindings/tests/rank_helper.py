"""One rank of a multi-rank job, for test_multirank.py.

Saves steps 1..--steps of a per-rank numpy state and waits for each to be committed; with
--pause-before N it prints {"paused": N} before saving step N and sleeps until killed. Prints
{"committed": N} or {"failed": N, "error": class, "message": str} per step, then {"latest": N}
and {"loaded": N, "ok": bool} after loading the latest step back.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import ckptd


def state(rank: int, step: int) -> dict[str, object]:
    return {"w": np.full(100_000, rank * 1000 + step, dtype=np.float32), "rank": rank, "step": step}


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--arena", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--pause-before", type=int, default=-1)
    p.add_argument("--commit-timeout", type=float, default=60.0)
    args = p.parse_args()

    ck = ckptd.Checkpointer(
        args.job,
        store=args.store,
        rank=args.rank,
        world_size=args.world,
        arena_dir=args.arena,
        commit_timeout=args.commit_timeout,
    )
    for step in range(1, args.steps + 1):
        if step == args.pause_before:
            emit(paused=step)
            time.sleep(600)
        try:
            ck.save(state(args.rank, step), step).wait()
            emit(committed=step)
        except ckptd.CkptError as e:
            emit(failed=step, error=type(e).__name__, message=str(e))
    latest = ck.latest_step()
    emit(latest=latest)
    if latest is not None:
        out = {"w": np.zeros(100_000, dtype=np.float32), "rank": -1, "step": -1}
        got = ck.load(out)
        ok = out["rank"] == args.rank and out["step"] == got and bool((out["w"] == args.rank * 1000 + got).all())
        emit(loaded=got, ok=ok)
    try:
        ck.close()
    except ckptd.CkptError as e:
        # close() reports a failed save again, even one whose wait() already raised.
        emit(close_error=type(e).__name__)


if __name__ == "__main__":
    main()
