"""The documentation site (issue 17): every Python block runs, the site builds, the reference matches the code.

- Every ```python block of README.md and docs/**/*.md runs, in page order, in one
  namespace per page (a later block may use what an earlier one defined), in a
  temporary working directory. A block that needs something this machine does not
  have is marked with an HTML comment on the line before it and runs against the
  simulator's stand-in instead of being skipped:

  ``<!-- docs-test: live -->``: the code talks to OpenAI (no ``url=``): a
  simulator on 127.0.0.1 plays OpenAI (``rtqueue.protocol.OPENAI_URL`` points at
  it, ``OPENAI_API_KEY`` is a dummy, ``OPENAI_BASE_URL`` is its call-control REST
  base for :class:`rtqueue.sip.CallControl`).

  ``<!-- docs-test: sound-card -->``: ``audio=True`` / ``AudioIO.default()`` get a
  device-less speaker and a microphone that asks a synthesized question, and
  ``input()`` returns once the simulator has answered it.

- ``mkdocs build --strict`` succeeds (no warnings: broken links and anchors are
  warnings in mkdocs.yml's ``validation``) into a temporary folder.
- The event table (docs/reference/events.md) lists exactly the event types the
  code publishes, with their fields; every name in ``rtqueue.__all__`` and every
  error of ``rtqueue.errors`` is documented.
"""

from __future__ import annotations

import ast
import builtins
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import rtqueue
import rtqueue.errors
from rtqueue import protocol

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
MARK = re.compile(r"<!--\s*docs-test:\s*(?P<opts>[^>]*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\s*$")
KNOWN_OPTS = {"live", "sound-card"}


# ----------------------------------------------------------------------------- collecting blocks


@attrs.frozen
class Block:
    page: Path
    line: int
    code: str
    opts: frozenset[str]


def blocks(page: Path) -> list[Block]:
    """The ```python blocks of a page with the options of the marker comment before each."""
    out: list[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m["indent"], m["lang"], i
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if lang == "python":
            prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            mark = MARK.search(prev)
            opts = frozenset(o.strip() for o in mark["opts"].split(",")) if mark else frozenset()
            body = "\n".join(ln[len(indent):] for ln in lines[start + 1:j])
            out.append(Block(page, start + 1, body, opts))
        i = j + 1
    return out


def _page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


PAGES_WITH_CODE = [p for p in PAGES if blocks(p)]


# ----------------------------------------------------------------------------- stand-ins


class StandIns:
    """The simulator's stand-ins for OpenAI and the sound card, made on first use, one set per page."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mp = monkeypatch
        self.sim: rtqueue.Simulator | None = None
        self.live = False
        self.sound = False

    def openai(self) -> rtqueue.Simulator:
        if self.sim is None:
            self.sim = rtqueue.Simulator(speed=None).start()
        if not self.live:
            self.live = True
            self.mp.setattr(protocol, "OPENAI_URL", f"ws://127.0.0.1:{self.sim.port}/v1/realtime")
            self.mp.setenv("OPENAI_API_KEY", "sk-docs-test-not-a-key")
            self.mp.setenv("OPENAI_BASE_URL", self.sim.http_base_url)
        return self.sim

    def sound_card(self) -> None:
        if self.sound:
            return
        self.sound = True
        from rtqueue.audio import AudioIO, NullSpeaker, PcmMicrophone
        from rtqueue.sim import synthesize

        mics: list[PcmMicrophone] = []
        before: list[int] = []

        def answers() -> int:
            sim = self.sim
            return 0 if sim is None else sum(1 for e in sim.server_events() if e.get("type") == "response.done")

        def default(cls: Any = None, **_kw: Any) -> AudioIO:
            mic = PcmMicrophone(synthesize("What are your opening hours on Monday?").pcm, speed=4.0,
                                trailing_silence_ms=800)
            mics.append(mic)
            before.append(answers())
            return AudioIO(NullSpeaker(speed=4.0), mic)

        def answered(prompt: str = "") -> str:
            """Return once the question was spoken and the simulator answered it."""
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not (mics and mics[-1].finished.is_set()):
                time.sleep(0.05)
            sim = self.sim
            if sim is not None and before:
                assert sim.wait_until(lambda s: answers() > before[-1], timeout=15), "no answer to the question"
            return ""

        self.mp.setattr(AudioIO, "default", classmethod(default))
        self.mp.setattr(builtins, "input", answered)

    def close(self) -> None:
        if self.sim is not None:
            self.sim.close()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=_page_id)
def test_every_python_block_runs(page: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ```python block of the page runs, in order, in one namespace (stand-ins where marked)."""
    stand = StandIns(monkeypatch)
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    try:
        for block in blocks(page):
            unknown = block.opts - KNOWN_OPTS
            assert not unknown, f"{_page_id(page)}:{block.line}: unknown docs-test option {sorted(unknown)}"
            if "live" in block.opts:
                stand.openai()
            if "sound-card" in block.opts:
                stand.sound_card()
            code = compile(block.code, f"{_page_id(page)}:{block.line}", "exec")
            try:
                exec(code, namespace)
            except BaseException as exc:
                raise AssertionError(f"{_page_id(page)}, block at line {block.line} failed: {exc!r}") from exc
    finally:
        stand.close()


def test_blocks_are_collected() -> None:
    """The collector sees the pages' blocks, and the README's example is one of them."""
    assert any(p.name == "README.md" for p in PAGES_WITH_CODE)
    assert sum(len(blocks(p)) for p in PAGES) >= 30


# ----------------------------------------------------------------------------- the build


def test_site_builds_strict_with_no_warnings(tmp_path: Path) -> None:
    """`mkdocs build --strict` succeeds and says nothing at WARNING level (links and anchors included)."""
    if shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("mkdocs is not installed: pip install -e '.[test]' (or '.[docs]')")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert not re.search(r"^(WARNING|ERROR)\b", out, re.M), out
    site = tmp_path / "site"
    assert (site / "reference" / "api.html").exists() and (site / "benchmarks.html").exists()
    # The generated parts are there: the CLI's help and the benchmark results with their charts.
    assert "usage: rtqueue demo" in (site / "reference" / "cli.html").read_text()
    bench = (site / "benchmarks.html").read_text()
    assert "Latest run of each benchmark" in bench
    for png in (ROOT / "benchmarks" / "results").glob("*.png"):
        assert (site / "benchmarks" / png.name).exists() and f"benchmarks/{png.name}" in bench
    # Nothing is fetched from the network when a page is viewed: no web fonts, no diagram CDN.
    index = (site / "index.html").read_text()
    assert "fonts.googleapis" not in index and "mermaid" not in index


# ----------------------------------------------------------------------------- the event table


def _table(page: Path) -> dict[str, tuple[str, set[str]]]:
    """``{type: (source, fields)}`` from the rows of the page's event table."""
    rows: dict[str, tuple[str, set[str]]] = {}
    for line in page.read_text().splitlines():
        m = re.match(r"^\| `([a-z_.]+)` \| (server|rtqueue) \| ([^|]*) \|", line)
        if m:
            assert m[1] not in rows, f"{m[1]} is in the table twice"
            rows[m[1]] = (m[2], set(re.findall(r"`([a-z_]+)`", m[3])))
    return rows


def _str_value(node: ast.expr, consts: dict[str, str]) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _str_value(node.body, consts) + _str_value(node.orelse, consts)
    if isinstance(node, ast.Name) and node.id in consts:
        return [consts[node.id]]
    return []


#: Events whose data is an attrs value turned into a dict: the class gives the fields.
ATTRS_EVENTS = {"audio.interrupted": rtqueue.Interruption, "tool.approval_requested": rtqueue.ApprovalRequest}


def published_by_rtqueue() -> dict[str, set[str]]:
    """Event types (and their data's keys) of every ``Event("...")``/``Publish("...")`` in rtqueue/ (not sim/)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "rtqueue").rglob("*.py")):
        if "sim" in path.relative_to(ROOT / "rtqueue").parts[:1]:
            continue
        tree = ast.parse(path.read_text())
        consts = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                  for t in n.targets if isinstance(t, ast.Name)
                  and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)}
        assigned: dict[str, ast.Dict] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        assigned[t.id] = node.value
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name not in ("Event", "Publish", "publish"):
                continue
            types = _str_value(node.args[0], consts)
            if name == "publish" and not types:
                continue                      # publish(Event(...)): the Event is scanned itself
            assert types or name == "Event", f"{path}:{node.lineno}: a published type the check cannot read"
            for typ in types:
                keys = found.setdefault(typ, set())
                data = node.args[1] if len(node.args) > 1 else None
                if isinstance(data, ast.Name) and data.id in assigned:
                    data = assigned[data.id]
                if isinstance(data, ast.Dict):
                    keys.update(k.value for k in data.keys if isinstance(k, ast.Constant))
                elif typ in ATTRS_EVENTS:
                    keys.update(a.name for a in attrs.fields(ATTRS_EVENTS[typ]))
                elif data is not None:
                    pytest.fail(f"{path}:{node.lineno}: the data of {typ!r} is not a dict literal; "
                                "add it to ATTRS_EVENTS or publish a literal dict")
    found = {t: k - {"type"} for t, k in found.items()}
    return {t: k for t, k in found.items() if not t.startswith("x.")}


def sent_by_the_simulator() -> set[str]:
    """Server event types the simulator emits (``_emit("...")`` in rtqueue/sim)."""
    types: set[str] = set()
    for path in sorted((ROOT / "rtqueue" / "sim").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "_emit":
                types.update(_str_value(node.args[0], {}))
    return types


def ga_server_events() -> dict[str, set[str]]:
    """Every GA server event type of the openai package, with its fields (less type and event_id)."""
    import typing

    from openai.types.realtime import RealtimeServerEvent

    members = typing.get_args(RealtimeServerEvent)
    if members and typing.get_origin(members[0]) is typing.Union:
        members = typing.get_args(members[0])
    out: dict[str, set[str]] = {}
    for model in members:
        for typ in typing.get_args(model.model_fields["type"].annotation):
            out[typ] = set(model.model_fields) - {"type", "event_id"}
    assert len(out) > 30
    return out


def test_event_table_matches_the_code() -> None:
    """docs/reference/events.md: server rows = the GA server events; rtqueue rows = what the code publishes."""
    table = _table(DOCS / "reference" / "events.md")
    ga = ga_server_events()
    ours = published_by_rtqueue()
    server_rows = {t for t, (src, _) in table.items() if src == "server"}
    sdk_rows = {t for t, (src, _) in table.items() if src == "rtqueue"}
    assert server_rows == set(ga), f"missing {sorted(set(ga) - server_rows)}, not GA {sorted(server_rows - set(ga))}"
    assert sent_by_the_simulator() <= server_rows
    for typ in server_rows:
        fields = table[typ][1]
        extra = ours.get(typ, set())            # a server type rtqueue publishes itself (Twilio's DTMF)
        assert ga[typ] <= fields <= ga[typ] | extra, f"{typ}: table {sorted(fields)}, GA {sorted(ga[typ])}"
    sdk = {t for t in ours if t not in ga}
    assert sdk_rows == sdk, f"not in the table: {sorted(sdk - sdk_rows)}; not published: {sorted(sdk_rows - sdk)}"
    for typ in sdk:
        assert table[typ][1] == ours[typ], f"{typ}: table {sorted(table[typ][1])}, code {sorted(ours[typ])}"


# ----------------------------------------------------------------------------- the API reference


def test_every_public_name_is_documented() -> None:
    """Each name of rtqueue.__all__ has a ::: directive in the reference (constants and errors: named there)."""
    api = (DOCS / "reference" / "api.md").read_text()
    errors_page = (DOCS / "reference" / "errors.md").read_text()
    directives = set(re.findall(r"^::: rtqueue\.(\w+)\s*$", api, re.M))
    for name in rtqueue.__all__:
        obj = getattr(rtqueue, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert f"| `{name}` |" in errors_page, f"{name} is not in the errors table"
        elif callable(obj) or isinstance(obj, type):
            assert name in directives, f"rtqueue.{name} has no '::: rtqueue.{name}' in docs/reference/api.md"
        else:
            assert f"`rtqueue.{name}`" in api, f"rtqueue.{name} is not mentioned in docs/reference/api.md"
    for name in rtqueue.errors.__all__:
        assert f"| `{name}` |" in errors_page, f"{name} is not in the errors table"
    assert "::: rtqueue.errors" in errors_page
