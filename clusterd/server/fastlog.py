"""A faster formatter for twistd's text log, with the same output.

twistd logs through ``textFileLogObserver``, whose formatter builds every line in pure Python:
``string.Formatter`` parses the format string of each event, and each timestamp is made with
``strftime`` and a time-zone lookup. That is about 90 µs per line on a 2-core machine, and the
server writes two lines per job ("submitted", "done"): at a thousand short jobs a second, a
sixth of a core. :func:`speed_up_text_logs` swaps in a formatter that gives the same text for
the common event (a ``str`` format whose fields are plain names, no failure, no ``log_system``)
with ``str.format_map``, and caches the timestamp for the current second. Any other event, or
any error, goes to Twisted's own formatter, so nothing can be lost or rendered differently.
"""

from __future__ import annotations

import atexit
import string
from collections.abc import Callable
from typing import Any

from twisted.logger import (
    FileLogObserver,
    LogLevel,
    LogPublisher,
    formatTime,
    globalLogPublisher,
    timeFormatRFC3339,
)

__all__ = ["BatchedOutput", "FastClassicFormat", "speed_up_text_logs"]

_parse = string.Formatter().parse


def _plain_fields(fmt: str) -> bool:
    """True if every field of ``fmt`` is a plain name, which ``str.format_map`` renders as
    Twisted's formatter does (no ``name()`` calls, no attribute or item lookups)."""
    try:
        for _literal, field, _spec, _conversion in _parse(fmt):
            if field is not None and not field.isidentifier():
                return False
    except ValueError:
        return False
    return True


class FastClassicFormat:
    """``formatEventAsClassicLogText`` with ``timeFormat``, fast for plain events."""

    def __init__(self, timeFormat: str | None, fallback: Callable[[Any], str | None]) -> None:
        self.timeFormat = timeFormat
        self.fallback = fallback
        self._plain: dict[str, bool] = {}
        self._second: int | None = None
        self._stamp = ""

    def _time(self, when: float) -> str:
        second = int(when)
        if second != self._second or when < 0:
            self._stamp = formatTime(when, self.timeFormat)
            self._second = second
        return self._stamp

    def __call__(self, event: Any) -> str | None:
        fmt = event.get("log_format")
        when = event.get("log_time")
        level = event.get("log_level")
        if (
            type(fmt) is not str
            or when is None
            or level is None
            or "log_failure" in event
            or "log_system" in event
            or "log_flattened" in event
        ):
            return self.fallback(event)
        plain = self._plain.get(fmt)
        if plain is None:
            plain = self._plain[fmt] = _plain_fields(fmt)
        if not plain:
            return self.fallback(event)
        try:
            text = fmt.format_map(event)
        except Exception:
            return self.fallback(event)  # it says why the event cannot be formatted
        if not text:
            return None
        namespace = event.get("log_namespace", "-")
        line = f"{self._time(when)} [{namespace}#{level.name}] {text}"
        return line.replace("\n", "\n\t") + "\n"


# The time formats twistd's text observers use (Twisted's default, and none at all).
_CANDIDATE_TIME_FORMATS = (timeFormatRFC3339, None)
_PROBES = [
    {
        "log_format": "probe {n}",
        "log_level": LogLevel.info,
        "log_namespace": "clusterd.fastlog",
        "log_time": when,
        "n": n,
    }
    for n, when in enumerate((1_795_433_685.25, 1_700_000_000.75, 86_400.5))
]


def _time_format(observer: FileLogObserver) -> tuple[bool, str | None]:
    """The time format with which the fast formatter writes exactly what ``observer`` writes,
    found by formatting a few probe events both ways (no peeking into Twisted's closures);
    (False, None) if no candidate matches, and the observer is then left alone."""
    original = getattr(observer, "formatEvent", None)
    if original is None:
        return False, None
    for time_format in _CANDIDATE_TIME_FORMATS:
        fast = FastClassicFormat(time_format, original)
        try:
            if all(fast(dict(p)) == original(dict(p)) for p in _PROBES):
                return True, time_format
        except Exception:
            return False, None
    return False, None


class BatchedOutput:
    """A log file's writer that writes the lines of one moment together.

    ``FileLogObserver`` writes and flushes every line: a ``write`` system call per line, which was
    the biggest single cost of a short job in the server (two lines per job, 14% of its CPU in
    W1b). This holds the lines and writes them at most ``delay`` seconds later, in one call,
    through ``clock.callLater``; it writes at once when the reactor is not running (start-up,
    shut-down, tests), when the held text passes ``limit`` characters, and for an event at
    ``warn`` or above (see :meth:`urgent`). The cost: the info lines of the last ``delay``
    seconds are lost if the process is killed with SIGKILL (the journal, not the log, is what
    recovery reads)."""

    def __init__(self, out: Any, clock: Any, delay: float = 0.05, limit: int = 1 << 16) -> None:
        self.out = out
        self.clock = clock
        self.delay = delay
        self.limit = limit
        self._held: list[Any] = []
        self._size = 0
        self._timer: Any = None
        self._urgent = False

    def urgent(self) -> None:
        """The next line is written at once (and everything held before it)."""
        self._urgent = True

    def write(self, text: Any) -> None:
        self._held.append(text)
        self._size += len(text)

    def flush(self) -> None:
        """Called by the observer after every line: write now, or make sure a write is due."""
        if self._urgent or self._size >= self.limit or not getattr(self.clock, "running", True):
            self.flush_now()
        elif self._timer is None:
            self._timer = self.clock.callLater(self.delay, self._due)

    def _due(self) -> None:
        self._timer = None
        self.flush_now()

    def flush_now(self) -> None:
        """Write and flush everything held."""
        self._urgent = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._held:
            return
        held, self._held, self._size = self._held, [], 0
        self.out.write(held[0][:0].join(held))
        self.out.flush()


class _UrgentFirst:
    """A formatter that marks ``warn`` and worse events urgent on the output, then formats."""

    def __init__(self, formatter: Callable[[Any], str | None], output: BatchedOutput) -> None:
        self.formatter = formatter
        self.output = output

    def __call__(self, event: Any) -> str | None:
        level = event.get("log_level")
        if level is None or level >= LogLevel.warn:
            self.output.urgent()
        return self.formatter(event)


def speed_up_text_logs(publisher: LogPublisher = globalLogPublisher, batch: bool = False) -> int:
    """Give each of ``publisher``'s text file observers the fast formatter; returns how many.
    With ``batch``, their lines are also written in batches on the reactor (:class:`BatchedOutput`)."""
    n = 0
    for observer in list(getattr(publisher, "_observers", ())):
        if not isinstance(observer, FileLogObserver):
            continue
        ok, time_format = _time_format(observer)
        if ok:
            observer.formatEvent = FastClassicFormat(time_format, observer.formatEvent)
            if batch:
                _batch(observer)
            n += 1
    return n


def _batch(observer: FileLogObserver) -> None:
    from twisted.internet import reactor

    out = getattr(observer, "_outFile", None)
    if out is None or isinstance(out, BatchedOutput):
        return
    batched = BatchedOutput(out, reactor)
    observer._outFile = batched
    observer.formatEvent = _UrgentFirst(observer.formatEvent, batched)
    reactor.addSystemEventTrigger("after", "shutdown", batched.flush_now)
    atexit.register(batched.flush_now)
