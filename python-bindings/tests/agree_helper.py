"""One rank of a two-rank gloo group that restarts and restores, for test_progress.py.

Joins the group (file:// rendezvous), opens an embedded checkpointer for its rank and calls
ckptd.torch.restore(ck, extra=...) with the default step. With --wait-go it reads one line from
stdin first. With --report-collective, torch.distributed.all_reduce prints
{"contributed": N} (the newest step this rank saw) before it runs. Prints {"restored": N,
"w": [...]} or {"no_checkpoint": message}.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
import torch.distributed as dist

import ckptd
import ckptd.torch


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--rendezvous", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--arena", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--wait-go", action="store_true")
    p.add_argument("--report-collective", action="store_true")
    args = p.parse_args()

    dist.init_process_group("gloo", init_method=f"file://{args.rendezvous}", rank=args.rank, world_size=2)
    if args.report_collective:
        real = dist.all_reduce

        def reporting(tensor: torch.Tensor, *a: Any, **kw: Any) -> Any:
            emit(contributed=int(tensor[0]))
            return real(tensor, *a, **kw)

        dist.all_reduce = reporting  # type: ignore[assignment]
    ck = ckptd.Checkpointer(args.job, store=args.store, rank=args.rank, world_size=2, arena_dir=args.arena)
    if args.wait_go:
        sys.stdin.readline()
    extra = {"w": torch.zeros(4)}
    try:
        step = ckptd.torch.restore(ck, extra=extra)
    except ckptd.NoCheckpoint as e:
        emit(no_checkpoint=str(e))
    else:
        emit(restored=step, w=extra["w"].tolist())
    ck.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
