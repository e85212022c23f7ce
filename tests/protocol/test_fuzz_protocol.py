"""Both protocol state machines under hostile input (hypothesis): random sequences drawn from a
grammar of valid and invalid verbs, bad and deep JSON, random bytes, partial, huge and
non-UTF-8 lines, worker verbs out of order, cut at arbitrary points and interleaved with time.

Server, client connection: nothing escapes dataReceived and nothing is logged as an error; every
complete non-blank request line gets exactly one final reply (OK/ERR/RESULT/FAILED/CANCELLED),
in whole UTF-8 lines, with output bounded by the input; a PING at the end still gets OK PONG.
Server, unauthenticated: no sequence without the secret submits a job or registers a worker.
Server, registered worker connection: every line gets the replies the protocol promises.
Worker: random server lines never raise and leave no timer behind.

The regressions these found are pinned by plain tests at the end of the file."""

from __future__ import annotations

import json

from helpers import LineConn, deterministic, no_errors_logged
from hypothesis import Phase, event, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from clusterd.client.api import job_line
from clusterd.core.auth import proof
from clusterd.core.framing import LineFramer, LineTooLong
from clusterd.core.scheduler import Scheduler
from clusterd.core.wire import (
    WireError,
    dumps,
    format_greeting,
    parse_json_object,
    parse_reply,
    parse_request,
)
from clusterd.server.protocol import ConnectionSettings, ServerFactory
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS, count_primes
from clusterd.worker.pool import ChildDied, PoolService
from clusterd.worker.protocol import WorkerFactory

REGISTRY = Registry(TASKS)
MAX_LINE = 1024
MAX_DEPTH = 8
QUIET = {"heartbeat_interval": 1000.0, "heartbeat_timeout": 3000.0}  # no heartbeat in a run
FINAL = ("OK", "ERR", "RESULT", "FAILED", "CANCELLED")

# No shrinking: a failing example is reported as found. Shrinking these long action lists can
# take Hypothesis minutes, and the regression tests at the end give each finding in its
# smallest form.
fuzz = settings(
    deterministic,
    max_examples=200,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    print_blob=False,
)


# -- the grammar ---------------------------------------------------------------------------------

numbers = st.lists(
    st.integers(-1000, 1000) | st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    max_size=8,
)
UNLUCKY = 13  # the honest worker answers ERROR for a chunk starting with it
job_ids = st.sampled_from(["j1", "j2", "j3", "j4", "j7", "nope", "j1 j2"])
options = st.fixed_dictionaries(
    {},
    optional={
        "chunks": st.integers(1, 5),
        "timeout": st.sampled_from([0.5, 2, 30]),
        "attempts": st.integers(1, 3),
        "key": st.sampled_from(["k1", "k2"]),
    },
)
task_and_input = st.one_of(
    st.tuples(st.sampled_from(["sum", "sort"]), numbers),
    st.tuples(st.sampled_from(["sum", "sort"]), numbers.map(lambda xs: [UNLUCKY, *xs])),
    st.tuples(st.just("wordcount"), st.text(max_size=30)),
    st.tuples(
        st.just("primes"),
        st.builds(
            lambda a, n: {"start": a, "stop": a + n}, st.integers(0, 500), st.integers(0, 300)
        ),
    ),
    st.tuples(st.just("sleep"), st.lists(st.integers(0, 5), max_size=4)),
    st.tuples(st.sampled_from(["nope", "os.system", "SUM"]), numbers),  # unknown tasks
    st.tuples(st.sampled_from(["sum", "primes", "wordcount"]), st.sampled_from(["x", 1, None, {}])),
)
job_lines = st.builds(
    lambda verb, ti, opts: job_line(verb, ti[0], ti[1], **opts),
    st.sampled_from(["RUN", "SUBMIT", "run"]),
    task_and_input,
    options,
)
valid_lines = st.one_of(
    st.sampled_from(["PING", "HELP", "JOBS", "WORKERS", "TASKS", "STATS", "ping", "  STATS  "]),
    st.builds("{} {}".format, st.sampled_from(["STATUS", "WAIT", "WATCH", "CANCEL"]), job_ids),
    job_lines,
)
invalid_lines = st.sampled_from(
    [
        "FROBNICATE",
        "DO",
        "OK",
        "OK PONG",
        "DRAIN",
        'DONE {"id":1,"result":3}',
        'ERROR {"id":1,"type":"E","message":"m"}',
        "CANCEL",
        "WAIT",
        "STATUS a b",
        "RUN",
        "RUN sum",
        "SUBMIT   ",
        "REGISTER",
        "REGISTER []",
        'REGISTER {"name":"a b","tasks":[],"slots":1}',
        'REGISTER {"name":"w","tasks":["sum"],"slots":0}',
        'REGISTER {"name":"w","tasks":"sum","slots":1}',
        'REGISTER {"name":"w","tasks":[],"slots":1,"protocol":2}',
        "AUTH",
        "AUTH client",
        "AUTH nobody 00",
        "AUTH client 00",  # no secrets here: the client role is open, so this is OK
    ]
)
bad_json = st.sampled_from(
    [
        "RUN sum [1,",
        'SUBMIT sum {"a"',
        "RUN sum [1] junk",
        "RUN sum NaN",
        "RUN sum [Infinity]",
        "SUBMIT sum [1e400]",
        'RUN sum [1] {"chunks":0}',
        'RUN sum [1] {"zzz":1}',
        'RUN sum [1] {"timeout":-1}',
        'SUBMIT sum [1] {"key":""}',
        "RUN sum [1] [2]",
        'SUBMIT sum [1] {"chunks":1} {"chunks":2}',
        "RUN sum " + "9" * 5000,
        'RUN sum ["\\u12"]',
    ]
)
deep_json = st.builds(
    lambda verb, depth, kind: (
        f"{verb} sum "
        + ("[" * depth + "1" + "]" * depth if kind else '{"a":' * depth + "1" + "}" * depth)
    ),
    st.sampled_from(["RUN", "SUBMIT"]),
    st.sampled_from([MAX_DEPTH, MAX_DEPTH + 1, 60, 200, 480]),
    st.booleans(),
)
# Strings that decode to lone surrogates: valid JSON, but not encodable as UTF-8 on the way out.
surrogates = st.sampled_from(
    [
        'RUN wordcount "\\ud800 a b"',
        'SUBMIT sum [1] {"key":"\\udfff"}',
        'RUN sort [1] {"key":"\\udc80x"}',
    ]
)


def not_quit(data: bytes) -> bool:
    """Random bytes must not happen to say QUIT (after which nothing is answered)."""
    for line in data.split(b"\n"):
        try:
            request = parse_request(line.rstrip(b"\r"))
        except WireError:
            continue
        if request is not None and request.verb in ("QUIT", "REGISTER"):
            return False
    return True


text_lines = st.one_of(job_lines, valid_lines, invalid_lines, bad_json, deep_json, surrogates)
raw_lines = st.one_of(
    st.binary(max_size=40).filter(not_quit),
    st.text(max_size=40).map(lambda s: s.encode("utf-8")).filter(not_quit),
    st.sampled_from([b"\xff", b"PING \xc3", b"\xed\xa0\x80", b"RUN sum [\xc0\xaf]", b"\x00\x00"]),
    st.integers(MAX_LINE - 2, MAX_LINE + 40).map(lambda n: b"y" * n),  # around the limit
    st.integers(2, 5).map(lambda k: b"z" * (k * MAX_LINE)),  # far over it
    st.sampled_from([b"", b"   ", b"\t", b"\r"]),  # blank: no reply at all
)
terminators = st.sampled_from([b"\n", b"\r\n", b"\n", b""])  # b"": a partial line
# Short stories about jobs: watched, timed out (while the worker holds), failed, cancelled.
stories = st.sampled_from(
    [
        b'SUBMIT sum [1,2,3,4,5,6] {"chunks":3}\nWATCH j1\n',
        b'RUN sort [3,1,2] {"chunks":3,"timeout":0.5,"attempts":2}\n',
        b'SUBMIT sum [13,1] {"attempts":2}\nWAIT j1\n',
        b'RUN wordcount "a b c" {"timeout":2}\nCANCEL j2\n',
        b"CANCEL j1\nCANCEL j2\n",
        b"WATCH j2\nSTATUS j2\nWAIT j3\n",
    ]
)
# One to three lines per write, so that a CANCEL, WAIT or WATCH can meet a job still running.
request_bytes = st.lists(
    st.one_of(
        st.builds(
            lambda line, end: line + end,
            st.one_of(
                job_lines.map(str.encode), text_lines.map(lambda s: s.encode("utf-8")), raw_lines
            ),
            terminators,
        ),
        stories,
    ),
    min_size=1,
    max_size=3,
).map(b"".join)


def actions(items, extra=None):
    """Lists of ("data", bytes, cuts), ("tick", seconds) and whatever ``extra`` draws."""
    extra = st.nothing() if extra is None else extra
    return st.lists(
        st.one_of(
            st.tuples(st.just("data"), items, st.lists(st.integers(0, 4000), max_size=3)),
            st.tuples(st.just("tick"), st.sampled_from([0.25, 1.0, 3.0])),
            extra,
        ),
        min_size=1,
        max_size=20,
    )


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if b > a]


# -- a model of how many replies a byte stream asks for ------------------------------------------


class Expect:
    """Frames what was sent exactly as the server does and counts the lines that ask for a
    reply: every complete non-blank line, every undecodable line and every overlong line."""

    def __init__(self, limit: int = MAX_LINE, worker: bool = False) -> None:
        self.framer = LineFramer(limit)
        self.worker = worker
        self.requests = 0
        self.bytes = 0

    def feed(self, data: bytes) -> None:
        self.bytes += len(data)
        for framed in self.framer.feed(data):
            self.requests += self.replies_to(framed)

    def replies_to(self, framed) -> int:
        if isinstance(framed, LineTooLong):
            return 1
        try:
            request = parse_request(framed)
        except WireError:
            return 1
        if request is None:
            return 0
        if not self.worker:
            return 1
        # A registered worker's lines: OK (its answer to our PING) and results get no reply.
        if request.verb == "OK":
            return 0
        if request.verb in ("DONE", "ERROR"):
            try:
                parse_json_object(request.rest, request.verb, max_depth=100_000)
            except WireError:
                return 1
            return 0
        return 1


def check_replies(lines: list[str], kinds=FINAL + ("PROGRESS",)) -> int:
    """Every line is a well-formed reply of an allowed kind; returns how many are final."""
    finals = 0
    for line in lines:
        assert line.split(" ", 1)[0] in kinds, line
        reply = parse_reply(line)
        finals += reply.final
        event(f"{reply.kind} {reply.code or ''}".strip())  # --hypothesis-show-statistics
    return finals


# -- the honest worker ---------------------------------------------------------------------------


def cheap_result(task: str, value):
    """What a worker would answer, computed cheaply (primes over a capped range: the answer's
    value does not matter here, only that every sub-task is answered)."""
    if task == "primes":
        return count_primes(value["start"], min(value["stop"], value["start"] + 500))
    if task == "sleep":
        return value
    return REGISTRY.get(task).run(value)


class HonestWorker:
    """A registered worker connection that answers every DO it is sent, correctly, as soon as
    it is pumped, unless it is holding (then DO lines wait until it is released). A chunk
    starting with UNLUCKY is answered with ERROR."""

    def __init__(self, factory: ServerFactory, slots: int = 3) -> None:
        self.holding = False
        self.conn = LineConn(factory, "10.9.9.9", 9)
        info = {"name": "honest", "tasks": REGISTRY.names(), "slots": slots, "protocol": 1}
        reply = self.conn.ask("REGISTER " + json.dumps(info))
        assert reply[0].startswith("OK REGISTERED "), reply

    def pump(self) -> None:
        """Answer every DO sent so far, and those sent in reply, until nothing is left."""
        for _ in range(1000):
            if self.holding:
                return
            lines = self.conn.lines()
            if not lines:
                return
            out = []
            for line in lines:
                verb, _, rest = line.partition(" ")
                if verb == "DO":
                    msg = json.loads(rest)
                    value = msg["input"]
                    if isinstance(value, list) and value[:1] == [UNLUCKY]:
                        error = {"id": msg["id"], "type": "ValueError", "message": "unlucky"}
                        out.append("ERROR " + json.dumps(error))
                        continue
                    result = cheap_result(msg["task"], value)
                    out.append("DONE " + json.dumps({"id": msg["id"], "result": result}))
                elif verb == "CANCEL":
                    pass  # answered anyway below, if it was still in this batch: a late result
                elif line == "PING":
                    out.append("OK PONG")
                else:
                    raise AssertionError(f"unexpected line to the worker: {line!r}")
            self.conn.send("".join(line + "\n" for line in out))
        raise AssertionError("the worker was never done")


def server(clock: Clock, **settings) -> ServerFactory:
    core = Scheduler(REGISTRY, clock)
    conf = ConnectionSettings(max_line=MAX_LINE, max_json_depth=MAX_DEPTH, **QUIET, **settings)
    return ServerFactory(core, settings=conf, clock=clock)


def leaves_no_timer(clock: Clock, *conns: LineConn) -> None:
    for conn in conns:
        conn.lose()
    assert clock.getDelayedCalls() == []


# -- server: a client connection -----------------------------------------------------------------


hold_release = st.sampled_from([("hold",), ("release",)])


@fuzz
@given(steps=actions(request_bytes, hold_release))
def test_server_answers_every_client_request_exactly_once(steps):
    """Whatever a client sends, in whatever pieces, while the worker answers at once or holds
    its sub-tasks past their timeouts: no exception, no logged error, never more than one final
    reply per complete non-blank line and exactly one each once no job is running, whole UTF-8
    lines, bounded output and buffering, OK PONG at the end, and no timer left."""
    with no_errors_logged():
        clock = Clock()
        factory = server(clock)
        core = factory.core
        worker = HonestWorker(factory)
        client = LineConn(factory)
        expect = Expect()
        finals = written = 0

        def check() -> None:
            nonlocal finals, written
            assert client.proto.framer.buffered <= MAX_LINE + 1
            written += len(client.tr.value())
            finals += check_replies(client.lines())
            assert finals <= expect.requests
            if all(job.is_final for job in core.jobs()):
                assert finals == expect.requests
            jobs = len(core.jobs())
            assert written <= 8 * expect.bytes + 2000 * expect.requests + 100 * jobs * finals

        for step in steps:
            if step[0] == "tick":
                clock.advance(step[1])
                worker.pump()
            elif step[0] == "hold":
                worker.holding = True
            elif step[0] == "release":
                worker.holding = False
                worker.pump()
            else:
                for piece in cut(step[1], step[2]):
                    client.send(piece)
                    expect.feed(piece)
                    worker.pump()
            check()
        # End any partial line, then ask for a PONG behind whatever it started.
        client.send(b"\nPING\n")
        expect.feed(b"\nPING\n")
        worker.holding = False
        for _ in range(100):  # retries wait out their backoff
            worker.pump()
            if all(job.is_final for job in core.jobs()):
                break
            clock.advance(1)
        last = client.tr.value().splitlines()[-1:]
        check()
        assert finals == expect.requests
        assert last == [b"OK PONG"]
        leaves_no_timer(clock, client, worker.conn)


# -- server: without the secret ------------------------------------------------------------------

CLIENT_SECRET = b"client-secret-0123456789abcdef"
WORKER_SECRET = b"worker-secret-0123456789abcdef"
WRONG_SECRET = b"wrong-secret-0123456789abcdefgh"
PRE_AUTH = {
    "OK": ("OK PONG", "OK BYE", 'OK {"protocol"'),
    "ERR": (
        "ERR NOAUTH ",
        "ERR AUTH_FAILED ",
        "ERR AUTH_TIMEOUT ",
        "ERR BAD_REQUEST AUTH ",
        "ERR BAD_ENCODING ",
        "ERR LINE_TOO_LONG ",
    ),
}
# Placeholders replaced with a proof for this connection's nonce when sent.
FORGERIES = {
    b"@WRONG@": lambda n: f"AUTH client {proof(WRONG_SECRET, n, 'client')}",
    b"@CLIENT-AS-WORKER@": lambda n: f"AUTH worker {proof(CLIENT_SECRET, n, 'worker')}",
    b"@WORKER-MAC-AS-CLIENT@": lambda n: f"AUTH client {proof(WORKER_SECRET, n, 'worker')}",
    b"@REPLAY@": lambda n: f"AUTH client {proof(CLIENT_SECRET, 'f' * 32, 'client')}",
}
stranger_lines = st.one_of(
    st.one_of(
        text_lines,
        st.just('REGISTER {"name":"w1","tasks":["sum"],"slots":1,"protocol":1}'),
        st.just("QUIT"),
    ).map(lambda s: s.encode("utf-8")),
    raw_lines,
    st.sampled_from(sorted(FORGERIES)),
    st.just(b"AUTH client 00\n" * 4 + b"AUTH client 01"),  # a burst of guesses
)
stranger_bytes = st.builds(lambda line, end: line + end, stranger_lines, terminators)


@fuzz
@given(steps=actions(stranger_bytes))
def test_server_without_the_secret_gives_nothing_away(steps):
    """A peer without the secrets, whatever it sends: never a job, never a registered worker,
    only the replies allowed before AUTH, at most max_auth_failures delayed answers (timers)
    pending at a time, and no timer left once it has gone."""
    with no_errors_logged():
        clock = Clock()
        factory = server(
            clock, secrets={"client": CLIENT_SECRET, "worker": WORKER_SECRET}, auth_timeout=5.0
        )
        peer = LineConn(factory)
        nonce = peer.proto.auth.nonce
        for step in steps:
            if step[0] == "tick":
                clock.advance(step[1])
            else:
                data = step[1]
                for marker, forge in FORGERIES.items():
                    data = data.replace(marker, forge(nonce).encode())
                for piece in cut(data, step[2]):
                    peer.send(piece)
            for line in peer.lines():
                kind = line.split(" ", 1)[0]
                event(" ".join(line.split(" ", 2)[:2]))
                assert kind in PRE_AUTH and line.startswith(PRE_AUTH[kind]), line
            assert factory.core.jobs() == []
            assert factory.core.workers() == []
            assert peer.proto.auth.roles == set()
            assert len(clock.getDelayedCalls()) <= factory.settings.max_auth_failures + 1
        clock.advance(60)
        peer.lines()
        if not peer.tr.disconnecting:
            assert peer.ask("\nPING")[-1] == "OK PONG"
        leaves_no_timer(clock, peer)


# -- server: a registered worker connection ------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
worker_messages = st.fixed_dictionaries(
    {},
    optional={
        "id": st.integers(-2, 5)
        | st.booleans()
        | st.text(max_size=3)
        | st.lists(st.integers(), max_size=2),
        "job": st.sampled_from(["j1", "x"]),
        "result": json_values,
        "type": json_values,
        "message": json_values,
    },
)
worker_lines = st.one_of(
    st.builds(
        "{} {}".format, st.sampled_from(["DONE", "ERROR", "done"]), worker_messages.map(dumps)
    ),
    st.builds("{} {}".format, st.sampled_from(["DONE", "ERROR"]), json_values.map(dumps)),
    st.sampled_from(
        [
            "PING",
            "OK PONG",
            "OK",
            "DRAIN",
            "DONE",
            "DONE {",
            "ERROR [1]",
            "DONE " + "[" * 300 + "]" * 300,
            'DONE {"id":1,"result":' + "[" * 200 + "]" * 200 + "}",
            'REGISTER {"name":"w2","tasks":["sum"],"slots":1}',
            "RUN sum [1]",
            "STATS",
            "QUIT",
            "CANCEL {}",
            "DO {}",
            "AUTH worker 00",
        ]
    ),
    valid_lines,
).map(lambda s: s.encode("utf-8"))
worker_bytes = st.builds(
    lambda line, end: line + end, st.one_of(worker_lines, raw_lines), terminators
)


@fuzz
@given(steps=actions(worker_bytes))
def test_server_survives_a_registered_worker_sending_anything(steps):
    """A registered worker sending results for nothing, verbs out of order, client verbs and
    garbage: no exception, no logged error, one reply for each line that asks for one (none
    for OK or a well-formed DONE/ERROR), the worker still registered, OK PONG at the end."""
    with no_errors_logged():
        clock = Clock()
        factory = server(clock)
        conn = LineConn(factory, "10.0.0.7", 7)
        reply = conn.ask('REGISTER {"name":"odd","tasks":[],"slots":2,"protocol":1}')
        assert reply[0].startswith("OK REGISTERED ")
        expect = Expect(worker=True)
        answered = 0
        for step in steps:
            if step[0] == "tick":
                clock.advance(step[1])
            else:
                for piece in cut(step[1], step[2]):
                    conn.send(piece)
                    expect.feed(piece)
            lines = conn.lines()
            for line in lines:
                assert line in ("OK PONG", "OK DRAINING") or line.startswith("ERR "), line
                event(" ".join(line.split(" ", 2)[:2]))
            answered += len(lines)
            assert answered == expect.requests
            assert conn.proto.framer.buffered <= MAX_LINE + 1
        assert [w.name for w in factory.core.workers()] == ["odd"]
        assert conn.ask("\nPING")[-1] == "OK PONG"
        leaves_no_timer(clock, conn)


# -- the worker ----------------------------------------------------------------------------------

WORKER_MAX_LINE = 512


class FuzzPool:
    """Answers by task name: "ok" at once, "boom" a task error, "died" a dead child, "later"
    never (until cancelled), anything else a LookupError."""

    TaskError = PoolService.TaskError

    def __init__(self) -> None:
        self.held: list[Deferred] = []

    def run(self, task: str, value) -> Deferred:
        if task == "ok":
            return succeed(value)
        if task == "boom":
            return fail(PoolService.TaskError("ValueError", "boom"))
        if task == "died":
            return fail(ChildDied("exit 9"))
        if task == "later":
            d: Deferred = Deferred()
            self.held.append(d)
            return d
        return fail(LookupError(task))


greeting_infos = st.fixed_dictionaries(
    {},
    optional={
        "max_line": st.integers(-1, 1 << 20) | json_values,
        "auth": st.sampled_from([["worker"], ["client", "worker"], [], ["client"]]) | json_values,
        "nonce": st.text(max_size=32) | json_values,
        "server": json_values,
    },
)
greetings = st.one_of(
    st.builds(
        lambda v, info: f"HELLO clusterd {v} {dumps(info)}",
        st.sampled_from(["1", "1", "1", "2", "x"]),
        greeting_infos,
    ),
    st.sampled_from(["HELLO", "HELLO clusterd", "HELLO clusterd 1 [1]", "HELLO clusterd 1 {"]),
)
do_messages = st.fixed_dictionaries(
    {},
    optional={
        "id": st.integers(0, 4) | st.text(max_size=2) | json_values,
        "job": json_values,
        "index": json_values,
        "task": st.sampled_from(["ok", "boom", "died", "later", "nope"]) | json_values,
        "input": json_values,
    },
)
sub_tasks = st.builds(
    lambda ticket, task, value: (
        "DO " + dumps({"id": ticket, "job": "j1", "task": task, "input": value})
    ),
    st.integers(0, 4) | st.text(max_size=2) | json_values,
    st.sampled_from(["ok", "boom", "died", "later", "nope"]),
    json_values,
)
server_lines = st.one_of(
    greetings,
    sub_tasks,
    sub_tasks,
    st.builds(
        "CANCEL {}".format, st.builds(lambda i: dumps({"id": i}), st.integers(0, 4) | json_values)
    ),
    st.builds("DO {}".format, do_messages.map(dumps)),
    st.builds("CANCEL {}".format, do_messages.map(dumps)),
    st.builds("{} {}".format, st.sampled_from(["DO", "CANCEL"]), json_values.map(dumps)),
    st.sampled_from(
        [
            "PING",
            'OK REGISTERED {"name":"w1","protocol":1}',
            "OK REGISTERED",
            "OK DRAINING",
            "OK PONG",
            "ERR AUTH_FAILED authentication failed.",
            "ERR NOAUTH not yet.",
            "ERR",
            "DO",
            "DO {",
            "CANCEL",
            "DO " + "[" * 5000 + "]" * 5000,
            "RESULT j1 3",
        ]
    ),
).map(lambda s: s.encode("utf-8"))
server_bytes = st.builds(
    lambda line, end: line + end,
    st.one_of(
        server_lines,
        st.binary(max_size=40),
        st.sampled_from([b"\xff\xfe", b'DO {"id":1,"task":"ok","input":"\xc3"}']),
        st.integers(WORKER_MAX_LINE, 3 * WORKER_MAX_LINE).map(lambda n: b"w" * n),
    ),
    terminators,
)


# Most runs start the way a real server does, so that the later lines meet a registered or a
# greeted worker rather than one still waiting for HELLO; the rest start with any greeting.
OPENINGS = [
    [format_greeting("server", 1 << 20), 'OK REGISTERED {"name":"w1","protocol":1}'],
    [format_greeting("server", 300), 'OK REGISTERED {"name":"w1","protocol":1}'],
    [format_greeting("server", 1 << 20)],
    [format_greeting("server", 1 << 20, auth=["client", "worker"], nonce="n" * 32)],
]
openings = st.builds(
    lambda n, greeting: [
        ("data", (line + "\n").encode(), []) for line in (OPENINGS[n] if n < 4 else [greeting])
    ],
    st.integers(0, 5),
    greetings,
)


@fuzz
@given(steps=st.builds(lambda a, b: a + b, openings, actions(server_bytes)))
def test_worker_survives_anything_a_server_sends(steps):
    """Whatever a server sends: no exception escapes dataReceived, nothing is logged as an
    error beyond the worker's own complaints, the worker writes only whole protocol lines, and
    once the connection is gone no timer is left."""
    with no_errors_logged():
        clock = Clock()
        pool = FuzzPool()
        factory = WorkerFactory(
            pool,
            "w1",
            ["ok", "boom"],
            2,
            max_line=WORKER_MAX_LINE,
            clock=clock,
            secret=WORKER_SECRET,
            **QUIET,
        )
        proto = factory.buildProtocol(None)
        tr = StringTransport()
        proto.makeConnection(tr)
        for step in steps:
            if step[0] == "tick":
                clock.advance(step[1])
            else:
                for piece in cut(step[1], step[2]):
                    proto.dataReceived(piece)
            out = tr.value().decode("utf-8")
            tr.clear()
            assert out == "" or out.endswith("\n")
            for line in out.splitlines():
                verb, _, rest = line.partition(" ")
                assert verb in ("AUTH", "REGISTER", "DONE", "ERROR", "OK", "PING", "DRAIN"), line
                if verb in ("DONE", "ERROR", "REGISTER"):
                    assert isinstance(json.loads(rest), dict)
                event(f"worker wrote {verb}")
            if tr.disconnecting:
                event("worker closed")
                break
        event(f"registered={proto.registered}")
        proto.connectionLost(Failure(ConnectionDone()))
        assert all(d.called for d in pool.held)  # held sub-tasks are cancelled
        assert clock.getDelayedCalls() == []


# -- regressions found by the fuzzers ------------------------------------------------------------
# JSON may spell lone surrogates ("\ud800"): parse_json accepts them, Python keeps them in str,
# and str.encode("utf-8") refuses them. Wherever such a string is echoed back, a reply cannot be
# written. These pin the correct behaviour: one whole UTF-8 reply per request, never an
# exception out of dataReceived, never a reply queue stuck behind an unwritable line.


def test_register_with_a_lone_surrogate_in_its_name_gets_one_reply():
    """REGISTER whose name is a lone surrogate gets exactly one reply, not an exception out of
    dataReceived (the OK REGISTERED line echoes the name)."""
    with no_errors_logged():
        clock = Clock()
        factory = server(clock)
        conn = LineConn(factory)
        conn.send(b'REGISTER {"name":"\\ud800","tasks":["sum"],"slots":1}\n')
        assert len(conn.lines()) == 1
        assert conn.ask("PING") == ["OK PONG"]
        leaves_no_timer(clock, conn)


def test_status_of_a_job_whose_key_has_a_lone_surrogate_gets_one_reply():
    """A job submitted with a key holding a lone surrogate is either refused or reported by
    STATUS in one whole UTF-8 line (STATUS echoes the key)."""
    with no_errors_logged():
        clock = Clock()
        factory = server(clock)
        conn = LineConn(factory)
        conn.send(b'SUBMIT sum [1] {"key":"\\udfff"}\n')
        [submitted] = conn.lines()
        conn.send(b"STATUS j1\n")
        [status] = conn.lines()
        assert submitted.startswith("ERR ") or status.startswith("OK {")
        assert conn.ask("PING") == ["OK PONG"]
        leaves_no_timer(clock, conn)


def test_a_subtask_that_cannot_be_sent_leaves_nothing_in_flight():
    """A sub-task whose DO line cannot be encoded is failed (or sent escaped), but never left
    in the connection's in-flight table, whose Deferred would fail unhandled when the worker
    disconnects ("Unhandled error in Deferred: WorkerLost")."""
    with no_errors_logged():
        clock = Clock()
        factory = server(clock)
        worker = HonestWorker(factory)
        client = LineConn(factory)
        client.send(b'RUN wordcount "\\ud800 a b"\n')
        worker.pump()
        [reply] = client.lines()
        assert reply.split(" ")[0] in ("RESULT", "FAILED")
        assert worker.conn.proto.session.inflight == {}
        leaves_no_timer(clock, client, worker.conn)


def test_a_worker_error_with_a_lone_surrogate_still_reaches_the_client():
    """A worker's ERROR whose message holds a lone surrogate still ends the client's RUN with a
    FAILED line, and the connection keeps answering (instead of the reply being lost in the
    Deferred chain and every later reply queued behind it for ever)."""
    with no_errors_logged():
        clock = Clock()
        factory = server(clock)
        worker = LineConn(factory, "10.0.0.8", 8)
        worker.ask('REGISTER {"name":"w","tasks":["sum"],"slots":1}')
        client = LineConn(factory)
        client.send(b'RUN sum [1] {"attempts":1}\nPING\n')
        [do] = worker.lines()
        ticket = json.loads(do[3:])["id"]
        worker.send(f'ERROR {{"id":{ticket},"type":"E","message":"\\ud800"}}\n')
        lines = client.lines()
        assert [line.split(" ")[0] for line in lines] == ["FAILED", "OK"]
        leaves_no_timer(clock, client, worker)


def test_a_worker_result_with_a_lone_surrogate_still_reaches_the_client():
    """A worker's DONE whose result holds a lone surrogate still ends the RUN with one line."""
    with no_errors_logged():
        clock = Clock()
        factory = server(clock)
        worker = LineConn(factory, "10.0.0.8", 8)
        worker.ask('REGISTER {"name":"w","tasks":["sort"],"slots":1}')
        client = LineConn(factory)
        client.send(b"RUN sort [1]\nPING\n")
        [do] = worker.lines()
        ticket = json.loads(do[3:])["id"]
        worker.send(f'DONE {{"id":{ticket},"result":["\\udc80"]}}\n')
        lines = client.lines()
        assert [line.split(" ")[0] for line in lines] in (["RESULT", "OK"], ["FAILED", "OK"])
        leaves_no_timer(clock, client, worker)


def worker_protocol(clock: Clock, pool=None):
    factory = WorkerFactory(
        pool or FuzzPool(), "w1", ["ok"], 2, clock=clock, secret=WORKER_SECRET, **QUIET
    )
    proto = factory.buildProtocol(None)
    tr = StringTransport()
    proto.makeConnection(tr)
    return proto, tr


def test_worker_survives_a_greeting_whose_auth_is_not_a_list():
    """A greeting whose "auth" is a number or null is a bad greeting, not a TypeError out of
    dataReceived."""
    for auth in ("5", "null", "true"):
        with no_errors_logged():
            clock = Clock()
            proto, tr = worker_protocol(clock)
            proto.dataReceived(f'HELLO clusterd 1 {{"auth":{auth},"nonce":"n"}}\n'.encode())
            proto.connectionLost(Failure(ConnectionDone()))
            assert clock.getDelayedCalls() == []


def test_worker_survives_do_and_cancel_with_unhashable_ids():
    """DO and CANCEL whose "id" is a list or an object are bad lines, not a TypeError out of
    dataReceived."""
    with no_errors_logged():
        clock = Clock()
        proto, tr = worker_protocol(clock)
        proto.dataReceived((format_greeting("server", 1 << 20) + "\n").encode())
        proto.dataReceived(b'DO {"id":1,"task":"later","input":1}\n')  # something held
        proto.dataReceived(b'CANCEL {"id":[1]}\n')
        proto.dataReceived(b'DO {"id":{},"task":"ok","input":1}\n')
        proto.dataReceived(b"PING\n")
        assert tr.value().decode().splitlines()[-1] == "OK PONG"
        proto.connectionLost(Failure(ConnectionDone()))


def test_worker_answers_a_result_holding_a_lone_surrogate():
    """A task result holding a lone surrogate (say, a file name decoded with surrogateescape)
    is still answered, as DONE or as ERROR, rather than silently dropped, which would leave the
    server waiting for the sub-task for ever."""

    class SurrogatePool(FuzzPool):
        def run(self, task, value):
            return succeed(["\udcff"])

    with no_errors_logged():
        clock = Clock()
        proto, tr = worker_protocol(clock, SurrogatePool())
        proto.dataReceived((format_greeting("server", 1 << 20) + "\n").encode())
        tr.clear()
        proto.dataReceived(b'DO {"id":1,"job":"j1","task":"ok","input":1}\n')
        lines = tr.value().decode("utf-8").splitlines()
        assert len(lines) == 1, "the sub-task was never answered"
        verb, _, rest = lines[0].partition(" ")
        assert verb in ("DONE", "ERROR")
        assert json.loads(rest)["id"] == 1
        proto.connectionLost(Failure(ConnectionDone()))
