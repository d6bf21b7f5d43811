"""The pair of audio endpoints a session uses."""

from __future__ import annotations

from typing import Any

import attrs

from ..errors import InvalidArgument
from ._backend import load_sounddevice
from .input import AudioInput, Microphone, NullMicrophone
from .output import AudioOutput, NullSpeaker, Speaker

__all__ = ["AudioIO"]


@attrs.define(eq=False)
class AudioIO:
    """An output for assistant audio and an input for the user's voice; either may be None.

    The session starts and closes both; :meth:`close` is provided for apps that
    drive them directly.
    """

    output: AudioOutput | None = attrs.field(default=None)
    input: AudioInput | None = attrs.field(default=None)

    @output.validator
    def _check_output(self, _attr: Any, value: object) -> None:
        if value is not None and not isinstance(value, AudioOutput):
            raise InvalidArgument(f"AudioIO output must be an rtqueue.audio.AudioOutput or None, not {value!r}")

    @input.validator
    def _check_input(self, _attr: Any, value: object) -> None:
        if value is not None and not isinstance(value, AudioInput):
            raise InvalidArgument(f"AudioIO input must be an rtqueue.audio.AudioInput or None, not {value!r}")

    @classmethod
    def default(cls, *, output_device: int | str | None = None, input_device: int | str | None = None) -> AudioIO:
        """:class:`Speaker` + :class:`Microphone` on the default (or given) devices.

        Checks at once that PortAudio loads, raising
        :class:`~rtqueue.errors.AudioUnavailable` with install instructions if not.
        Devices are opened by ``start()``.
        """
        load_sounddevice()
        return cls(Speaker(output_device), Microphone(input_device))

    @classmethod
    def null(cls) -> AudioIO:
        """:class:`NullSpeaker` + :class:`NullMicrophone`: no device, real-time playback clock."""
        return cls(NullSpeaker(), NullMicrophone())

    def close(self) -> None:
        """Close both endpoints (idempotent); if one raises, the other is still closed, then it re-raises."""
        first: BaseException | None = None
        for end in (self.input, self.output):
            if end is None:
                continue
            try:
                end.close()
            except BaseException as exc:
                first = first or exc
        if first is not None:
            raise first
