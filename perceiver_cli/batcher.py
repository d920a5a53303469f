"""Batching across requests: one bounded queue, one worker thread that owns the compute.

    batcher = Batcher(compute, key=lambda job: job.kind, max_batch=16, batch_wait=0.005,
                      queue_size=64, max_inputs=10_000)
    batcher.start()
    answer = await batcher.submit(job, size=len(job.texts), gone=client_hung_up)

`compute(jobs, before_pass) -> answers` (one answer per job, in order) does the work of
jobs that share a batching key (`key(job)`, any hashable), and calls `before_pass(inputs)`
before each pass of the work with the number of inputs that pass takes; `before_pass`
raises to stop the work there.

The worker takes the first waiting item, then keeps taking items for at most
`batch_wait` seconds or until `max_batch` sizes (texts) are gathered; it runs each key's
items of that batch in one `compute` call, keys in the order they first came. While a
batch runs, new requests wait in the queue, so under load each batch takes everything
that arrived meanwhile. A full queue raises `QueueFull` at once.

- A request may take at most `max_inputs` inputs (counted by `before_pass`, `TooMuchWork`
  beyond). A merged computation of several requests that takes more, or that fails in any
  other way, is run again one request at a time: a request fails exactly when it fails
  alone, never for what it was batched with.
- A client that hangs up (`gone()` returns first) marks its work as gone: the worker drops
  it before it starts, and stops a computation whose clients have all gone at its next
  `before_pass` (`Cancelled`).
- `close()` lets the worker finish what is queued and end; `abort()` stops at once: the
  running computation at its next `before_pass`, queued work answered `Cancelled`.
- `observe(items, inputs, started, seconds)`, when given, hears of every computation once
  it ends (answered or failed): its `Work` items (each with its `tag` from `submit` and
  when it was `queued`), the inputs it took, when it started and how long it ran.

This module knows nothing of HTTP, the server, the model or torch (it imports only the
package's errors): the server hands it the compute function and the key, and the tests
drive it in-process with a fake compute (tests/test_batcher.py).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Hashable

from .errors import InputError, PerceiverError

Compute = Callable[[list, Callable[[int], None]], list]


class QueueFull(Exception):
    """Every place in the queue is taken: the request is not queued."""


class Cancelled(PerceiverError):
    """Work stopped before it ran or between passes: its clients have gone, or the batcher is stopping at once."""


class TooMuchWork(InputError):
    """A request that needs more inputs than `max_inputs`, the batcher's budget per request."""

    def __init__(self, limit: int):
        super().__init__(f"the request needs more than {limit} model inputs")
        self.limit = limit


@dataclass
class Work:
    job: Any
    size: int  # what it counts towards max_batch (texts)
    deliver: Callable[[Any, BaseException | None], None]
    gone: threading.Event = field(default_factory=threading.Event)  # its client hung up: nobody to answer
    tag: Any = None  # the submitter's, handed back in `observe`
    queued: float = field(default_factory=time.monotonic)  # when it was queued


class Batcher:
    """One queue, one worker thread that owns the compute (see the module docstring)."""

    def __init__(self, compute: Compute, *, key: Callable[[Any], Hashable], max_batch: int, batch_wait: float,
                 queue_size: int, max_inputs: int, observe: Callable[[list, int, float, float], None] | None = None):
        self.compute, self.key, self.observe = compute, key, observe
        self.max_batch, self.batch_wait, self.max_inputs = max_batch, batch_wait, max_inputs
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.running = 0  # requests in the batch being computed
        self.batches = 0  # batches run
        self.aborting = threading.Event()  # stop at once: the running work at its next pass, nothing queued
        self.thread = threading.Thread(target=self._work, name="perceiver-batcher", daemon=True)

    @property
    def waiting(self) -> int:
        return self.queue.qsize()

    @property
    def finished(self) -> bool:
        """The worker has ended, or is stopping at once."""
        return not self.thread.is_alive() or self.aborting.is_set()

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """No more work: the worker finishes what is queued, then ends."""
        if self.thread.is_alive():
            self.queue.put(None)

    def abort(self) -> None:
        """Stop at once: the running work stops before its next pass, queued work is answered `Cancelled`."""
        self.aborting.set()
        while True:
            try:
                work = self.queue.get_nowait()
            except queue.Empty:
                break
            if work is not None:
                _deliver(work, None, Cancelled("stopped: the server is stopping"))
        self.close()

    async def submit(self, job: Any, size: int, gone: Callable[[], Awaitable] | None = None, tag: Any = None):
        """The job's answer, computed with whatever else is waiting. Raises `QueueFull`, or
        what its computation raised. When `gone()` finishes first (the client hung up), the
        work is marked as gone, so the worker drops it or stops it between passes, and
        `Cancelled` is raised."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(value, error):
            if not future.done():  # the client may have gone away (cancelled)
                future.set_exception(error) if error is not None else future.set_result(value)

        def deliver(value, error=None):
            loop.call_soon_threadsafe(settle, value, error)

        work = Work(job, size, deliver, tag=tag)
        try:
            self.queue.put_nowait(work)
        except queue.Full:
            raise QueueFull() from None
        watcher = asyncio.ensure_future(gone()) if gone is not None else None
        try:
            if watcher is not None:
                await asyncio.wait({future, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not future.done():
                    raise Cancelled("the client has gone")
            return await future
        finally:
            if not future.done():  # the client has gone, or this request's task was cancelled
                work.gone.set()
                future.cancel()  # what the worker still delivers is dropped, never logged
            if watcher is not None:
                watcher.cancel()

    # -- the worker ---------------------------------------------------------------------------

    def _work(self) -> None:
        stop = False
        while not stop:
            first = self.queue.get()
            if first is None or self.aborting.is_set():
                if first is not None:
                    _deliver(first, None, Cancelled("stopped: the server is stopping"))
                return
            batch, size = [first], first.size
            deadline = time.monotonic() + self.batch_wait
            while size < self.max_batch:
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
                size += item.size
            self.running = len(batch)
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - the worker must outlive anything: its requests get the error
                for w in batch:
                    _deliver(w, None, e)
            finally:
                self.running = 0
                self.batches += 1

    def _run(self, batch: list[Work]) -> None:
        groups: dict[Hashable, list[Work]] = {}
        for w in batch:
            if not w.gone.is_set():  # nobody waits for the others
                groups.setdefault(self.key(w.job), []).append(w)
        for items in groups.values():
            try:
                answers = self._compute(items)
            except Cancelled as e:  # its clients have all gone, or the batcher stops at once
                for w in items:
                    w.deliver(None, e)
            except Exception as e:
                if len(items) == 1:
                    items[0].deliver(None, e)
                    continue
                for w in items:  # run alone, so only the item that fails fails
                    try:
                        answer = self._compute([w])[0]
                    except Exception as e:
                        w.deliver(None, e)
                    else:
                        w.deliver(answer)
            else:
                for w, answer in zip(items, answers):
                    w.deliver(answer)

    def _compute(self, items: list[Work]) -> list:
        """The answers of `items` (one key), computed together within their budget."""
        used = 0

        def before_pass(inputs: int) -> None:
            nonlocal used
            if self.aborting.is_set() or all(w.gone.is_set() for w in items):
                raise Cancelled("stopped: the client has gone, or the server is stopping")
            used += inputs
            if used > self.max_inputs:  # several requests: then each is run alone, with its own budget
                raise TooMuchWork(self.max_inputs)

        started = time.monotonic()
        try:
            answers = self.compute([w.job for w in items], before_pass)
        finally:
            if self.observe is not None:
                self.observe(items, used, started, time.monotonic() - started)
        if len(answers) != len(items):
            raise RuntimeError(f"compute answered {len(answers)} jobs of {len(items)}")
        return answers


def _deliver(work: Work, value: Any, error: BaseException | None) -> None:
    try:
        work.deliver(value, error)
    except Exception:  # noqa: BLE001 - e.g. the event loop is gone: nobody to answer
        pass


__all__ = ["Batcher", "Cancelled", "QueueFull", "TooMuchWork", "Work"]
