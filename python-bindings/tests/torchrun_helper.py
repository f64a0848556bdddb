"""Run by torchrun (two processes): each opens `ckptd.Checkpointer(job)` with no rank and no
world size, as the README says, saves its own values as step 1, and waits for the commit."""

from __future__ import annotations

import os
import sys

import numpy as np

import ckptd

store, arena, job = sys.argv[1], sys.argv[2], sys.argv[3]
with ckptd.Checkpointer(job, store=store, arena_dir=arena) as ck:
    rank = int(os.environ["RANK"])
    ck.save({"w": np.full(1000, float(rank + 1), dtype=np.float32)}, 1).wait()
