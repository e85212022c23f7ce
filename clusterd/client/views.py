"""What the ``clusterd`` command shows people: the JOBS/WORKERS/TASKS/STATS replies as aligned
tables with human times, the ``top`` screen, and the rendering of any of them to text.

Tables are built with ``rich`` (column widths, alignment, box drawing, colour) rather than by
hand. On a terminal they get a box and colour; elsewhere (a pipe, a file) plain columns with
no escape codes and no box characters, so ``grep`` and ``awk`` read them. Scripts should use
``--json``. No Twisted and no connection here: :mod:`clusterd.client.cli` fetches the data.
"""

from __future__ import annotations

import io
import time
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table

__all__ = [
    "ago",
    "duration",
    "jobs_table",
    "workers_table",
    "tasks_table",
    "stats_table",
    "top_view",
    "render",
    "TABLES",
]


def duration(seconds: float) -> str:
    """A length of time as people say it: ``"850 ms"``, ``"42 s"``, ``"3 min 20 s"``,
    ``"2 h 5 min"``, ``"3 d 4 h"``."""
    s = max(0.0, float(seconds))
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.0f} s"
    whole = int(s)
    for unit, size, sub, subsize in (("d", 86400, "h", 3600), ("h", 3600, "min", 60)):
        if whole >= size:
            major, rest = divmod(whole, size)
            minor = rest // subsize
            return f"{major} {unit} {minor} {sub}" if minor else f"{major} {unit}"
    minutes, secs = divmod(whole, 60)
    return f"{minutes} min {secs} s" if secs else f"{minutes} min"


def ago(when: float | None, now: float | None = None) -> str:
    """A Unix time as how long ago it was (``"3 s ago"``); ``"-"`` when unknown."""
    if when is None:
        return "-"
    now = time.time() if now is None else now
    if when > now + 1:
        return "in " + duration(when - now)
    return "just now" if now - when < 1 else duration(now - when) + " ago"


def _table(title: str | None, terminal: bool, *columns: tuple[str, str]) -> Table:
    """A table with one column per (header, justify): boxed on a terminal, plain columns
    elsewhere."""
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD if terminal else None,
        show_edge=False,
        pad_edge=False,
        header_style="bold" if terminal else "",
        title_style="bold" if terminal else "",
    )
    for header, justify in columns:
        table.add_column(header, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    return table


def _progress(done: int, total: int) -> str:
    pct = 100 * done // total if total else 0
    return f"{done}/{total} {pct:3d}%"


def jobs_table(
    jobs: list[dict[str, Any]], terminal: bool = False, title: str | None = None
) -> Table:
    """JOBS: id, task, state and progress, newest first as the server sent them."""
    t = _table(title, terminal, ("ID", "left"), ("TASK", "left"), ("STATE", "left"),
               ("PROGRESS", "right"))  # fmt: skip
    colours = {"done": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}
    for j in jobs:
        state = str(j.get("state", "?"))
        shown = f"[{colours[state]}]{state}[/]" if terminal and state in colours else state
        t.add_row(str(j.get("id", "?")), str(j.get("task", "?")), shown,
                  _progress(int(j.get("done", 0)), int(j.get("total", 0))))  # fmt: skip
    return t


def workers_table(
    workers: list[dict[str, Any]],
    terminal: bool = False,
    now: float | None = None,
    title: str | None = None,
) -> Table:
    """WORKERS: name, address, slots busy of total, queued, done, failed, since when."""
    t = _table(title, terminal, ("NAME", "left"), ("ADDRESS", "left"), ("BUSY", "right"),
               ("QUEUED", "right"), ("DONE", "right"), ("FAILED", "right"),
               ("CONNECTED", "right"), ("STATE", "left"))  # fmt: skip
    for w in workers:
        t.add_row(
            str(w.get("name", "?")),
            str(w.get("address", "?")),
            f"{w.get('busy', 0)}/{w.get('slots', 0)}",
            str(w.get("prefetched", 0)),
            str(w.get("done", 0)),
            str(w.get("failed", 0)),
            ago(w.get("connected"), now),
            "draining" if w.get("draining") else "ready",
        )
    return t


def tasks_table(tasks: list[dict[str, Any]], terminal: bool = False) -> Table:
    """TASKS: name, input kind (and streaming), workers and slots that can run it, its doc."""
    t = _table(None, terminal, ("TASK", "left"), ("INPUT", "left"), ("WORKERS", "right"),
               ("SLOTS", "right"), ("DESCRIPTION", "left"))  # fmt: skip
    for k in tasks:
        kind = str(k.get("input", "json"))
        if k.get("stream"):
            kind += f", streams {k['stream']}"
        t.add_row(str(k.get("name", "?")), kind, str(k.get("workers", 0)),
                  str(k.get("slots", 0)), str(k.get("doc", "")))  # fmt: skip
    return t


def stats_table(stats: dict[str, Any], terminal: bool = False, title: str | None = None) -> Table:
    """STATS: one counter a line, in the server's order; ``uptime`` as a duration."""
    t = _table(title, terminal, ("COUNTER", "left"), ("VALUE", "right"))
    for key, value in stats.items():
        if key == "uptime" and isinstance(value, int | float):
            shown = duration(value)
        elif isinstance(value, bool):
            shown = "yes" if value else "no"
        else:
            shown = str(value)
        t.add_row(key, shown)
    return t


def top_view(
    workers: list[dict[str, Any]],
    jobs: list[dict[str, Any]],
    stats: dict[str, Any],
    terminal: bool = True,
    now: float | None = None,
) -> RenderableType:
    """The ``clusterd top`` screen: a summary line, the workers and the newest jobs."""
    summary = (
        f"up {duration(stats.get('uptime', 0))}  workers {stats.get('workers', 0)}  "
        f"slots {stats.get('slots_busy', 0)}/{stats.get('slots', 0)} busy  "
        f"jobs active {stats.get('jobs_active', 0)}  queued {stats.get('subtasks_queued', 0)}  "
        f"done {stats.get('jobs_done', 0)}  failed {stats.get('jobs_failed', 0)}"
    )
    return Group(
        summary,
        workers_table(workers, terminal, now, title="Workers"),
        jobs_table(jobs, terminal, title="Jobs (newest first)"),
    )


TABLES = {"jobs": jobs_table, "workers": workers_table, "tasks": tasks_table, "stats": stats_table}


def render(renderable: RenderableType, terminal: bool, width: int | None = None) -> str:
    """``renderable`` as text: with colour and box drawing when ``terminal``, else plain
    columns without trailing blanks, never wrapped (a pipe has no width)."""
    out = io.StringIO()
    console = Console(
        file=out,
        force_terminal=terminal,
        no_color=not terminal,
        color_system="auto" if terminal else None,
        width=width or (None if terminal else 10_000),
        highlight=False,
        emoji=False,
    )
    console.print(renderable)
    text = out.getvalue()
    if terminal:
        return text
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
