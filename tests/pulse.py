"""A private PulseAudio server with a null sink, for real-device audio tests.

``PulseServer.start()`` runs ``pulseaudio`` in the foreground as our own child
process, with a fresh runtime directory, a null sink ``rtq`` as the default
sink and its monitor ``rtq.monitor`` as the default source: what is played to
the default output can be recorded from the default input. Clients find it
through ``PULSE_SERVER`` (set in ``os.environ`` while it runs, restored on
``stop()``); PortAudio reaches it through ALSA's pulse plugin (Debian package
``libasound2-plugins``), as the "pulse" and "default" devices.

A silent keep-alive stream (``pacat`` reading /dev/zero at 20 ms latency) plays
into the sink the whole time: without any client, the null sink sleeps with its
2-second maximum latency, and the first stream after idling stalls for up to
2 s before its callbacks start.

PortAudio enumerates devices once, at initialisation: :meth:`PulseServer.start`
re-initialises sounddevice if it was already imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["PulseServer", "PulseUnavailable"]

_START_TIMEOUT = 10.0
_PACAT_SILENCE = ("pacat", "--playback", "--raw", "--format=s16le", "--rate=48000", "--channels=2", "--latency-msec=20")


class PulseUnavailable(Exception):
    """PulseAudio (or its tools, or PortAudio's route to it) is not usable here."""


def _reinit_portaudio() -> None:
    sd = sys.modules.get("sounddevice")
    if sd is not None:
        # Re-enumerate devices: PortAudio cached them when sounddevice was imported.
        sd._terminate()
        sd._initialize()


class PulseServer:
    """A running private PulseAudio; use :meth:`start` and :meth:`stop` (or ``with``)."""

    SINK = "rtq"
    SOURCE = "rtq.monitor"

    def __init__(self, runtime_dir: Path, proc: subprocess.Popen[bytes], env: dict[str, str]) -> None:
        self.runtime_dir = runtime_dir
        self.proc = proc
        self.env = env  # environment for client subprocesses (paplay, parec, pactl)
        self.keepalive: subprocess.Popen[bytes] | None = None
        self._saved_env: dict[str, str | None] = {}

    @classmethod
    def start(cls) -> PulseServer:
        """Start the server and make it this process's default; raises :class:`PulseUnavailable`."""
        for tool in ("pulseaudio", "pactl", "pacat"):
            if shutil.which(tool) is None:
                raise PulseUnavailable(f"{tool} not installed (apt-get install pulseaudio pulseaudio-utils)")
        runtime = Path(tempfile.mkdtemp(prefix="rtq-pulse-"))
        socket = runtime / "native"
        env = dict(os.environ)
        env.update(
            XDG_RUNTIME_DIR=str(runtime),
            PULSE_RUNTIME_PATH=str(runtime),
            HOME=str(runtime),  # pulseaudio wants a writable home for its state (esp. as root)
            PULSE_SERVER=f"unix:{socket}",
        )
        env.pop("PULSE_SINK", None)
        env.pop("PULSE_SOURCE", None)
        log = open(runtime / "pulseaudio.log", "wb")  # noqa: SIM115 - lives with the process
        proc = subprocess.Popen(
            [
                "pulseaudio",
                "--daemonize=no",
                "--exit-idle-time=-1",
                "-n",  # no default.pa: only the modules below
                "--use-pid-file=no",
                "--system=false",
                "--log-target=stderr",
                f"--load=module-native-protocol-unix auth-anonymous=1 socket={socket}",
                f"--load=module-null-sink sink_name={cls.SINK}",
                "--load=module-always-sink",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        server = cls(runtime, proc, env)
        try:
            server._wait_ready()
            server._pactl("set-default-sink", cls.SINK)
            server._pactl("set-default-source", cls.SOURCE)
            with open("/dev/zero", "rb") as zero:
                server.keepalive = subprocess.Popen(
                    [*_PACAT_SILENCE],
                    env=env,
                    stdin=zero,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
        except BaseException:
            server.stop()
            raise
        server._activate()
        return server

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise PulseUnavailable(f"pulseaudio exited with {self.proc.returncode}: {self.log_tail()}")
            done = subprocess.run(["pactl", "info"], env=self.env, capture_output=True, timeout=_START_TIMEOUT)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise PulseUnavailable(f"pulseaudio did not answer within {_START_TIMEOUT}s: {self.log_tail()}")
            # Waiting for an external process to come up: a short bounded retry.
            time.sleep(0.05)

    def _pactl(self, *args: str) -> str:
        done = subprocess.run(["pactl", *args], env=self.env, capture_output=True, text=True, timeout=_START_TIMEOUT)
        if done.returncode != 0:
            raise PulseUnavailable(f"pactl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def _activate(self) -> None:
        for key in ("XDG_RUNTIME_DIR", "PULSE_RUNTIME_PATH", "PULSE_SERVER", "PULSE_SINK", "PULSE_SOURCE"):
            self._saved_env[key] = os.environ.get(key)
        for key in ("XDG_RUNTIME_DIR", "PULSE_RUNTIME_PATH", "PULSE_SERVER"):
            os.environ[key] = self.env[key]
        os.environ.pop("PULSE_SINK", None)
        os.environ.pop("PULSE_SOURCE", None)
        _reinit_portaudio()

    def log_tail(self, n: int = 2000) -> str:
        """The end of the server's log (for failure messages)."""
        try:
            return (self.runtime_dir / "pulseaudio.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the keep-alive and the server, restore the environment, remove the runtime dir."""
        for proc in (self.keepalive, self.proc):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if self._saved_env:
            self._saved_env = {}
            _reinit_portaudio()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def __enter__(self) -> PulseServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
