"""The drill's training script, run by torchrun: DDP over gloo on CPU, AdamW, the README's
checkpoint pattern, nothing else of ckptd (no heartbeat, no restore_order polling).

Usage: drill_train.py <events-dir> <final-dir> <steps> <save-every> <step-sleep-s>

Every batch is a function of (step, rank) alone, so a run that restarts from step s and the
uninterrupted run compute the same weights bitwise. Each process appends one JSON object per
event to `<events-dir>/rank-<r>.jsonl` (wall-clock seconds, so that the harness can line them
up with the fault): `start` (before torch is imported), `rendezvous` (the process group is up),
`restored` (step, from memory or storage, how long the load took), `step` (every step done),
`done`. At the end each rank writes its model and optimizer state to
`<final-dir>/rank-<r>.pt` for the bitwise comparison.
"""

from __future__ import annotations

import time

STARTED = time.time()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import ckptd  # noqa: E402
import ckptd.torch  # noqa: E402

events_dir, final_dir = Path(sys.argv[1]), Path(sys.argv[2])
steps, save_every, step_sleep = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
rank = int(os.environ["RANK"])
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
log = (events_dir / f"rank-{rank}.jsonl").open("a")


def event(kind: str, **fields: object) -> None:
    log.write(json.dumps({"t": time.time(), "event": kind, "rank": rank, "attempt": attempt, **fields}) + "\n")
    log.flush()


event("start", t=STARTED, pid=os.getpid())
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
dist.init_process_group("gloo")
event("rendezvous")
world = dist.get_world_size()

torch.manual_seed(1234)
# find_unused_parameters keeps DDP's gradient buckets in their initial layout for the whole run
# (DDP otherwise rebuilds them after its first iteration, so a restarted run would sum the
# gradients in another order than the uninterrupted one, and differ in the last bits).
model = DistributedDataParallel(
    torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16)),
    find_unused_parameters=True,
)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 1000 + rank)
    return torch.randn(32, 64, generator=g), torch.randn(32, 16, generator=g)


# The README's pattern, followed literally.
with ckptd.Checkpointer("drill") as ck:
    start, extra = 0, {"epoch": 0}
    t0 = time.time()
    try:  # every rank calls restore: under torch.distributed the ranks agree on one step
        start = ckptd.torch.restore(ck, model, optimizer, extra=extra)
        event("restored", step=start, memory=ck.last_load_from_memory, load_s=time.time() - t0)
    except ckptd.NoCheckpoint:
        pass
    ckptd.torch.fence_before_step(optimizer, ck)
    for step in range(start + 1, steps + 1):
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % save_every == 0:
            ck.save(ckptd.torch.capture(model, optimizer, extra=extra), step)
        event("step", step=step)
        time.sleep(step_sleep)
    ck.wait_all()

final_dir.mkdir(parents=True, exist_ok=True)
torch.save(
    {"model": model.module.state_dict(), "optimizer": optimizer.state_dict()}, final_dir / f"rank-{rank}.pt"
)
event("done")
dist.destroy_process_group()
