"""torchrun with no `rank=`: every process finds its rank and the world size in the environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import ckptd

from .conftest import shard_file

HERE = Path(__file__).resolve().parent


def test_torchrun_without_rank_arguments_writes_one_shard_per_rank(tmp_path: Path, store: str, job: str) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(HERE / "torchrun_helper.py"),
            store,
            str(tmp_path / "arena"),
            job,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    step_dir = tmp_path / "store" / job / "step-1"
    assert sorted(p.name for p in step_dir.iterdir()) == sorted(["MANIFEST", shard_file(step_dir, 0).name, shard_file(step_dir, 1).name])
    for rank in range(2):
        with ckptd.Checkpointer(job, store=store, rank=rank, world_size=2, arena_dir=tmp_path / "read") as ck:
            w = {"w": np.zeros(1000, dtype=np.float32)}
            assert ck.load(w) == 1
            assert (w["w"] == rank + 1).all(), f"rank {rank} holds another rank's values"
