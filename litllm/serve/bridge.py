"""The async bridge: one thread runs the engine, asyncio handlers wait on per-request queues.

    bridge = EngineLoop(engine, capacity=max_batch_size + max_queue)
    bridge.start(asyncio.get_running_loop())
    request_id, outputs = bridge.submit(Request(...))   # on the event loop; 503 when full
    output = await outputs.get()                        # an engine Output (or an Exception), until .finished
    bridge.abort(request_id)                            # client gone: the slot is freed at the next step
    bridge.stop()

The engine thread loops `engine.step()` while any request is in flight and sleeps on an Event
otherwise. Each Output goes to its request's queue through `loop.call_soon_threadsafe` (asyncio
queues are not thread-safe); the engine thread waits (at most `DELIVERY_WAIT_S`) for the loop to take
them before its next step, which may hold the GIL throughout. A request's queue is dropped when its
final Output (finished, including "abort") has been dispatched, so `num_in_flight` returning to 0
means nothing leaked.

A step that fails for some requests only (`engine.RequestError`) fails those with a 500 and goes on
with the others; any other failure of a step (the batched forward: out of memory, a bug) fails all.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Optional

from litllm.engine import RequestError
from litllm.serve.protocol import APIError

log = logging.getLogger("uvicorn.error")

DELIVERY_WAIT_S = 0.02
"""The longest the engine thread waits, after a step, for the event loop to take that step's Outputs before it starts
the next step (`EngineLoop._run`)."""


class EngineLoop:
    def __init__(self, engine, capacity: int) -> None:
        self.engine = engine
        self.capacity = capacity  # requests in flight (running + waiting) before new ones get a 503
        self.queues: dict[int, asyncio.Queue] = {}
        self.num_aborted = 0
        self.metrics = None  # a ServerMetrics (metrics.py), told of every request and Output
        self._lock = threading.Lock()  # queues + engine.add are one step for the engine thread
        self._wake = threading.Event()
        self._delivered = threading.Event()  # the event loop has handed the last step's Outputs to their handlers
        self._stopping = False
        self._refusing = False  # set by abort_all
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    # ------------------------------------------------------------------ the event-loop side
    @property
    def num_in_flight(self) -> int:
        return len(self.queues)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="litllm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Abort what is still in flight, then end the engine thread."""
        self.abort_all()
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def abort_all(self) -> None:
        """Refuse new requests (503) and abort those in flight: each gets its final "abort" Output, which
        the handlers answer with a 503 (a stream: an error event, then [DONE])."""
        self._refusing = True
        for request_id in list(self.queues):
            self.abort(request_id)

    def submit(self, request) -> tuple[int, asyncio.Queue]:
        """Add `request` to the engine; its Outputs will arrive on the returned queue."""
        ids, queue = self.submit_many([request])
        return ids[0], queue

    def submit_many(self, requests: list) -> tuple[list[int], asyncio.Queue]:
        """Add `requests` (the choices of one API request) to the engine, all or none; the Outputs of all of
        them arrive on the one returned queue (tell them apart by `request_id`)."""
        if self._refusing:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
        if len(self.queues) + len(requests) > self.capacity:
            raise APIError(
                503, f"the server is at capacity ({len(self.queues)} requests in flight, {len(requests)} more asked "
                     f"for, room for {self.capacity}): retry shortly", code="server_overloaded",
                headers={"Retry-After": "1"},
            )
        queue: asyncio.Queue = asyncio.Queue()
        ids: list[int] = []
        with self._lock:  # the engine thread can't dispatch this request's first Output before its queue exists
            try:
                ids += self.engine.add_many(requests)
            except Exception:
                for request_id in ids:
                    self.engine.abort(request_id)
                raise
            for request_id in ids:
                self.queues[request_id] = queue
            if self.metrics is not None:
                self.metrics.submitted(ids, requests)
        self._wake.set()
        return ids, queue

    def abort(self, request_id: int) -> None:
        """Stop a request that is still in flight (no-op once it has finished)."""
        with self._lock:
            if request_id not in self.queues:
                return
            self.engine.abort(request_id)
            self.num_aborted += 1
        self._wake.set()

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            if not self.queues:
                self._wake.wait()
                continue
            failed: dict[int, Exception] = {}
            try:
                outputs = self.engine.step()
            except RequestError as e:  # these requests only: the others' Outputs are in e.outputs
                log.error("%s", e, exc_info=next(iter(e.errors.values())))
                outputs, failed = e.outputs, e.errors
            except Exception as e:  # the batched forward (a bug, out of memory): every request in flight
                log.error("the engine failed: %s: %s", type(e).__name__, e, exc_info=e)
                self._fail_all(APIError(500, f"the engine failed: {type(e).__name__}: {e}"))
                continue
            with self._lock:
                targets = []
                for out in outputs:
                    if self.metrics is not None:
                        self.metrics.dispatched(out)
                    queue = self.queues.get(out.request_id)
                    if out.finished:
                        self.queues.pop(out.request_id, None)
                    if queue is not None:
                        targets.append((queue, out))
                for request_id, error in failed.items():
                    if self.metrics is not None:
                        self.metrics.failed(request_id)
                    queue = self.queues.pop(request_id, None)
                    if queue is not None:
                        targets.append((queue, APIError(500, f"the engine failed on this request: "
                                                             f"{type(error).__name__}: {error}")))
            if targets:
                # a compiled CPU step holds the GIL while it runs (AOTInductor's runner), so the event loop could not
                # stream these tokens until the next step ended: each reached its client a step late (the first token
                # of a 1-row bf16 server, 22 of 157 ms). The loop takes ~1 ms to hand them over.
                self._delivered.clear()
                self._loop.call_soon_threadsafe(self._deliver, targets)
                self._delivered.wait(DELIVERY_WAIT_S)

    def _deliver(self, targets: list) -> None:
        """On the event loop: put each Output on its request's queue, then, once the handlers woken by them have run
        (the loop's next round), let the engine thread go on."""
        _put_all(targets)
        self._loop.call_soon(self._delivered.set)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            failed, self.queues = self.queues, {}
            for request_id in failed:
                if self.metrics is not None:
                    self.metrics.failed(request_id)
                try:
                    self.engine.abort(request_id)
                except Exception:
                    pass
        self._loop.call_soon_threadsafe(_put_all, [(queue, error) for queue in failed.values()])


def _put_all(targets: list) -> None:
    for queue, item in targets:
        queue.put_nowait(item)
