"""The architecture is checked, not hoped for (issue 12).

- ``mypy --strict rtqueue`` is clean and the package ships ``py.typed``;
- no module reads another's private members (ruff's ``SLF001``);
- import-linter's contracts in ``pyproject.toml``: the sans-I/O cores (the
  conversation core, the gate state, the history, the simulator core) import
  no thread, socket, event-loop or audio module, and rtqueue's modules import
  each other in no cycle (``TYPE_CHECKING`` imports included).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def tool(name: str) -> str:
    found = BIN / name
    if found.exists():
        return str(found)
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (it is in the test extras)")
    return path


def test_mypy_strict_passes():
    """`mypy --strict rtqueue` reports no error."""
    result = run(sys.executable, "-m", "mypy", "--strict", "rtqueue")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_private_member_access_across_modules():
    """ruff SLF001 (private member access) is clean for rtqueue/."""
    result = run(tool("ruff"), "check", "--select", "SLF001", "--no-cache", "rtqueue")
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts_are_kept():
    """lint-imports: the cores import no thread/socket module; no import cycles in rtqueue."""
    result = run(tool("lint-imports"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_import_rtqueue_leaves_the_simulator_unloaded() -> None:
    """An app that talks to OpenAI never imports the simulator (its import time and its objects in every GC)."""
    code = (
        "import sys, rtqueue\n"
        "assert 'rtqueue.sim' not in sys.modules and 'websockets' not in sys.modules, sorted(sys.modules)\n"
        "from rtqueue import Simulator, FaultPlan\n"
        "assert rtqueue.Simulator is Simulator and Simulator.__module__ == 'rtqueue.sim.server'\n"
        "assert rtqueue.FaultPlan is FaultPlan\n"
        "try:\n"
        "    rtqueue.NoSuchThing\n"
        "except AttributeError as exc:\n"
        "    assert 'NoSuchThing' in str(exc)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
