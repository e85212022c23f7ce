"""clusterd's core: jobs, scheduling and durability, with no sockets, threads or reactor.

Layering (every arrow points down; no module imports one above it):

- ``clusterd.tasks`` is the bottom layer: user functions (``Registry``, ``Task``,
  ``TaskInputError``), pure, no Twisted. The core imports it; it imports nothing of the core.
- ``errors``, ``config``, ``waiters``, ``workers`` (IWorkerLink, WorkerHandle, WorkerRegistry),
  ``journal`` (records, IJournal), ``streaming``, ``wire``/``jsoncodec`` (the encoding);
- ``jobs`` (a Job and its own state transitions, the durability gate), ``table`` (jobs by id,
  paging), ``uploads`` (an Upload drives an IUploadSink);
- pure policy, returning decisions: ``admission`` (limits, keys, the split), ``ring`` (fairness,
  prefetch), ``retry`` (requeue | retry after s | fail, stalls, stragglers), ``recovery``
  (journal records back into jobs);
- coordination, owning Deferreds and timers: ``endings`` (combine, end, journal appends,
  retry timers), ``execution`` (each send's Deferred), ``dispatch`` (the loop, sends per turn,
  yielding through an injected ``next_turn``), ``intake`` (submit and streamed inputs);
- ``scheduler``: the :class:`~clusterd.core.scheduler.Scheduler` that wires them, the public API.
"""
