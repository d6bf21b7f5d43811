"""Audio for rtqueue: speakers that know what they played, microphones, WAV and null devices.

The session exchanges 24 kHz PCM16 little-endian mono with these objects.
Importing this package never loads PortAudio; only :class:`Speaker`,
:class:`Microphone` and :meth:`AudioIO.default` do, raising
:class:`~rtqueue.errors.AudioUnavailable` when it is missing.
"""

from .devices import AudioIO
from .input import AudioInput, Microphone, NullMicrophone, PcmMicrophone, WavMicrophone
from .output import AudioOutput, NullSpeaker, PlaybackCut, Speaker, WavSpeaker
from .pcm import (
    BYTES_PER_MS,
    SAMPLE_RATE,
    StreamResampler,
    float_to_pcm16,
    pcm16_to_float,
    read_wav_24k_mono,
    resample,
    rms_dbfs,
)

__all__ = [
    "BYTES_PER_MS",
    "SAMPLE_RATE",
    "AudioIO",
    "AudioInput",
    "AudioOutput",
    "Microphone",
    "NullMicrophone",
    "NullSpeaker",
    "PcmMicrophone",
    "PlaybackCut",
    "Speaker",
    "StreamResampler",
    "WavMicrophone",
    "WavSpeaker",
    "float_to_pcm16",
    "pcm16_to_float",
    "read_wav_24k_mono",
    "resample",
    "rms_dbfs",
]
