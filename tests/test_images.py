"""Image input: checks before sending, the GA input_image part, history references and reconnect re-seeding."""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from openai.types.realtime import ConversationItemCreateEvent
from openai.types.realtime.realtime_conversation_item_user_message import RealtimeConversationItemUserMessage

from rtqueue import FaultPlan, ReconnectPolicy, Session, Simulator
from rtqueue.errors import InvalidArgument
from rtqueue.history import History, reseed_plan
from rtqueue.images import MAX_IMAGE_BYTES, image_part, image_ref, load_image, sniff_mime
from tests.test_config import assert_no_extras
from tests.utils import UNIT

FAST = ReconnectPolicy(initial_backoff=0.01, max_backoff=0.05, connect_timeout=UNIT)


def png(width: int = 2, height: int = 2) -> bytes:
    """A real (tiny, grey) PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


MAGIC = {
    "image/png": png(),
    "image/jpeg": b"\xff\xd8\xff\xe0" + b"\x00" * 20,
    "image/gif": b"GIF89a" + b"\x00" * 20,
    "image/webp": b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 10,
}


@pytest.mark.parametrize("mime", list(MAGIC))
def test_each_image_type_is_told_by_its_magic_bytes(mime: str):
    """PNG, JPEG, GIF and WebP are recognised from their bytes; the stated mime must agree."""
    assert sniff_mime(MAGIC[mime]) == mime
    assert load_image(MAGIC[mime]) == (MAGIC[mime], mime)
    assert load_image(MAGIC[mime], mime.upper()) == (MAGIC[mime], mime)
    other = "image/png" if mime != "image/png" else "image/gif"
    with pytest.raises(InvalidArgument, match="not the stated"):
        load_image(MAGIC[mime], other)


def test_jpg_is_read_as_jpeg():
    """mime="image/jpg" is taken as image/jpeg."""
    assert load_image(MAGIC["image/jpeg"], "image/jpg")[1] == "image/jpeg"


def test_bad_images_raise_before_anything(tmp_path: Path):
    """Missing files, directories, empty or non-image bytes, oversized images and bad types raise InvalidArgument."""
    with pytest.raises(InvalidArgument, match="no such image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InvalidArgument, match="no such image file"):
        load_image(tmp_path)
    with pytest.raises(InvalidArgument, match="empty"):
        load_image(b"")
    with pytest.raises(InvalidArgument, match="not a PNG, JPEG, WebP or GIF"):
        load_image(b"%PDF-1.7 not an image")
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(InvalidArgument, match="not a PNG"):
        load_image(text)
    big = tmp_path / "big.png"
    with big.open("wb") as f:
        f.write(png())
        f.truncate(MAX_IMAGE_BYTES + 1)  # sparse: no 10 MB written
    with pytest.raises(InvalidArgument, match="the limit is"):
        load_image(big)
    with pytest.raises(InvalidArgument, match="the limit is"):
        load_image(png() + bytes(MAX_IMAGE_BYTES))
    with pytest.raises(InvalidArgument, match="file path or the image's bytes"):
        load_image(12)
    with pytest.raises(InvalidArgument, match="mime must be"):
        load_image(png(), mime=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="detail"):
        image_part(png(), "image/png", "ultra")


def test_the_part_is_a_ga_input_image():
    """The content part validates as a GA user message's input_image, with no unknown field."""
    part = image_part(png(), "image/png", "low")
    message = {"type": "message", "role": "user", "content": [part, {"type": "input_text", "text": "What?"}]}
    assert_no_extras(RealtimeConversationItemUserMessage.model_validate(message))
    assert part["image_url"] == "data:image/png;base64," + base64.b64encode(png()).decode()


def test_a_reference_is_sha256_and_size():
    """image_ref of a data URL is the SHA-256 and size of the decoded image; non-data URLs give none."""
    ref = image_ref(image_part(png(), "image/png"))
    assert ref is not None
    assert ref.to_dict() == {"image": hashlib.sha256(png()).hexdigest(), "bytes": len(png()), "mime_type": "image/png"}
    assert image_ref({"type": "input_image", "image_url": "https://example.com/x.png"}) is None
    assert image_ref({"type": "input_image", "image_url": "data:image/png;base64,@@@"}) is None
    assert image_ref(ref.to_dict()) == ref


def test_reseed_plan_reports_images_it_cannot_carry():
    """Re-seeding keeps a message's text, drops its images and says so (reason "image")."""
    h = History()
    h.put({"id": "a", "type": "message", "role": "user", "status": "completed",
           "content": [image_part(png(), "image/png"), {"type": "input_text", "text": "What is this?"}]})
    h.put({"id": "b", "type": "message", "role": "user", "status": "completed",
           "content": [image_part(MAGIC["image/gif"], "image/gif")]})
    seeds, dropped = reseed_plan(h.items())
    assert seeds == [{"id": "a", "type": "message", "role": "user",
                      "content": [{"type": "input_text", "text": "What is this?"}]}]
    assert dropped == {"image": 2}
    assert "image_url" not in str(h.items())


def sent_items(sim: Simulator, session: int) -> list[dict[str, Any]]:
    return [e["item"] for e in sim.client_events(session) if e["type"] == "conversation.item.create"]


def test_send_image_to_the_simulator_and_across_a_reconnect(sim: Simulator, tmp_path: Path):
    """send_image: a GA item the simulator accepts, kept by reference; a reconnect re-seeds its text only."""
    path = tmp_path / "photo.png"
    path.write_bytes(png())
    with Session.connect(url=sim.url, reconnect=FAST) as session:
        items = session.events("conversation.item.done")
        session.send_image(path, "What is in this picture?", detail="auto").wait_sent(UNIT)
        assert items.get(UNIT) is not None
        [event] = [e for e in sim.client_events(0) if e["type"] == "conversation.item.create"]
        assert_no_extras(ConversationItemCreateEvent.model_validate(event))
        [item] = session.items
        assert item["content"] == [
            {"type": "input_image", "image": hashlib.sha256(png()).hexdigest(), "bytes": len(png()),
             "mime_type": "image/png"},
            {"type": "input_text", "text": "What is in this picture?"},
        ]
        assert session.ask("And now?", timeout=UNIT).status == "completed"

        reconnected = session.events("session.reconnected")
        sim.inject(FaultPlan(drop_after_events=0), session=0)
        ev = reconnected.get(UNIT)
        assert ev is not None and ev.not_carried_by_reason.get("image") == 1
        assert session.ask("Still there?", timeout=UNIT).status == "completed"  # after the re-seed, on the wire
        assert sent_items(sim, 1)[0]["content"] == [{"type": "input_text", "text": "What is in this picture?"}]
    assert sim.stats()["errors"] == {}


def test_send_image_checks_everything_before_sending(sim: Simulator, tmp_path: Path):
    """A bad image or text raises InvalidArgument and nothing reaches the server."""
    with Session.connect(url=sim.url) as session:
        with pytest.raises(InvalidArgument):
            session.send_image(tmp_path / "none.png")
        with pytest.raises(InvalidArgument):
            session.send_image(b"not an image")
        with pytest.raises(InvalidArgument, match="text must be a str"):
            session.send_image(png(), text=5)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="not the stated"):
            session.send_image(png(), mime="image/jpeg")
        added = session.events("conversation.item.added")
        session.send_image(png())
        assert added.get(UNIT) is not None  # the server has it, so its record of client events too
        assert len(sent_items(sim, 0)) == 1
