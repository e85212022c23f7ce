"""The Deferred client library's streamed requests and answers, over a StringTransport: lines go
out in order and only as the transport takes them, a refusal mid-stream cuts the rest short, a
streamed RESULT is joined, and an unreadable input fails cleanly."""

from __future__ import annotations

import json

import pytest
from helpers import result_of
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from clusterd.client.api import Client, ClientProtocol
from clusterd.client.errors import InputUnreadable, RequestRefused


class FillingTransport(StringTransport):
    """A transport whose write buffer is "full" after ``room`` writes: it pauses its producer,
    as a real one does past its buffer size; ``drain`` makes room and resumes it."""

    def __init__(self) -> None:
        super().__init__()
        self.room = 1 << 30

    def write(self, data: bytes) -> None:
        super().write(data)
        self.room -= 1
        if self.room <= 0 and self.producer is not None:
            self.producer.pauseProducing()

    def drain(self, room: int = 1 << 30) -> None:
        self.room = room
        if self.producer is not None:
            self.producer.resumeProducing()


def connected(max_line: int = 1 << 20) -> tuple[Client, ClientProtocol, FillingTransport]:
    proto = ClientProtocol()
    tr = FillingTransport()
    proto.makeConnection(tr)
    proto.dataReceived(
        b'HELLO clusterd 1 {"server":"clusterd/0.1.0","role":"server","max_line":%d}\n' % max_line
    )
    return Client(proto), proto, tr


def sent(tr: StringTransport) -> list[bytes]:
    out = tr.value().splitlines()
    tr.clear()
    return out


def test_run_stream_writes_head_pieces_end_then_reads_the_answer():
    """run_stream writes the head line, one line per piece and the end line, unregisters its
    producer, then fires with the answer."""
    client, proto, tr = connected()
    d = client.run_stream("sum", iter([[1, 2], [3]]), 2, size=3)
    assert sent(tr) == [b'RUN sum @ {"chunks":2,"size":3}', b"+[1,2]", b"+[3]", b"."]
    assert tr.producer is None  # unregistered once the last line went out
    proto.dataReceived(b"RESULT j1 6\n")
    assert result_of(d) == 6


def test_writing_waits_while_the_transport_is_full_and_other_requests_wait_their_turn():
    """A streamed request stops writing while the transport is full, and a later request goes out
    only after the whole stream."""
    client, proto, tr = connected()
    tr.room = 3
    d = client.submit_stream("sum", ([i] for i in range(5)))
    ping = client.ping()
    first = sent(tr)
    assert first == [b"SUBMIT sum @", b"+[0]", b"+[1]"]  # then the buffer was full
    tr.drain()
    rest = sent(tr)
    assert rest[-2:] == [b".", b"PING"]  # the PING goes out after the stream, not inside it
    assert first[1:] + rest[:-2] == [b"+[%d]" % i for i in range(5)]
    proto.dataReceived(b"OK j1\nOK PONG\n")
    assert result_of(d) == "j1" and result_of(ping) == "PONG"


def test_refusal_mid_stream_sends_the_end_line_and_nothing_more():
    """A refusal that arrives mid-stream makes the client send the end line and nothing more, and
    fails the request with RequestRefused."""
    client, proto, tr = connected()
    tr.room = 10
    d = client.run_stream("sum", ([i] for i in range(1000)))
    assert len(sent(tr)) == 10
    proto.dataReceived(b"ERR BAD_INPUT piece 2: nope. Job j1 was abandoned.\n")
    tr.drain()
    assert sent(tr) == [b"."]
    with pytest.raises(RequestRefused, match="BAD_INPUT"):
        result_of(d)


def test_big_pieces_are_halved_to_fit_the_servers_line():
    """Pieces too big for the server's line limit are halved until every line fits, keeping the
    input."""
    client, proto, tr = connected(max_line=16)
    client.submit_stream("sum", iter([list(range(10))]))
    lines = sent(tr)
    assert all(len(x) <= 16 for x in lines[1:])
    assert sum((json.loads(x[1:]) for x in lines[1:-1]), []) == list(range(10))


def test_streamed_result_is_joined():
    """A result streamed in pieces is joined into one value."""
    client, proto, tr = connected()
    d = client.wait("j3")
    proto.dataReceived(b"RESULT j3 @\n+[1,2]\n+[3]\n.\n")
    assert result_of(d) == [1, 2, 3]


def test_unreadable_input_fails_the_request_and_closes():
    """An input that cannot be read fails the request with InputUnreadable and closes the
    connection."""
    client, proto, tr = connected()

    def pieces():
        yield [1]
        raise ValueError("bad JSON at byte 9")

    d = client.run_stream("sum", pieces())
    assert tr.disconnecting
    proto.connectionLost(Failure(ConnectionError()))
    with pytest.raises(InputUnreadable, match="bad JSON at byte 9"):
        result_of(d)
