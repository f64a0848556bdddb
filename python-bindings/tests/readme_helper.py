"""The training loop of the README's Python example, followed literally (no heartbeat calls), for
test_progress.py. The agent comes from CKPTD_SOCKET, the job is "my-job".

Prints {"restored": N} after a restore, {"step": N} after each optimizer step. With
--stall-in-restore, the scheduler's load_state_dict (which restore calls after loading) prints
{"stalled": true} and sleeps until the process is killed: a restore that never ends.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

import ckptd
import ckptd.torch


def emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


class StallingScheduler:
    """A scheduler whose state never finishes loading."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def state_dict(self) -> Any:
        return self.inner.state_dict()

    def load_state_dict(self, state: Any) -> None:
        del state
        emit(stalled=True)
        time.sleep(600)

    def step(self) -> None:
        self.inner.step()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--stall-in-restore", action="store_true")
    args = p.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler: Any = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50)
    if args.stall_in_restore:
        scheduler = StallingScheduler(scheduler)
    steps = args.steps

    # From here on: the README's example.
    with ckptd.Checkpointer("my-job") as ck:
        start, extra = 0, {"epoch": 0}
        try:
            start = ckptd.torch.restore(ck, model, optimizer, scheduler, extra=extra)
            emit(restored=start)
        except ckptd.NoCheckpoint:
            pass
        ckptd.torch.fence_before_step(optimizer, ck)
        for step in range(start + 1, steps + 1):
            extra["epoch"] = step // 100
            loss = model(torch.randn(4, 16)).sum()
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            time.sleep(0.01)  # the rest of a real step: data loading, a bigger model
            emit(step=step)
            if step % 100 == 0:
                ck.save(ckptd.torch.capture(model, optimizer, scheduler, extra=extra), step)


if __name__ == "__main__":
    main()
