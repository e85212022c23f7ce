"""Authentication and limits seen from the wire: the greeting's challenge, NOAUTH before AUTH,
slow failed proofs, the auth timeout, connection limits, JSON depth and result size; the worker's
AUTH before REGISTER and its backoff when refused; the client library's AUTH line."""

from __future__ import annotations

import json
import re

import pytest
from helpers import FakePool as _FakePool
from helpers import LineConn, add_worker, result_of
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from zope.interface import implementer

from clusterd.client.api import auth_line, connect
from clusterd.client.errors import ClusterError, RequestRefused
from clusterd.core.auth import proof, verify
from clusterd.core.scheduler import Scheduler
from clusterd.core.wire import CLIENT_VERBS, format_greeting
from clusterd.server.protocol import ConnectionSettings, ServerFactory
from clusterd.tasks import Registry
from clusterd.tasks.builtins import TASKS
from clusterd.worker.protocol import WorkerFactory

CLIENT_SECRET = b"client-secret-0123456789abcdef"
WORKER_SECRET = b"worker-secret-0123456789abcdef"
BOTH = {"client": CLIENT_SECRET, "worker": WORKER_SECRET}
REGISTER = 'REGISTER {"name":"w1","tasks":["sum"],"slots":1,"protocol":1}'

_OPEN: list[LineConn] = []


@pytest.fixture
def clock():
    c = Clock()
    yield c
    # As the reactor would at the end: every connection closes (cancelling its auth timer and
    # heartbeat). Any timer still pending after that is a leak.
    for conn in _OPEN:
        conn.lose()
    _OPEN.clear()
    assert c.getDelayedCalls() == []


def make_factory(clock: Clock, core: Scheduler | None = None, **settings) -> ServerFactory:
    core = core or Scheduler(Registry(TASKS), clock)
    return ServerFactory(core, settings=ConnectionSettings(**settings), clock=clock)


@pytest.fixture
def factory(clock):
    """Both roles need a secret."""
    return make_factory(clock, secrets=dict(BOTH))


def connect_to(factory: ServerFactory, host: str = "10.0.0.1", port: int = 1234) -> LineConn:
    conn = LineConn(factory, host, port)
    _OPEN.append(conn)
    return conn


def info(conn: LineConn) -> dict:
    [hello] = conn.greeting
    assert hello.startswith("HELLO clusterd 1 "), hello
    return json.loads(hello.split(" ", 3)[3])


def auth(conn: LineConn, role: str, secret: bytes) -> str:
    """The right AUTH line for this connection's nonce."""
    return f"AUTH {role} {proof(secret, conn.proto.auth.nonce, role)}"


def err_code(line: str) -> str:
    assert line.startswith("ERR "), line
    return line.split(" ", 2)[1]


def delay_of_next_answer(clock: Clock, conn: LineConn, limit: float = 10.0) -> tuple[float, list]:
    """Step the clock in 1/64 s ticks until the connection writes; (time taken, lines)."""
    step, waited = 1 / 64, 0.0
    while waited < limit:
        clock.advance(step)
        waited += step
        lines = conn.lines()
        if lines:
            return waited, lines
    raise AssertionError(f"no answer within {limit}s")


# -- the greeting --------------------------------------------------------------------------------


def test_greeting_carries_a_fresh_nonce_and_the_roles_needing_auth(factory):
    """With secrets set, the greeting lists the roles that need AUTH and a 32-hex nonce, new on
    every connection."""
    a, b = info(connect_to(factory)), info(connect_to(factory))
    assert a["auth"] == ["client", "worker"]
    assert re.fullmatch(r"[0-9a-f]{32}", a["nonce"])
    assert a["nonce"] != b["nonce"]


@pytest.mark.parametrize(
    "secrets, roles",
    [({"client": CLIENT_SECRET}, ["client"]), ({"worker": WORKER_SECRET}, ["worker"])],
)
def test_greeting_lists_only_the_roles_with_a_secret(clock, secrets, roles):
    """A role without a secret is open and is not listed."""
    assert info(connect_to(make_factory(clock, secrets=secrets)))["auth"] == roles


def test_greeting_without_secrets_has_no_auth_and_no_nonce(clock):
    """With no secret at all the greeting has neither "auth" nor "nonce", and no timer runs."""
    conn = connect_to(make_factory(clock))
    assert "auth" not in info(conn) and "nonce" not in info(conn)
    assert clock.getDelayedCalls() == []


# -- before AUTH ---------------------------------------------------------------------------------

BEFORE_AUTH = {
    "RUN": "RUN sum [1,2]",
    "SUBMIT": "SUBMIT sum [1,2]",
    "WAIT": "WAIT j1",
    "STATUS": "STATUS j1",
    "WATCH": "WATCH j1",
    "CANCEL": "CANCEL j1",
    "JOBS": "JOBS",
    "WORKERS": "WORKERS",
    "TASKS": "TASKS",
    "STATS": "STATS",
}


def test_every_client_verb_but_the_free_ones_is_listed_here():
    """The NOAUTH test below covers every client verb except AUTH, PING, HELP and QUIT."""
    assert set(BEFORE_AUTH) == set(CLIENT_VERBS) - {"AUTH", "PING", "HELP", "QUIT"}


@pytest.mark.parametrize(
    "line",
    [
        *BEFORE_AUTH.values(),
        "run sum [1]",
        "FROBNICATE",
        REGISTER,
        'DONE {"id":1,"result":3}',
        'ERROR {"id":1,"type":"E","message":"m"}',
        "DRAIN",
    ],
)
def test_requests_before_auth_are_noauth(factory, line):
    """Before AUTH every client verb, unknown verb, REGISTER and worker verb is ERR NOAUTH, and
    none of them submits a job or registers a worker."""
    conn = connect_to(factory)
    [reply] = conn.ask(line)
    assert err_code(reply) == "NOAUTH"
    assert "AUTH" in reply
    assert factory.core.jobs() == []
    assert factory.core.workers() == []
    assert not conn.tr.disconnecting


def test_noauth_names_the_role_that_is_missing(factory):
    """NOAUTH says which role to authenticate as: client for client verbs, worker for
    REGISTER."""
    conn = connect_to(factory)
    assert "as a client" in conn.ask("STATS")[0]
    assert "as a worker" in conn.ask(REGISTER)[0]


def test_ping_help_and_quit_work_before_auth(factory):
    """PING, HELP and QUIT are answered without AUTH."""
    conn = connect_to(factory)
    assert conn.ask("PING") == ["OK PONG"]
    [help_] = conn.ask("HELP")
    assert json.loads(help_[3:])["verbs"] == CLIENT_VERBS
    assert conn.ask("QUIT") == ["OK BYE"]
    assert conn.tr.disconnecting


# -- AUTH ----------------------------------------------------------------------------------------


def test_client_auth_opens_client_verbs_but_not_register(factory):
    """A correct client proof gives OK AUTHENTICATED client; client verbs then work, but
    REGISTER is still NOAUTH while a worker secret is set."""
    conn = connect_to(factory)
    assert conn.ask(auth(conn, "client", CLIENT_SECRET)) == ["OK AUTHENTICATED client"]
    assert conn.ask("SUBMIT sum [1,2]") == ["OK j1"]
    assert conn.ask("STATS")[0].startswith("OK {")
    assert err_code(conn.ask(REGISTER)[0]) == "NOAUTH"
    assert factory.core.workers() == []


def test_worker_auth_opens_register_but_not_client_verbs(factory):
    """A correct worker proof lets the connection REGISTER; it cannot submit jobs."""
    conn = connect_to(factory)
    assert conn.ask(auth(conn, "worker", WORKER_SECRET)) == ["OK AUTHENTICATED worker"]
    assert err_code(conn.ask("SUBMIT sum [1]")[0]) == "NOAUTH"
    assert conn.ask(REGISTER)[0].startswith("OK REGISTERED ")
    assert [w.name for w in factory.core.workers()] == ["w1"]


def test_auth_is_case_insensitive_in_the_verb_only(factory):
    """The verb may be lower-case like any other; the role and proof are taken as sent."""
    conn = connect_to(factory)
    line = auth(conn, "client", CLIENT_SECRET)
    assert conn.ask("auth" + line[4:]) == ["OK AUTHENTICATED client"]


@pytest.mark.parametrize(
    "make_line",
    [
        lambda n: f"AUTH worker {proof(CLIENT_SECRET, n, 'worker')}",  # client secret as worker
        lambda n: f"AUTH worker {proof(WORKER_SECRET, n, 'client')}",  # proof for the other role
        lambda n: f"AUTH client {proof(CLIENT_SECRET, n, 'worker')}",
        lambda n: f"AUTH client {proof(CLIENT_SECRET, 'f' * 32, 'client')}",  # another nonce
        lambda n: f"AUTH client {proof(CLIENT_SECRET, n, 'client').upper()}",
        lambda n: "AUTH client é",
    ],
    ids=[
        "client-secret-as-worker",
        "wrong-role-mac",
        "worker-mac-as-client",
        "replay",
        "upper",
        "non-ascii",
    ],
)
def test_wrong_proofs_fail(factory, clock, make_line):
    """A worker proof made with the client secret, a proof for the other role, one replayed from
    another nonce, or garbage: ERR AUTH_FAILED, and the role stays closed."""
    conn = connect_to(factory)
    conn.send(make_line(conn.proto.auth.nonce) + "\n")
    clock.advance(0.25)
    [reply] = conn.lines()
    assert err_code(reply) == "AUTH_FAILED"
    assert conn.proto.auth.roles == set()
    assert err_code(conn.ask("STATS")[0]) == "NOAUTH"
    assert err_code(conn.ask(REGISTER)[0]) == "NOAUTH"


@pytest.mark.parametrize(
    "line", ["AUTH", "AUTH client", "AUTH admin 00", "AUTH client 00 00", "AUTH CLIENT 00"]
)
def test_malformed_auth_is_bad_request_at_once(factory, line):
    """An AUTH without exactly a known role and a proof is ERR BAD_REQUEST, answered at once and
    not counted as a failed proof."""
    conn = connect_to(factory)
    assert err_code(conn.ask(line)[0]) == "BAD_REQUEST"
    assert conn.proto.auth.failures == 0
    assert factory.failures == {}


def test_auth_for_an_open_role_is_ok(clock):
    """With only a worker secret, AUTH client (whatever the proof) is simply OK: clients that
    always authenticate still work against such a server."""
    conn = connect_to(make_factory(clock, secrets={"worker": WORKER_SECRET}))
    assert conn.ask("AUTH client whatever") == ["OK AUTHENTICATED client"]


def test_repeating_a_granted_auth_is_ok(factory):
    """AUTH for a role already granted is OK again, even with a stale proof."""
    conn = connect_to(factory)
    conn.ask(auth(conn, "client", CLIENT_SECRET))
    assert conn.ask("AUTH client 00") == ["OK AUTHENTICATED client"]
    assert conn.proto.auth.failures == 0


# -- failed AUTH is slow -------------------------------------------------------------------------


def test_failed_auth_is_answered_after_a_delay_and_later_requests_wait(factory, clock):
    """A failed proof is answered only after 0.25 s; a PING pipelined behind it is answered
    after it, never before."""
    conn = connect_to(factory)
    conn.send("AUTH client 00\nPING\n")
    assert conn.lines() == []
    clock.advance(0.125)
    assert conn.lines() == []
    clock.advance(0.125)
    [failed, pong] = conn.lines()
    assert failed == "ERR AUTH_FAILED authentication failed."
    assert pong == "OK PONG"
    assert not conn.tr.disconnecting


def test_a_correct_auth_behind_a_failed_one_is_answered_in_order(factory, clock):
    """A good proof pipelined behind a bad one is granted, but its OK waits for the failure."""
    conn = connect_to(factory)
    conn.send("AUTH client 00\n" + auth(conn, "client", CLIENT_SECRET) + "\nSTATS\n")
    assert conn.lines() == []
    clock.advance(0.25)
    lines = conn.lines()
    assert [err_code(lines[0]), lines[1]] == ["AUTH_FAILED", "OK AUTHENTICATED client"]
    assert lines[2].startswith("OK {")


def test_failure_delays_double_per_host_across_connections_up_to_five_seconds(factory, clock):
    """Each recent failure from an address doubles the next one's delay (0.25 s up to 5 s), even
    over new connections; another address is not slowed."""
    delays = []
    for _ in range(7):
        conn = connect_to(factory, "10.0.0.1")
        conn.send("AUTH client 00\n")
        delays.append(delay_of_next_answer(clock, conn)[0])
        conn.lose()
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    other = connect_to(factory, "10.0.0.2")
    other.send("AUTH client 00\n")
    assert delay_of_next_answer(clock, other)[0] == 0.25


def test_failure_delay_resets_after_a_quiet_minute(factory, clock):
    """A minute without failures from an address forgets its earlier ones."""
    for expected in (0.25, 0.5):
        conn = connect_to(factory)
        conn.send("AUTH client 00\n")
        assert delay_of_next_answer(clock, conn)[0] == expected
        conn.lose()
    clock.advance(61)
    conn = connect_to(factory)
    conn.send("AUTH client 00\n")
    assert delay_of_next_answer(clock, conn)[0] == 0.25


@pytest.mark.parametrize("limit", [1, 3])
def test_connection_closes_after_max_auth_failures(clock, limit):
    """The max_auth_failures-th failed proof is answered with a closing AUTH_FAILED and the
    connection is closed; earlier failures leave it open."""
    factory = make_factory(clock, secrets=dict(BOTH), max_auth_failures=limit)
    conn = connect_to(factory)
    for n in range(1, limit + 1):
        conn.send("AUTH client 00\n")
        _, [reply] = delay_of_next_answer(clock, conn)
        assert err_code(reply) == "AUTH_FAILED"
        if n < limit:
            assert not conn.tr.disconnecting
    assert reply.endswith("too many failures, closing.")
    assert conn.tr.disconnecting


def test_auth_guesses_pipelined_after_the_last_allowed_failure_are_not_evaluated(factory, clock):
    """Guesses sent in one burst count against the limit as they are read: after the third
    failure nothing more on the connection is evaluated, so a correct proof behind it is not
    granted and the request behind that is not run. (Otherwise the limit only delays answers,
    and a peer could test any number of proofs per connection.)"""
    conn = connect_to(factory)
    conn.send("AUTH client 00\n" * 3 + auth(conn, "client", CLIENT_SECRET) + "\nSUBMIT sum [1]\n")
    for _ in range(36):  # each failure is read only once the one before it is answered
        clock.advance(0.25)
    lines = conn.lines()
    assert [line.split(" ")[:2] for line in lines] == [["ERR", "AUTH_FAILED"]] * 3, lines
    assert lines[-1].endswith("closing.")
    assert conn.tr.disconnecting
    assert "client" not in conn.proto.auth.roles
    assert factory.core.jobs() == []


def test_a_burst_of_failed_auths_holds_a_bounded_number_of_timers(factory, clock):
    """A thousand bad proofs in one write cost at most max_auth_failures delayed answers (and
    failures recorded against the address), not a timer, a queued reply and a log line each."""
    conn = connect_to(factory)
    conn.send("AUTH client 00\n" * 1000)
    assert len(clock.getDelayedCalls()) <= 3 + 1  # the answers, and the auth timer
    assert len(conn.proto.replies) <= 3
    assert factory.failures["10.0.0.1"][0] <= 3
    clock.advance(10)
    assert len(conn.lines()) <= 3


# -- auth timeout --------------------------------------------------------------------------------


def test_auth_timeout_closes_an_unauthenticated_connection(clock):
    """A connection that has not authenticated within auth_timeout gets ERR AUTH_TIMEOUT and is
    closed, leaving no timer behind."""
    factory = make_factory(clock, secrets=dict(BOTH), auth_timeout=7)
    conn = connect_to(factory)
    conn.ask("PING")  # activity is not authentication
    clock.advance(6.5)
    assert conn.lines() == [] and not conn.tr.disconnecting
    clock.advance(0.5)
    [reply] = conn.lines()
    assert err_code(reply) == "AUTH_TIMEOUT"
    assert "7s" in reply
    assert conn.tr.disconnecting
    conn.lose()
    assert clock.getDelayedCalls() == []


def test_a_failed_auth_does_not_stop_the_auth_timeout(clock):
    """Failed proofs do not reset the auth timeout."""
    factory = make_factory(clock, secrets=dict(BOTH), auth_timeout=2)
    conn = connect_to(factory)
    conn.send("AUTH client 00\n")
    clock.advance(1)
    assert err_code(conn.lines()[0]) == "AUTH_FAILED"
    clock.advance(1)
    assert err_code(conn.lines()[0]) == "AUTH_TIMEOUT"
    assert conn.tr.disconnecting


@pytest.mark.parametrize("role, secret", [("client", CLIENT_SECRET), ("worker", WORKER_SECRET)])
def test_auth_timeout_spares_an_authenticated_connection(factory, clock, role, secret):
    """A connection that authenticated as either role is not closed by the auth timeout, and no
    timer is left once the timeout has passed."""
    conn = connect_to(factory)
    conn.ask(auth(conn, role, secret))
    clock.advance(10)
    assert conn.lines() == []
    assert not conn.tr.disconnecting
    assert clock.getDelayedCalls() == []
    assert conn.ask("PING") == ["OK PONG"]


def test_lost_connection_cancels_its_auth_timer(factory, clock):
    """A connection that goes away before authenticating leaves no timer."""
    conn = connect_to(factory)
    assert len(clock.getDelayedCalls()) == 1
    conn.lose()
    assert clock.getDelayedCalls() == []


def test_lost_connection_cancels_a_pending_failed_auth_answer(factory, clock):
    """A connection lost while a failed AUTH's answer is pending leaves no timer and writes
    nothing later."""
    conn = connect_to(factory)
    conn.send("AUTH client 00\nPING\n")
    conn.lose()
    assert clock.getDelayedCalls() == []
    assert conn.lines() == []


# -- one role open -------------------------------------------------------------------------------


def test_with_only_a_worker_secret_clients_need_no_auth(clock):
    """With only a worker secret, clients use every verb without AUTH and are not timed out,
    but REGISTER still needs the worker proof."""
    factory = make_factory(clock, secrets={"worker": WORKER_SECRET})
    conn = connect_to(factory)
    assert conn.ask("SUBMIT sum [1,2]") == ["OK j1"]
    assert conn.ask("STATUS j1")[0].startswith("OK {")
    assert err_code(conn.ask(REGISTER)[0]) == "NOAUTH"
    clock.advance(10)
    assert conn.lines() == [] and not conn.tr.disconnecting


def test_with_only_a_client_secret_workers_need_no_auth(clock):
    """With only a client secret, a worker registers without AUTH and is not timed out, but
    client verbs still need the client proof."""
    factory = make_factory(
        clock, secrets={"client": CLIENT_SECRET}, heartbeat_interval=100, heartbeat_timeout=300
    )
    worker = connect_to(factory)
    assert worker.ask(REGISTER)[0].startswith("OK REGISTERED ")
    client = connect_to(factory)
    assert err_code(client.ask("WORKERS")[0]) == "NOAUTH"
    clock.advance(10)
    assert worker.lines() == [] and not worker.tr.disconnecting


# -- connection limits ---------------------------------------------------------------------------


def test_total_connection_limit_refuses_then_releases(clock):
    """Past max_connections a new connection gets ERR TOO_MANY_CONNECTIONS instead of a
    greeting and is closed; it reads nothing, starts no timer but its close's grace period, and
    when an admitted connection goes its place is free again."""
    factory = make_factory(clock, secrets=dict(BOTH), max_connections=2)
    a = connect_to(factory, "10.0.0.1")
    connect_to(factory, "10.0.0.2")
    timers = len(clock.getDelayedCalls())
    refused = connect_to(factory, "10.0.0.3")
    [reply] = refused.greeting
    assert err_code(reply) == "TOO_MANY_CONNECTIONS"
    assert refused.tr.disconnecting
    assert refused.tr.producer is None
    assert len(clock.getDelayedCalls()) == timers + 1  # abortConnection, if the peer lingers
    assert refused.ask("PING") == []
    refused.lose()
    assert factory.connections == 2  # a refused connection is never counted, nor released
    a.lose()
    assert factory.connections == 1
    again = connect_to(factory, "10.0.0.3")
    assert again.greeting[0].startswith("HELLO ")


def test_per_host_connection_limit(clock):
    """Past max_connections_per_ip from one address, that address is refused while others are
    still admitted; losing one of its connections lets it connect again."""
    factory = make_factory(clock, max_connections_per_ip=2)
    first = connect_to(factory, "10.0.0.1", 1)
    connect_to(factory, "10.0.0.1", 2)
    refused = connect_to(factory, "10.0.0.1", 3)
    assert err_code(refused.greeting[0]) == "TOO_MANY_CONNECTIONS"
    assert "10.0.0.1" in refused.greeting[0]
    assert refused.tr.disconnecting
    assert connect_to(factory, "10.0.0.2", 1).greeting[0].startswith("HELLO ")
    refused.lose()
    first.lose()
    assert connect_to(factory, "10.0.0.1", 4).greeting[0].startswith("HELLO ")
    assert factory.per_host == {"10.0.0.1": 2, "10.0.0.2": 1}


def test_connection_counts_return_to_zero(clock):
    """When every connection has gone, nothing is left counted for any address."""
    factory = make_factory(clock, max_connections=3, max_connections_per_ip=2)
    conns = [connect_to(factory, f"10.0.0.{n % 2}", n) for n in range(5)]
    for conn in conns:
        conn.lose()
    assert factory.connections == 0
    assert factory.per_host == {}


# -- TLS: backpressure waits for the handshake ---------------------------------------------------


@implementer(ISSLTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that says it is TLS."""

    def getPeerCertificate(self):
        return None


def test_producer_is_registered_at_once_on_tcp_and_after_the_handshake_on_tls(clock):
    """On a plain transport the protocol registers as a streaming producer when it connects; on
    TLS only once the handshake completes (pausing reads earlier would stall the handshake)."""
    factory = make_factory(clock)
    tcp = connect_to(factory)
    assert tcp.tr.producer is tcp.proto and tcp.tr.streaming
    proto = factory.buildProtocol(None)
    tr = TLSStringTransport()
    proto.makeConnection(tr)
    assert tr.value().startswith(b"HELLO ")
    assert tr.producer is None
    proto.handshakeCompleted()
    assert tr.producer is proto and tr.streaming
    proto.connectionLost(Failure(ConnectionDone()))


def test_a_refused_tls_connection_never_registers_a_producer(clock):
    """A TLS connection refused for the connection limit does not register a producer when its
    handshake completes."""
    factory = make_factory(clock, max_connections=0)
    proto = factory.buildProtocol(None)
    tr = TLSStringTransport()
    proto.makeConnection(tr)
    proto.handshakeCompleted()
    assert tr.producer is None
    proto.connectionLost(Failure(ConnectionDone()))


# -- JSON depth and result size ------------------------------------------------------------------


def test_json_too_deep_through_the_protocol_leaves_the_connection_usable(clock):
    """With a small max_json_depth, deep job inputs, options and REGISTER payloads are
    ERR JSON_TOO_DEEP; input at the limit is accepted and the connection stays usable."""
    factory = make_factory(clock, max_json_depth=3)
    conn = connect_to(factory)
    assert err_code(conn.ask("SUBMIT sum [[[[1]]]]")[0]) == "JSON_TOO_DEEP"
    assert err_code(conn.ask('SUBMIT sum [1] {"key":[[[["k"]]]]}')[0]) == "JSON_TOO_DEEP"
    assert err_code(conn.ask('REGISTER {"name":"w","tasks":[[[["sum"]]]],"slots":1}')[0]) == (
        "JSON_TOO_DEEP"
    )
    assert conn.ask("PING") == ["OK PONG"]
    # [[[1]]] is three deep: accepted by the parser, then refused by the task as BAD_INPUT.
    assert err_code(conn.ask("SUBMIT sum [[[1]]]")[0]) == "BAD_INPUT"
    assert conn.ask("SUBMIT sum [1,2]") == ["OK j1"]


def test_json_far_past_the_recursion_limit_is_json_too_deep(clock):
    """A job input nested 100,000 deep is ERR JSON_TOO_DEEP, not a crash, and PING still works."""
    conn = connect_to(make_factory(clock))
    assert err_code(conn.ask("RUN sum " + "[" * 100_000 + "]" * 100_000)[0]) == "JSON_TOO_DEEP"
    assert conn.ask("PING") == ["OK PONG"]


def test_worker_results_are_not_held_to_max_json_depth(clock):
    """max_json_depth guards against strangers: a registered worker's DONE may be deeper."""
    factory = make_factory(clock, max_json_depth=2, heartbeat_interval=100, heartbeat_timeout=300)
    worker = connect_to(factory)
    worker.ask('REGISTER {"name":"w1","tasks":["sort"],"slots":1}')
    client = connect_to(factory)
    client.send("RUN sort [1]\n")
    [do] = worker.lines()
    ticket = json.loads(do[3:])["id"]
    deep = "[" * 10 + "1" + "]" * 10
    assert worker.ask(f'DONE {{"id":{ticket},"result":[{deep}]}}') == []
    assert client.lines() == [f"RESULT j1 [{deep}]"]


@pytest.mark.parametrize("limit, ok", [(21, True), (20, False)])
def test_result_too_large_fails_the_job(clock, limit, ok):
    """A job whose encoded result is longer than max_result_bytes ends FAILED RESULT_TOO_LARGE
    (its length exactly at the limit is fine), and the connection stays usable."""
    core = Scheduler(Registry(TASKS), clock, max_result_bytes=limit)
    conn = connect_to(make_factory(clock, core=core))
    worker = add_worker(core, "w1", slots=2)
    conn.send("RUN sort [9,8,7,6,5,4,3,2,1,0]\n")
    worker.answer_all()
    [reply] = conn.lines()
    if ok:
        assert reply == "RESULT j1 [0,1,2,3,4,5,6,7,8,9]"  # 21 characters
    else:
        job, code, payload = reply.split(" ", 3)[1:]
        assert (job, code) == ("j1", "RESULT_TOO_LARGE")
        error = json.loads(payload)
        assert error["type"] == "ResultTooLarge"
        assert "21" in error["message"] and "20" in error["message"]
        assert json.loads(conn.ask("STATUS j1")[0][3:])["state"] == "failed"
    assert conn.ask("PING") == ["OK PONG"]


# -- the worker's side ---------------------------------------------------------------------------

NONCE = "0123456789abcdef0123456789abcdef"


def FakePool() -> _FakePool:  # noqa: N802 - stands in for the class these tests used
    """A pool that is never asked to run anything in these tests."""
    return _FakePool(refuse=True)


_WORKERS: list = []


@pytest.fixture
def wclock():
    """A Clock for worker protocols; closes every one still open, then checks for leaks."""
    c = Clock()
    yield c
    for proto in _WORKERS:
        if not proto.lost:
            proto.connectionLost(Failure(ConnectionDone()))
    _WORKERS.clear()
    assert c.getDelayedCalls() == []


def worker_conn(worker_factory: WorkerFactory):
    proto = worker_factory.buildProtocol(None)
    tr = StringTransport()
    proto.makeConnection(tr)
    _WORKERS.append(proto)
    return proto, tr


def greeting(**extra) -> bytes:
    return (format_greeting("server", 1 << 20, **extra) + "\n").encode()


def sent(tr: StringTransport) -> list[str]:
    out = tr.value().decode()
    tr.clear()
    return out.splitlines()


def test_worker_sends_auth_with_the_right_proof_before_register(wclock):
    """When the greeting lists "worker" in auth, the worker answers with AUTH worker and the
    proof of its secret for this nonce, then REGISTER."""
    wf = WorkerFactory(FakePool(), "w1", ["sum"], 1, clock=wclock, secret=WORKER_SECRET)
    proto, tr = worker_conn(wf)
    proto.dataReceived(greeting(auth=["client", "worker"], nonce=NONCE))
    auth_, register = sent(tr)
    verb, role, given = auth_.split(" ")
    assert (verb, role) == ("AUTH", "worker")
    assert verify(WORKER_SECRET, NONCE, "worker", given)
    assert given == proof(WORKER_SECRET, NONCE, "worker")
    assert register.startswith("REGISTER {")


@pytest.mark.parametrize(
    "extra", [{}, {"auth": ["client"], "nonce": NONCE}], ids=["no-auth", "client-only"]
)
def test_worker_sends_no_auth_when_the_server_does_not_ask(wclock, extra):
    """A worker holding a secret sends no AUTH when the server does not ask for a worker proof:
    the proof would be wasted, and sent to whoever answered."""
    wf = WorkerFactory(FakePool(), "w1", ["sum"], 1, clock=wclock, secret=WORKER_SECRET)
    proto, tr = worker_conn(wf)
    proto.dataReceived(greeting(**extra))
    [register] = sent(tr)
    assert register.startswith("REGISTER {")


def test_worker_without_a_secret_still_registers_when_asked_for_one(wclock):
    """A worker with no secret facing a server that wants one sends REGISTER without AUTH (the
    server's NOAUTH then makes it back off), rather than a made-up proof."""
    wf = WorkerFactory(FakePool(), "w1", ["sum"], 1, clock=wclock)
    proto, tr = worker_conn(wf)
    proto.dataReceived(greeting(auth=["worker"], nonce=NONCE))
    [register] = sent(tr)
    assert register.startswith("REGISTER {")


def refuse(
    wclock, wf: WorkerFactory, line: str = "ERR AUTH_FAILED authentication failed."
) -> float:
    """Connect, greet, refuse; returns how long the worker waits before closing."""
    proto, tr = worker_conn(wf)
    proto.dataReceived(greeting(auth=["worker"], nonce=NONCE))
    proto.dataReceived(line.encode() + b"\n")
    waited, step = 0.0, 1 / 16
    while not tr.disconnecting:
        assert waited < 100, "the refused worker never closed"
        wclock.advance(step)
        waited += step
    proto.connectionLost(Failure(ConnectionDone()))
    return waited


def test_refused_worker_closes_after_a_growing_backoff(wclock):
    """A refused AUTH (or the NOAUTH on REGISTER) closes the connection after 0.5*2**n s for the
    n-th refusal in a row, capped at max_delay."""
    wf = WorkerFactory(
        FakePool(), "w1", ["sum"], 1, clock=wclock, secret=WORKER_SECRET, max_delay=5.0
    )
    delays = [refuse(wclock, wf) for _ in range(4)]
    assert delays == [1.0, 2.0, 4.0, 5.0]
    assert wf.rejections == 4
    assert refuse(wclock, wf, "ERR NOAUTH this connection is not authenticated.") == 5.0


def test_one_refusal_is_counted_once_per_connection(wclock):
    """AUTH_FAILED followed by NOAUTH for the pipelined REGISTER is one refusal, one timer."""
    wf = WorkerFactory(FakePool(), "w1", ["sum"], 1, clock=wclock, secret=WORKER_SECRET)
    proto, tr = worker_conn(wf)
    proto.dataReceived(greeting(auth=["worker"], nonce=NONCE))
    proto.dataReceived(b"ERR AUTH_FAILED authentication failed.\nERR NOAUTH not authenticated.\n")
    assert wf.rejections == 1
    assert len(wclock.getDelayedCalls()) == 2  # the heartbeat and one backoff
    wclock.advance(1.0)
    assert tr.disconnecting


def test_refused_worker_closed_by_the_server_first_leaves_no_timer(wclock):
    """If the server closes the connection before the worker's backoff has run out (as it does
    after the last allowed failure, or on AUTH_TIMEOUT), the backoff timer is cancelled rather
    than left to fire on a dead connection."""
    wf = WorkerFactory(FakePool(), "w1", ["sum"], 1, clock=wclock, secret=WORKER_SECRET)
    proto, tr = worker_conn(wf)
    proto.dataReceived(greeting(auth=["worker"], nonce=NONCE))
    proto.dataReceived(b"ERR AUTH_TIMEOUT no successful AUTH within 10s; closing.\n")
    proto.connectionLost(Failure(ConnectionDone()))
    leftover = list(wclock.getDelayedCalls())
    for call in leftover:  # so that the fixture reports only this test's failure
        call.cancel()
    assert leftover == []


def test_worker_with_the_right_secret_registers_over_iosim(clock):
    """End to end: a worker with the worker secret authenticates and registers."""
    server_factory = make_factory(clock, secrets=dict(BOTH))
    wf = WorkerFactory(FakePool(), "w1", ["sum"], 1, clock=clock, secret=WORKER_SECRET)
    worker, server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: wf.buildProtocol(None), clock=clock
    )
    pump.flush()
    assert worker.registered
    assert server.auth.roles == {"worker"}
    assert [w.name for w in server_factory.core.workers()] == ["w1"]
    worker.transport.loseConnection()
    pump.flush()


def test_worker_with_the_wrong_secret_is_refused_over_iosim(clock):
    """End to end: a worker holding the client secret is refused, never registers, closes after
    its backoff, and no timer is left on either side."""
    server_factory = make_factory(clock, secrets=dict(BOTH))
    wf = WorkerFactory(FakePool(), "w1", ["sum"], 1, clock=clock, secret=CLIENT_SECRET)
    worker, server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: wf.buildProtocol(None), clock=clock
    )
    pump.flush()
    assert not worker.registered
    for _ in range(40):
        clock.advance(0.125)
        pump.flush()
    assert worker.lost
    assert wf.rejections == 1
    assert server_factory.core.workers() == []
    assert server_factory.connections == 0


# -- the client's side ---------------------------------------------------------------------------


def test_auth_line_needs_a_secret_when_the_server_asks_for_one():
    """auth_line raises ClusterError (naming how to give a secret) when the server requires a
    client proof and none is given."""
    with pytest.raises(ClusterError, match="secret"):
        auth_line({"auth": ["client", "worker"], "nonce": NONCE}, None)


@pytest.mark.parametrize("info_", [{}, {"auth": ["worker"], "nonce": NONCE}, {"auth": []}])
@pytest.mark.parametrize("secret", [None, CLIENT_SECRET])
def test_auth_line_is_none_when_not_required(info_, secret):
    """No AUTH is sent unless the greeting lists "client" in auth, with or without a secret."""
    assert auth_line(info_, secret) is None


def test_auth_line_is_accepted_by_the_server(factory):
    """The line auth_line builds from a real greeting authenticates the connection."""
    conn = connect_to(factory)
    line = auth_line(info(conn), CLIENT_SECRET)
    assert line.startswith("AUTH client ")
    assert conn.ask(line) == ["OK AUTHENTICATED client"]


class ConnectHarness:
    """``connect()`` against a MemoryReactorClock, the server played by a ServerProtocol."""

    def __init__(self, factory: ServerFactory, secret: bytes | None) -> None:
        self.reactor = MemoryReactorClock()
        self.d: Deferred = connect(self.reactor, "tcp:127.0.0.1:7420", secret)
        _host, _port, client_factory, _timeout, _bind = self.reactor.tcpClients[0]
        self.client = client_factory.buildProtocol(None)
        self.client_tr = StringTransport()
        self.client.makeConnection(self.client_tr)
        self.server = connect_to(factory)

    def pump(self) -> None:
        for _ in range(10):
            out = self.client_tr.value()
            self.client_tr.clear()
            if out:
                self.server.send(out)
            back = self.server.tr.value()
            self.server.tr.clear()
            if back:
                self.client.dataReceived(back)
            if not out and not back:
                return

    def start(self) -> None:
        self.client.dataReceived(("\n".join(self.server.greeting) + "\n").encode())
        self.pump()


def test_connect_proves_the_client_secret(factory):
    """connect() with the client secret sends AUTH after the greeting and fires with a Client
    whose requests work."""
    h = ConnectHarness(factory, CLIENT_SECRET)
    h.start()
    client = result_of(h.d)
    assert "client" in h.server.proto.auth.roles
    d = client.stats()
    h.pump()
    assert "jobs_submitted" in result_of(d)
    h.client.connectionLost(Failure(ConnectionDone()))


def test_connect_without_a_secret_fails_when_one_is_required(factory):
    """connect() without a secret to a server that requires one fails with ClusterError and
    sends nothing."""
    h = ConnectHarness(factory, None)
    h.start()
    with pytest.raises(ClusterError, match="secret"):
        result_of(h.d)
    assert h.client_tr.value() == b""


def test_connect_with_the_wrong_secret_is_refused_and_closes(factory, clock):
    """connect() with the wrong secret fails with RequestRefused AUTH_FAILED once the server's
    delayed answer arrives, and closes the connection."""
    h = ConnectHarness(factory, WORKER_SECRET)
    h.start()
    assert not h.d.called
    clock.advance(0.25)
    h.pump()
    with pytest.raises(RequestRefused) as info_:
        result_of(h.d)
    assert info_.value.code == "AUTH_FAILED"
    assert h.client_tr.disconnecting
