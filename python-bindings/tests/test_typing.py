"""The checked-in stubs match the native module, and the Python layer type-checks strictly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> None:
    pytest.importorskip("mypy")
    r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def test_stubs_match_the_native_module() -> None:
    run("mypy.stubtest", "ckptd._native")


def test_package_type_checks_strictly() -> None:
    run("mypy")  # configuration: pyproject.toml [tool.mypy]


def test_import_does_not_import_torch_or_numpy() -> None:
    code = "import sys, ckptd; assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
