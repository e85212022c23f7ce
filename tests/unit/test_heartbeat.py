"""Heartbeat: PING while quiet, declare the peer lost after ``timeout`` seconds of silence."""

from __future__ import annotations

from twisted.internet.task import Clock

from clusterd.heartbeat import Heartbeat


class Peer:
    """Records what the heartbeat asks for: pings sent and timeouts declared."""

    def __init__(self) -> None:
        self.pings: list[float] = []
        self.timeouts: list[float] = []


def beat(clock: Clock, peer: Peer, interval: float = 5.0, timeout: float = 15.0) -> Heartbeat:
    return Heartbeat(
        clock, interval, timeout, lambda: peer.pings.append(clock.seconds()), peer.timeouts.append
    )


def test_nothing_happens_before_start(clock):
    """A heartbeat that was never started schedules nothing."""
    beat(clock, Peer())
    assert clock.getDelayedCalls() == []


def test_pings_every_interval_while_the_peer_is_quiet(clock):
    """Started, it pings every interval (not at once) until the timeout is reached."""
    peer = Peer()
    hb = beat(clock, peer)
    hb.start()
    assert peer.pings == []
    clock.advance(5)
    clock.advance(5)
    assert peer.pings == [5.0, 10.0]
    assert peer.timeouts == []
    hb.stop()


def test_silence_reaching_the_timeout_declares_the_peer_lost_once(clock):
    """After timeout seconds without a touch, on_timeout gets the silence and the loop stops."""
    peer = Peer()
    hb = beat(clock, peer)
    hb.start()
    clock.advance(5)
    clock.advance(5)
    clock.advance(5)
    assert peer.timeouts == [15.0]
    assert peer.pings == [5.0, 10.0]  # no ping at the tick that gave up
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert peer.timeouts == [15.0]


def test_touch_resets_the_silence(clock):
    """Any sign of life (touch) restarts the silence count, so a chatty peer never times out."""
    peer = Peer()
    hb = beat(clock, peer)
    hb.start()
    for _ in range(10):
        clock.advance(5)
        hb.touch()
    assert peer.timeouts == []
    assert len(peer.pings) == 10
    clock.advance(5)
    clock.advance(5)
    assert peer.timeouts == []
    clock.advance(5)
    assert peer.timeouts == [15.0]


def test_timeout_is_measured_from_the_last_touch(clock):
    """The silence passed to on_timeout is measured from the last touch, at tick granularity."""
    peer = Peer()
    hb = beat(clock, peer, interval=2.0, timeout=5.0)
    hb.start()
    clock.advance(1)
    hb.touch()  # t=1
    clock.advance(1)  # tick at 2: silent 1, ping
    clock.advance(2)  # tick at 4: silent 3, ping
    clock.advance(2)  # tick at 6: silent 5, lost
    assert peer.timeouts == [5.0]
    assert peer.pings == [2.0, 4.0]


def test_stop_cancels_the_timer_and_is_idempotent(clock):
    """stop() leaves no timer behind and may be called again (or before start)."""
    peer = Peer()
    hb = beat(clock, peer)
    hb.stop()
    hb.start()
    hb.start()  # a second start does not add a second loop
    assert len(clock.getDelayedCalls()) == 1
    hb.stop()
    hb.stop()
    assert clock.getDelayedCalls() == []
    clock.advance(60)
    assert peer.pings == [] and peer.timeouts == []


def test_start_counts_silence_from_the_start(clock):
    """Silence is counted from start(), not from construction."""
    peer = Peer()
    hb = beat(clock, peer, interval=1.0, timeout=3.0)
    clock.advance(100)
    hb.start()
    clock.advance(1)
    clock.advance(1)
    assert peer.timeouts == []
    clock.advance(1)
    assert peer.timeouts == [3.0]


def test_interval_zero_disables_the_heartbeat(clock):
    """An interval of 0 turns heartbeats off: nothing is scheduled."""
    peer = Peer()
    hb = beat(clock, peer, interval=0, timeout=1)
    hb.start()
    assert clock.getDelayedCalls() == []
    hb.stop()
