"""Trains a small model with checkpoints; a separate process for the crash tests in test_torch.py.

Prints one JSON object per line: {"restored": N, "from_memory": b} after a restore, {"step": N,
"loss": hex} after each step, {"paused": N} when it stops at --pause-at (it then sleeps until
killed). At the end it writes the final parameters, optimizer state and losses to --out.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import ckptd
import ckptd.torch as ct


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    # BatchNorm: buffers that the forward pass after a save updates in place.
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 1)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    return model, opt, sched


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--arena", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--out")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--pause-at", type=int, default=-1)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    torch.set_num_threads(1)
    model, opt, sched = build()
    ck = ckptd.Checkpointer(args.job, store=args.store, arena_dir=args.arena)
    start = 0
    if args.resume:
        assert len(opt.state) == 0, "the optimizer must be fresh"
        start = ct.restore(ck, model, opt, sched)
        emit(restored=start, from_memory=ck.last_load_from_memory)
    ct.fence_before_step(opt, ck)
    losses: dict[int, str] = {}
    for step in range(start + 1, args.steps + 1):
        x, y = batch(step)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        losses[step] = loss.item().hex()
        emit(step=step, loss=losses[step])
        ck.heartbeat(step)
        if step % args.every == 0:
            ck.save(ct.capture(model, opt, sched), step)
        if step == args.pause_at:
            ck.wait_all()  # so the kill lands at a known point: the last save is durable
            emit(paused=step)
            time.sleep(600)
    ck.close()
    if args.out:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "losses": losses}, args.out)


if __name__ == "__main__":
    main()
