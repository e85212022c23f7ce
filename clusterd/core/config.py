"""Every scheduling knob, with the defaults the server uses (see docs/RELIABILITY.md)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SchedulerConfig", "OFFLOAD_SUBTASKS", "OFFLOAD_BYTES"]

# A job this big has its combine offloaded (Scheduler.offload): its sub-task count, or its
# input's size in characters.
OFFLOAD_SUBTASKS = 32
OFFLOAD_BYTES = 1 << 20


@dataclass
class SchedulerConfig:
    """Every scheduling knob, with the defaults the server uses (see docs/RELIABILITY.md)."""

    max_subtasks: int = 100_000  # per job
    max_queued: int = 1_000_000  # sub-tasks queued over all jobs before SUBMIT gets ERR BUSY
    retention: float = 3600.0  # seconds an ended job stays retrievable
    default_timeout: float | None = None  # per sub-task, when neither task nor job sets one
    default_attempts: int = 3  # tries per sub-task before its job fails
    max_lost: int = 5  # times a sub-task's worker may vanish under it before its job fails
    retry_base: float = 0.5  # first retry backoff, doubled per failed attempt
    retry_cap: float = 30.0
    speculate: bool = False
    speculate_factor: float = (
        3.0  # a running sub-task this many times the job's mean is a straggler
    )
    speculate_min_done: int = 3  # finished sub-tasks needed before the mean is trusted
    speculate_min_seconds: float = 1.0  # never speculate on sub-tasks younger than this
    # A sub-task with no timeout stalls after stall_factor x its task's mean run time, and
    # never before stall_min seconds; a worker that answered nothing for that long is wedged.
    stall_factor: float = 20.0
    stall_min: float = 60.0
    max_result_bytes: int = 64 * 1024 * 1024  # a job's encoded answer
    max_input_bytes: int = 1 << 30  # a streamed input's piece lines, in total
    prefetch: int = 1  # short sub-tasks a worker may hold per slot (the server's default is 256)
    prefetch_below: float = 0.01  # a job whose sub-tasks run shorter than this (mean) is short
    prefetch_window: float = 0.05  # seconds of short sub-tasks a slot may hold queued
    dispatch_per_turn: int = 0  # sends per turn: dispatch yields a reactor turn after this many
    # (0: no cap; the server's default is 16)
