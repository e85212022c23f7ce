"""The fast text-log formatter writes exactly what Twisted's own formatter writes."""

from __future__ import annotations

import io

import pytest
from twisted.logger import (
    FileLogObserver,
    LogLevel,
    LogPublisher,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.failure import Failure

from clusterd.server.fastlog import FastClassicFormat, speed_up_text_logs

WHEN = 1_795_433_685.8625154


def event(fmt, level=LogLevel.info, **fields):
    e = {
        "log_format": fmt,
        "log_level": level,
        "log_namespace": "clusterd.core.scheduler.Scheduler",
        "log_source": None,
        "log_time": WHEN,
    }
    e.update(fields)
    return e


def _boom():
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        return Failure()


EVENTS = [
    event("job {job_id} submitted: task {task}, {n} sub-tasks", job_id="j1", task="sum", n=3),
    event(
        "job {job_id} {state} after {elapsed:.3f}s ({n} sub-tasks)",
        job_id="j9",
        state="done",
        elapsed=0.00123,
        n=1,
    ),
    event("x {a!r} {{literal}} {b:>6} é\nsecond line", LogLevel.warn, a="q'", b=3),
    event("a JSON payload {text}", text='{"a": [1, 2]}'),
    event("missing {nope}"),
    event("a call {f()}", f=lambda: 5),
    event("an attribute {e.args}", e=ValueError("v")),
    event("an item {d[k]}", d={"k": 1}),
    event(""),
    event("no time", log_time=None),
    event("a system", log_system="custom"),
    event("failed {job_id}", LogLevel.critical, job_id="j2", log_failure=_boom()),
    event(b"bytes format"),
    event("{log_io}", log_io="printed"),
    event("broken {", x=1),
    {"log_format": "no level", "log_time": WHEN},
    {"no": "format"},
]


@pytest.mark.parametrize("time_format", [None, "%Y-%m-%dT%H:%M:%S%z"])
@pytest.mark.parametrize("e", EVENTS, ids=range(len(EVENTS)))
def test_the_fast_format_equals_twisteds(e, time_format):
    """The fast log format writes exactly what Twisted's text file observer writes, also within and
    across seconds."""
    original = textFileLogObserver(io.StringIO(), timeFormat=time_format).formatEvent
    fast = FastClassicFormat(time_format, original)
    assert fast(dict(e)) == original(dict(e))
    assert fast(dict(e, log_time=WHEN + 0.5)) == original(dict(e, log_time=WHEN + 0.5))
    assert fast(dict(e, log_time=WHEN + 1)) == original(dict(e, log_time=WHEN + 1))


def test_speed_up_swaps_only_text_file_observers():
    """Observers made by textFileLogObserver get the fast formatter, with the same output; any
    other observer is left alone."""
    out, other_out = io.StringIO(), io.StringIO()
    text = textFileLogObserver(out)
    other = FileLogObserver(other_out, lambda e: formatEvent(e) + "\n")
    seen = []
    publisher = LogPublisher(text, other, seen.append)
    assert speed_up_text_logs(publisher) == 1
    assert isinstance(text.formatEvent, FastClassicFormat)
    assert not isinstance(other.formatEvent, FastClassicFormat)
    publisher(event("job {job_id} submitted", job_id="j1"))
    assert out.getvalue().endswith("[clusterd.core.scheduler.Scheduler#info] job j1 submitted\n")
    assert other_out.getvalue() == "job j1 submitted\n"
    assert len(seen) == 1


def test_speed_up_finds_the_time_format_by_probing_not_by_closures():
    """A text observer made with no time format (twistd's "-" stamps) is recognised by the
    output of probe events and sped up with the same output; nothing reads Twisted's closures."""
    out = io.StringIO()
    text = textFileLogObserver(out, timeFormat=None)
    publisher = LogPublisher(text)
    assert speed_up_text_logs(publisher) == 1
    publisher(event("job {job_id} done", job_id="j2"))
    assert out.getvalue() == "- [clusterd.core.scheduler.Scheduler#info] job j2 done\n"


class _RunningClock:
    """A task.Clock that says the reactor is running."""

    def __init__(self):
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.running = True

    def callLater(self, *a, **kw):
        return self.clock.callLater(*a, **kw)


def _batched_observer(clock):
    from clusterd.server.fastlog import BatchedOutput, _UrgentFirst

    out = io.StringIO()
    observer = textFileLogObserver(out)
    batched = BatchedOutput(out, clock, delay=0.05, limit=300)
    observer._outFile = batched
    observer.formatEvent = _UrgentFirst(observer.formatEvent, batched)
    return out, observer, batched


def test_batched_output_writes_info_lines_together_within_the_delay():
    """Info lines are held and written together at most `delay` seconds later, in one write."""
    clock = _RunningClock()
    out, observer, _ = _batched_observer(clock)
    observer(event("job {job_id} submitted", job_id="j1"))
    observer(event("job {job_id} done", job_id="j1"))
    assert out.getvalue() == ""
    clock.clock.advance(0.05)
    assert out.getvalue().count("\n") == 2 and "job j1 done" in out.getvalue()
    assert not clock.clock.getDelayedCalls()


def test_batched_output_writes_warnings_and_big_batches_at_once():
    """A warning (with what is held before it) and a batch over the limit are written at once."""
    clock = _RunningClock()
    out, observer, _ = _batched_observer(clock)
    observer(event("job {job_id} submitted", job_id="j1"))
    observer(event("worker {w} lost", LogLevel.warn, w="w1"))
    assert out.getvalue().count("\n") == 2
    assert not clock.clock.getDelayedCalls()
    for k in range(10):
        observer(event("job {job_id} submitted", job_id=f"j{k}" + "x" * 40))
    assert out.getvalue().count("\n") >= 6  # written when the held text passed 300 characters


def test_batched_output_writes_at_once_when_the_reactor_is_not_running():
    """Before the reactor runs and after it stops every line is written as it comes."""
    clock = _RunningClock()
    clock.running = False
    out, observer, batched = _batched_observer(clock)
    observer(event("clusterd server starting"))
    assert out.getvalue().count("\n") == 1
    clock.running = True
    observer(event("job {job_id} submitted", job_id="j1"))
    batched.flush_now()  # what the shutdown trigger and atexit call
    assert out.getvalue().count("\n") == 2 and not clock.clock.getDelayedCalls()
