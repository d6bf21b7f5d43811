"""MkDocs hooks for the documentation site (mkdocs.yml: ``hooks: [docs_hooks.py]``).

Pages hold placeholders that are filled from the code and the data at build time,
so these parts of the site cannot drift:

- ``<!-- generated: cli -->``: ``rtqueue --help`` and each subcommand's ``--help``;
- ``<!-- generated: benchmarks -->``: the latest run of each benchmark and every
  run on file, read from ``benchmarks/results/*.json`` (and the detailed tables of
  ``benchmarks/_report.py``);
- the charts ``benchmarks/results/*.png`` are added to the site under ``benchmarks/``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "benchmarks" / "results"


def cli_help() -> str:
    """The ``--help`` of ``rtqueue`` and of each subcommand, as markdown."""
    from rtqueue.cli import main

    parts = []
    for args in ([], ["demo"], ["sim"], ["serve"], ["timeline"], ["bench"]):
        out = io.StringIO()
        old = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "100"
        try:
            with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
                main([*args, "--help"], prog="rtqueue")
        finally:
            if old is None:
                os.environ.pop("COLUMNS", None)
            else:
                os.environ["COLUMNS"] = old
        title = " ".join(["rtqueue", *args])
        parts.append(f"### `{title}`\n\n```text\n{out.getvalue().rstrip()}\n```\n")
    return "\n".join(parts)


def _runs() -> list[tuple[Path, dict[str, Any]]]:
    runs = []
    for path in sorted(RESULTS.rglob("*.json")):
        doc = json.loads(path.read_text())
        if isinstance(doc, dict):
            runs.append((path, doc))
    return runs


def _kind(path: Path, doc: dict[str, Any]) -> str:
    return str(doc.get("benchmark") or ("soak" if "soak" in path.stem else path.stem))


def _date(doc: dict[str, Any]) -> str:
    m = doc.get("machine")
    return str(m.get("date", "")) if isinstance(m, dict) else ""


def _headline(doc: dict[str, Any]) -> str:
    targets = doc.get("targets")
    if isinstance(targets, list) and targets:
        ok = sum(1 for t in targets if t.get("pass"))
        return f"{ok}/{len(targets)} targets met"
    keys = ("conflicts", "lost_intents", "hung_waits", "reconnects", "simulated_min_reached")
    return ", ".join(f"{k} {doc[k]}" for k in keys if k in doc)


def benchmarks_markdown() -> str:
    """The results section of the Benchmarks page, from the JSON in benchmarks/results/."""
    runs = _runs()
    latest: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path, doc in runs:
        kind = _kind(path, doc)
        if kind not in latest or _date(doc) > _date(latest[kind][1]):
            latest[kind] = (path, doc)
    out = ["## Latest run of each benchmark\n"]
    for kind, (path, doc) in sorted(latest.items()):
        rel = path.relative_to(ROOT).as_posix()
        out.append(f"### {kind}: `{rel}`, {_date(doc)}\n")
        if doc.get("command"):
            out.append(f"Command: `{doc['command']}`\n")
        targets = doc.get("targets")
        if isinstance(targets, list) and targets:
            out.append("| target | result | detail |\n|---|---|---|")
            for t in targets:
                detail = str(t.get("detail", "")).replace("|", "\\|")
                out.append(f"| {t.get('target')} | {'PASS' if t.get('pass') else 'FAIL'} | {detail} |")
            out.append("")
        else:
            out.append(_headline(doc) + "\n")
    out.append("## Every run on file\n")
    out.append("| file | benchmark | date | quick | outcome |\n|---|---|---|---|---|")
    for path, doc in runs:
        rel = path.relative_to(RESULTS).as_posix()
        out.append(f"| `{rel}` | {_kind(path, doc)} | {_date(doc)} | {doc.get('quick', '')} | {_headline(doc)} |")
    out.append("")
    charts = sorted(RESULTS.glob("*.png"))
    if charts:
        out.append("## Charts\n")
        for png in charts:
            out.append(f"### {png.stem}\n\n![{png.stem}](benchmarks/{png.name})\n")
    spec = importlib.util.spec_from_file_location("_bench_report", ROOT / "benchmarks" / "_report.py")
    if spec is not None and spec.loader is not None:
        mod = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(ROOT / "benchmarks"))      # _report imports its sibling _common
        try:
            spec.loader.exec_module(mod)
        finally:
            sys.path.remove(str(ROOT / "benchmarks"))
        detail = mod.report(RESULTS).replace("\n### ", "\n#### ")
        if detail.startswith("### "):
            detail = "#" + detail
        out.append("## The published runs in detail\n\n"
                   "Printed by `python benchmarks/_report.py benchmarks/results` from the files named "
                   "`bench_conflicts.json`, `bench_reader.json`, `bench_scale.json` and `soak.json`.\n")
        out.append(detail)
    return "\n".join(out)


GENERATORS = {"cli": cli_help, "benchmarks": benchmarks_markdown}


def on_files(files: Files, config: Any) -> Files:
    """Add the benchmark charts to the site (benchmarks/<name>.png)."""
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"benchmarks/{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Fill the ``<!-- generated: NAME -->`` placeholders."""
    for name, make in GENERATORS.items():
        marker = f"<!-- generated: {name} -->"
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
