"""Shared fixtures: one timeout unit, a simulator, and a thread-leak check."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tests.utils import UNIT


def rtqueue_threads() -> list[threading.Thread]:
    """Live threads started by rtqueue (the SDK, its simulator, its audio)."""
    return [t for t in threading.enumerate() if t.name.startswith("rtqueue-") and t.is_alive()]


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """After each test, every thread rtqueue started has ended."""
    before = set(rtqueue_threads())
    yield
    deadline = time.monotonic() + UNIT
    leaked = [t for t in rtqueue_threads() if t not in before]
    while leaked and time.monotonic() < deadline:
        leaked[0].join(deadline - time.monotonic())
        leaked = [t for t in rtqueue_threads() if t not in before]
    assert not leaked, f"threads still alive after the test: {[t.name for t in leaked]}"


@pytest.fixture
def sim() -> Iterator[object]:
    """A fast simulator (no pacing) on a free loopback port."""
    from rtqueue import Simulator

    with Simulator(speed=None, seed=1) as s:
        yield s
