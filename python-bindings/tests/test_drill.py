"""Issue 13's end-to-end drill, in the suite: a real torch.distributed job (two launchers of two
gloo workers each, DDP, AdamW, the README's checkpoint pattern) recovers by itself from an XID on
one pod (isolator + kmock: the node is isolated and the pod replaced), from a hung worker
(SIGSTOP), and from a local fault with no isolator. Each run must resume every rank from one
committed step, from memory where the pod survived, and end bitwise identical to an
uninterrupted run. ``drill.py`` does the work and documents each scenario; each result (the
recovery timeline) is appended to ``$CKPTD_DRILL_RESULTS`` when it is set, for the suite's summary.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import drill  # noqa: E402


def _kmock_or_skip() -> None:
    if importlib.util.find_spec("kmock") is None:
        if os.environ.get("CKPTD_REQUIRE_KMOCK"):
            pytest.fail("kmock is not installed and CKPTD_REQUIRE_KMOCK is set: pip install kmock")
        pytest.skip("kmock is not installed (pip install kmock)")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run's final states."""
    return drill.baseline(tmp_path_factory.mktemp("drill-baseline"))


def _record(result: dict[str, Any]) -> None:
    print(json.dumps(result))
    path = os.environ.get("CKPTD_DRILL_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(result) + "\n")


def _check(result: dict[str, Any], scenario: str) -> None:
    # drill.run raises on every failed expectation; these restate the contract for the reader.
    assert result["scenario"] == scenario
    assert result["bitwise_identical"] is True
    assert result["resumed_step"] >= drill.FAULT_AFTER
    phases = result["since_fault_s"]
    for phase in ("workers_exited", "restarted", "rendezvous", "restored", "first_step"):
        assert phases[phase] > 0, f"{phase} missing from {phases}"
    assert phases["restarted"] <= phases["rendezvous"] <= phases["restored"] <= phases["first_step"]


def test_xid_on_one_pod_isolates_its_node_and_the_job_resumes_bitwise(tmp_path: Path, reference: Path) -> None:
    _kmock_or_skip()
    result = drill.run("xid", tmp_path, reference)
    _record(result)
    _check(result, "xid")
    assert result["memory"] == {"0": True, "1": True, "2": False, "3": False}
    assert result["since_fault_s"]["isolated"] > 0


def test_a_stopped_worker_is_a_hang_and_the_job_resumes_bitwise(tmp_path: Path, reference: Path) -> None:
    _kmock_or_skip()
    result = drill.run("hang", tmp_path, reference)
    _record(result)
    _check(result, "hang")
    assert all(result["memory"].values()), result["memory"]
    assert result["since_fault_s"]["detected"] > 0


def test_a_local_fault_without_an_isolator_restarts_and_resumes_bitwise(tmp_path: Path, reference: Path) -> None:
    result = drill.run("local", tmp_path, reference)
    _record(result)
    _check(result, "local")
    assert all(result["memory"].values()), result["memory"]
