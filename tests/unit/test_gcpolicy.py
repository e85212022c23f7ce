"""The server's garbage-collector policy (server/gcpolicy.py): freeze the long-lived heap so
automatic collections stay short, and collect it fully now and then."""

from __future__ import annotations

import gc
import weakref

from twisted.internet.task import Clock

from clusterd.server.gcpolicy import GcPolicy


class _Cycle:
    def __init__(self):
        self.me = self


def test_the_policy_freezes_what_is_alive_and_collects_it_fully_later():
    """Objects alive at a tick are frozen (ordinary collections skip them); a cycle dropped after
    that is collected by the periodic full collection; stopping unfreezes everything."""
    clock = Clock()
    policy = GcPolicy(clock, freeze_every=1.0, full_every=3.0)
    try:
        policy.startService()
        assert gc.get_freeze_count() > 0
        cycle = _Cycle()
        gone = weakref.ref(cycle)
        clock.advance(1.0)  # first tick: the cycle is alive, so it is frozen
        del cycle
        gc.collect()
        assert gone() is not None  # frozen: an ordinary collection does not scan it
        clock.advance(1.0)
        assert gone() is not None
        clock.advance(1.0)  # third tick: unfreeze, collect everything, freeze again
        assert gone() is None
    finally:
        policy.stopService()
    assert gc.get_freeze_count() == 0


def test_a_cycle_already_garbage_at_a_tick_is_collected_not_frozen():
    """Cyclic garbage that exists when the policy freezes (a failed request's Failure and its
    frames) is collected first, so a flood of such garbage never waits for the full
    collection."""
    clock = Clock()
    policy = GcPolicy(clock, freeze_every=1.0, full_every=600.0)
    try:
        policy.startService()
        cycle = _Cycle()
        gone = weakref.ref(cycle)
        del cycle  # garbage already, reachable only from itself
        clock.advance(1.0)
        assert gone() is None
    finally:
        policy.stopService()
