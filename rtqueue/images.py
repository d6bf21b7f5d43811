"""Image input: checked images as GA ``input_image`` content parts, and their compact references.

:meth:`Session.send_image <rtqueue.Session.send_image>` sends a user message
whose content holds an ``input_image`` part (``image_url``: a base64 data URL)
and, optionally, an ``input_text`` part. Before anything is sent the image is
checked: a file that exists, bytes that really are a PNG, JPEG, WebP or GIF
(by their magic bytes, whatever the name or a stated ``mime`` says) and no
larger than :data:`MAX_IMAGE_BYTES`.

The conversation history (:mod:`rtqueue.history`) keeps no image bytes: it
keeps an :class:`ImageRef` (SHA-256 and size) made by :func:`image_ref` from the
item the server echoes.

Pure: no threads, no sockets (the sans-I/O history imports it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from typing import Any, Final

import attrs

from .errors import InvalidArgument

__all__ = ["MAX_IMAGE_BYTES", "ImageRef", "image_part", "image_ref", "load_image", "sniff_mime"]

#: The largest image accepted (bytes, before base64). A client event carrying
#: it must fit the service's event size limit: base64 makes it a third larger.
MAX_IMAGE_BYTES: Final = 10 * 1024 * 1024

_DETAILS = ("auto", "low", "high")
_JPEG_ALIASES = {"image/jpg": "image/jpeg", "image/pjpeg": "image/jpeg"}


def sniff_mime(data: bytes) -> str | None:
    """The image type by magic bytes: ``image/png``, ``image/jpeg``, ``image/webp``, ``image/gif`` or ``None``."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def load_image(source: object, mime: str | None = None) -> tuple[bytes, str]:
    """The image's bytes and MIME type, checked; raise :class:`InvalidArgument` otherwise.

    ``source`` is a path (``str`` or ``os.PathLike``) or the image's bytes.
    ``mime``, when given, must agree with what the bytes are (``image/jpg``
    is read as ``image/jpeg``). Checks: the file exists and is a file, the
    bytes are a PNG, JPEG, WebP or GIF, and their size is at most
    :data:`MAX_IMAGE_BYTES`.
    """
    if mime is not None and not isinstance(mime, str):
        raise InvalidArgument(f"mime must be a str such as 'image/png', not {mime!r}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        where = "the image bytes"
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not isinstance(path, str):
            raise InvalidArgument(f"an image path must be a str path, not {source!r}")
        if not os.path.isfile(path):
            raise InvalidArgument(f"no such image file: {path!r}")
        size = os.path.getsize(path)
        if size > MAX_IMAGE_BYTES:  # refuse before reading a huge file into memory
            raise InvalidArgument(f"image {path!r} is {size} bytes; the limit is {MAX_IMAGE_BYTES} bytes")
        with open(path, "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
        where = f"image {path!r}"
    else:
        raise InvalidArgument(f"send_image takes a file path or the image's bytes, not {type(source).__name__}")
    if not data:
        raise InvalidArgument(f"{where} is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidArgument(f"{where} is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES} bytes")
    kind = sniff_mime(data)
    if kind is None:
        raise InvalidArgument(f"{where} is not a PNG, JPEG, WebP or GIF image (its first bytes are {data[:8]!r})")
    if mime is not None:
        stated = _JPEG_ALIASES.get(mime.lower(), mime.lower())
        if stated != kind:
            raise InvalidArgument(f"{where} is {kind}, not the stated {mime!r}")
    return data, kind


def image_part(data: bytes, mime: str, detail: str | None = None) -> dict[str, Any]:
    """The GA ``input_image`` content part: ``image_url`` a base64 data URL, optional ``detail``."""
    if detail is not None and detail not in _DETAILS:
        raise InvalidArgument(f"detail must be one of {', '.join(_DETAILS)}, not {detail!r}")
    part: dict[str, Any] = {"type": "input_image",
                            "image_url": f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"}
    if detail is not None:
        part["detail"] = detail
    return part


@attrs.frozen
class ImageRef:
    """What the history keeps of an image: its SHA-256 (hex), size in bytes and MIME type."""

    sha256: str
    bytes: int
    mime: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"image": sha256, "bytes": n, "mime_type": ...}``, the reference in :attr:`Session.items`."""
        out: dict[str, Any] = {"image": self.sha256, "bytes": self.bytes}
        if self.mime is not None:
            out["mime_type"] = self.mime
        return out


def image_ref(part: object) -> ImageRef | None:
    """The reference of an ``input_image`` part (its ``image_url`` data URL, or an earlier reference).

    ``None`` when the part holds neither (say, a URL that is not a data URL:
    the history then keeps nothing of it).
    """
    if not isinstance(part, dict):
        return None
    if isinstance(part.get("image"), str) and isinstance(part.get("bytes"), int):  # already a reference
        mime = part.get("mime_type")
        return ImageRef(part["image"], part["bytes"], mime if isinstance(mime, str) else None)
    url = part.get("image_url")
    if not isinstance(url, str) or not url.startswith("data:"):
        return None
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        return None
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None
    mime = head[len("data:"):-len(";base64")] or None
    return ImageRef(hashlib.sha256(data).hexdigest(), len(data), mime)
