"""What `perceiver serve` tells its operators: request ids, timing headers, an access log
and Prometheus metrics, as one ASGI middleware (`Observer`) around the app.

Every answer carries
    X-Request-ID       the client's own id when it sent a sane one (1-128 characters of
                       letters, digits and ._:-), else a new one (32 hex digits)
    X-Queue-Time       ms the request's model work waited in the queue
    X-Inference-Time   ms of the model computation that answered it (shared with the
                       requests batched with it)
    X-Total-Time       ms from the request's arrival to its answer's headers
and the access log has one line per request on stderr (`access_line`):
    2026-12-06T09:30:01.234Z 3f2a... POST /v1/fill 200 1234B total=12.3ms queue=0.4ms compute=11.2ms inputs=4
or with --log-format json one object a line with the same fields (time, id, method, path,
status, bytes, total_ms, queue_ms, compute_ms, inputs). Control characters and other
unprintable characters of a client's path or id are escaped, so a client's bytes never
reach the terminal raw.

`Metrics` holds the Prometheus metrics in a registry of its own (prometheus_client), all
named perceiver_*; `GET /metrics` answers them in the text exposition format.

The batcher reports each computation through `Metrics.computed` and each request's share
through its `Timing`, which `current()` gives to the code that answers the request (a
context variable of the request's task: the app hands it to the batcher, and its error
answers name the id). This module knows nothing of the model.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# The routes the metrics name; any other path is counted as "other" (a client picks paths:
# one label value per path would let it grow the metrics without bound).
ROUTES = ("/", "/v1/fill", "/health", "/info", "/metrics", "/openapi.json", "/docs")
METHODS = ("GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH")  # any other is counted as "other"

# Every answer's headers, and what they say (the API document quotes this).
TIMING_HEADERS = {
    "X-Request-ID": "The client's X-Request-ID when it is sane (1-128 of A-Z a-z 0-9 . _ : -), else a new one",
    "X-Queue-Time": "Milliseconds the request's model work waited in the queue",
    "X-Inference-Time": "Milliseconds of the model computation that answered it (shared with its batch)",
    "X-Total-Time": "Milliseconds from the request's arrival to the answer's headers",
}

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)


@dataclass
class Timing:
    """One request: its id, and its share of the model work (filled by the batcher's
    report, `Metrics.computed`)."""

    request_id: str
    queue_s: float = 0.0  # waited in the queue before its computation started
    compute_s: float = 0.0  # the computations that answered it
    inputs: int = 0  # model inputs of those computations
    computations: int = 0  # more than one when a failed merged batch ran it again alone


_CURRENT: ContextVar[Timing | None] = ContextVar("perceiver_request", default=None)


def current() -> Timing | None:
    """The `Timing` of the request being answered (None outside a request)."""
    return _CURRENT.get()


def request_id(given: bytes | None) -> str:
    """The client's id when it is sane, else a new one."""
    if given is not None:
        try:
            text = given.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if _SANE_ID.fullmatch(text):
            return text
    return uuid.uuid4().hex


def escape(text: str) -> str:
    """`text` with every unprintable character (controls, line breaks, bidirectional
    controls) as a \\xNN, \\uNNNN or \\UNNNNNNNN escape, and backslashes doubled."""
    if text.isprintable() and "\\" not in text and "\x7f" not in text:
        return text  # the common case, at once
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable() and ch != "\x7f":
            out.append(ch)
        else:
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    return "".join(out)


def route_of(path: str) -> str:
    if path in ROUTES:
        return path
    if path.startswith("/page/"):
        return "/page"
    return "other"


class Metrics:
    """The server's Prometheus metrics, in a registry of their own."""

    def __init__(self, about: dict, queue_depth: Callable[[], float]):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("perceiver_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=registry)
        self.duration = Histogram("perceiver_request_duration_seconds",
                                  "Time from a request's arrival to its answer's headers, by route",
                                  ["route"], buckets=SECONDS, registry=registry)
        self.queue = Histogram("perceiver_queue_duration_seconds",
                               "Time a request's model work waited in the queue", buckets=SECONDS, registry=registry)
        self.compute = Histogram("perceiver_inference_duration_seconds",
                                 "Time of one computation of the model (one batch of one kind of work)",
                                 buckets=SECONDS, registry=registry)
        self.batch_texts = Histogram("perceiver_batch_texts", "Texts in one computation of the model",
                                     buckets=COUNTS, registry=registry)
        self.batch_inputs = Histogram("perceiver_batch_inputs",
                                      "Model inputs (a window of a text in one forward pass) of one computation",
                                      buckets=COUNTS, registry=registry)
        self.depth = Gauge("perceiver_queue_depth", "Requests waiting for the model", registry=registry)
        self.depth.set_function(queue_depth)
        self.in_flight = Gauge("perceiver_requests_in_flight", "HTTP requests being answered", registry=registry)
        model = Info("perceiver_model", "The model served and how it runs", registry=registry)
        labels = {k: "" if about.get(k) is None else str(about[k])
                  for k in ("model", "revision", "device", "dtype", "quantize", "parameters", "version")}
        if os.path.isabs(labels["model"]):  # a local directory: its name, not where it lives (/metrics is open)
            labels["model"] = os.path.basename(labels["model"].rstrip(os.sep))
        model.info(labels)

    def computed(self, timings: list[Timing | None], queued_s: list[float], texts: int, inputs: int,
                 seconds: float) -> None:
        """One computation of the model: `timings` of its requests (None for one without),
        how long each waited in the queue, and what it took."""
        self.compute.observe(seconds)
        self.batch_texts.observe(texts)
        self.batch_inputs.observe(inputs)
        for timing, waited in zip(timings, queued_s):
            if timing is None:
                continue
            if timing.computations == 0:  # its wait ended with its first computation
                timing.queue_s = waited
                self.queue.observe(waited)
            timing.computations += 1
            timing.compute_s += seconds
            timing.inputs += inputs

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    content_type = CONTENT_TYPE_LATEST


def access_line(fmt: str, *, at: float, request_id: str, method: str, path: str, status: int, size: int,
                timing: Timing, total_s: float) -> str:
    """One access-log line (no newline): `fmt` "text" or "json"."""
    when = datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    fields = {"time": when, "id": escape(request_id), "method": escape(method), "path": escape(path),
              "status": status, "bytes": size, "total_ms": round(total_s * 1000, 3),
              "queue_ms": round(timing.queue_s * 1000, 3), "compute_ms": round(timing.compute_s * 1000, 3),
              "inputs": timing.inputs}
    if fmt == "json":
        return json.dumps(fields, ensure_ascii=True)
    return (f"{when} {fields['id']} {fields['method']} {fields['path']} {status} {size}B "
            f"total={total_s * 1000:.1f}ms queue={timing.queue_s * 1000:.1f}ms "
            f"compute={timing.compute_s * 1000:.1f}ms inputs={timing.inputs}")


class LineWriter:
    """The access log's lines, written by a thread of its own: a slow or stalled stream (a
    pipe that nobody reads) never holds up the server. Past `backlog` lines waiting, a line
    is dropped and counted; the count is written once the stream takes lines again, and at
    `close()`, which writes what waits (for at most `timeout` seconds)."""

    def __init__(self, write: Callable[[str], object], backlog: int = 10_000):
        self.write, self.backlog = write, backlog
        self.lines: queue.Queue = queue.Queue()
        self.dropped, self.count = 0, threading.Lock()
        self.thread = threading.Thread(target=self._run, name="perceiver-access-log", daemon=True)
        self.thread.start()

    def __call__(self, line: str) -> None:
        if self.lines.qsize() >= self.backlog:
            with self.count:
                self.dropped += 1
        else:
            self.lines.put(line)

    def _run(self) -> None:
        while (line := self.lines.get()) is not None:
            self._say_dropped()
            self.write(line + "\n")

    def _say_dropped(self) -> None:
        with self.count:
            dropped, self.dropped = self.dropped, 0
        if dropped:
            self.write(f"access log: {dropped} lines dropped (stderr took them too slowly)\n")

    def close(self, timeout: float = 5.0) -> None:
        self.lines.put(None)
        self.thread.join(timeout)
        if not self.thread.is_alive():
            self._say_dropped()


def _target(scope) -> str:
    """The request's path and query as the client sent them (bytes that are not UTF-8 as
    lone surrogates, which `escape` writes as escapes)."""
    raw = scope.get("raw_path") or scope.get("path", "").encode("utf-8", "surrogateescape")
    query = scope.get("query_string") or b""
    return (raw + (b"?" + query if query else b"")).decode("utf-8", "surrogateescape")


def _ms(seconds: float) -> bytes:
    return f"{seconds * 1000:.1f}".encode()


class Observer:
    """ASGI middleware: the request id, the timing headers, the metrics of each request and
    its access-log line (`log(line)`, or none when `log` is None)."""

    def __init__(self, app, metrics: Metrics, *, log: Callable[[str], None] | None = None, log_format: str = "text"):
        self.app, self.metrics, self.log, self.log_format = app, metrics, log, log_format

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, wall = time.perf_counter(), time.time()
        given = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                given = value
        timing = Timing(request_id(given))
        # Not reset: each request runs in a task of its own (a copy of the server's context), and
        # Starlette's outermost error handler, which runs after this returns, names the id too.
        _CURRENT.set(timing)
        route = route_of(scope.get("path", ""))
        status, size, answered = 499, 0, None  # 499 (nginx's): no answer was sent, the client had gone

        async def observed(message) -> None:
            nonlocal status, size, answered
            if message["type"] == "http.response.start":
                answered = time.perf_counter() - start
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                values = (timing.request_id.encode(), _ms(timing.queue_s), _ms(timing.compute_s), _ms(answered))
                headers += [(name.lower().encode(), value) for name, value in zip(TIMING_HEADERS, values)]
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                size += len(message.get("body", b""))
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, observed)
        except BaseException:
            if answered is None:  # Starlette's outermost handler answers it: a 500
                status = 500
            raise
        finally:
            self.metrics.in_flight.dec()
            total = answered if answered is not None else time.perf_counter() - start
            method = scope.get("method", "")
            self.metrics.requests.labels(route, method if method in METHODS else "other", str(status)).inc()
            self.metrics.duration.labels(route).observe(total)
            if self.log is not None:
                self.log(access_line(self.log_format, at=wall, request_id=timing.request_id, method=method,
                                     path=_target(scope), status=status, size=size, timing=timing, total_s=total))
