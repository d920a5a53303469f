"""`perceiver serve`: the model behind HTTP, loaded once (Starlette on uvicorn).

    GET  /health    200 {"status": "ok"} (never needs the API key)
    GET  /info      the model, its revision and commit, device, dtype, parameters, version...
    POST /          the Hugging Face fill-mask task, as transformers' pipeline("fill-mask")
                    answers it for this model: {"inputs": str, "parameters": {"top_k": int,
                    "targets": [str]}} -> [{"score", "token", "token_str", "sequence"}, ...]
                    (a list of such lists when the text holds several mask tokens)
    POST /v1/fill   the library's own fill: {"text": str} or {"texts": [str, ...]}, with
                    "options" (FillOptions fields) -> the objects of `perceiver fill --json`

This module maps HTTP to the library and nothing else: the options and their rules are
`options.py`'s, the fill-mask task is `fillmask.py`'s, /v1/fill's bodies and the bound on
its answers `fillrequest.py`'s, the answers' format `results.py`'s, batching across
requests `batcher.py`'s (handed a compute function over the filler and a batching key:
fill-mask requests together, /v1/fill requests with equal options together), fills
`MaskFiller.fill_many`'s. What it adds: reading bodies within `--max-body-mb` and
`--body-timeout-s`, the API key, errors and signals. Answers are built and encoded in a
worker thread, a piece at a time (`results.encode`), so a large one never stalls the event loop.

Errors travel as exceptions to Starlette's exception handlers (`build_app`): every bad
request is a 4xx with a one-line JSON body {"error": "..."} (an option error also names its
"option" and "rule"), a runtime failure a 500, and the server lives on. A second SIGINT or
SIGTERM stops the running work and closes the connections (`run`). The library never
prints: `run` calls `announce` with the address once it listens.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import signal
import socket
from contextlib import asynccontextmanager
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import __version__, page
from .batcher import Batcher, Cancelled, QueueFull, TooMuchWork
from .budget import OverBudget
from .errors import InputError, PerceiverError
from .fillmask import HFJob, hf_answer, hf_job
from .fillrequest import check_answer_size, fill_job, result_json
from .observe import TIMING_HEADERS, Metrics, Observer, current
from .options import Budget, OptionError, ServeOptions
from .results import dumps, encode, encode_list

RETRY_AFTER_S = 1
DRAIN_LIMIT = 64 << 20  # bytes of an oversized body read (and dropped) so the 413 reaches the client


def json_response(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dumps(obj), status_code=status, headers=headers, media_type="application/json")


async def answer_response(build: Callable[[], bytes]) -> Response:
    """The JSON answer that `build()` builds and encodes, off the event loop."""
    return Response(await run_in_threadpool(build), media_type="application/json")


def error_response(status: int, message: str, headers: dict | None = None, **extra) -> Response:
    """`{"error": message, ...}`, naming the request's id (X-Request-ID) for a client to quote."""
    timing = current()
    ids = {"request_id": timing.request_id} if timing is not None else {}
    return json_response({"error": " ".join(str(message).split()), **extra, **ids}, status, headers)


async def read_json(request: Request, limit: int, timeout: float | None = None) -> Any:
    """The request body as JSON; 413 beyond `limit` bytes, 408 when it has not all come
    within `timeout` seconds, 400 for what is not JSON (as `HTTPException`s)."""
    declared = request.headers.get("content-length")
    too_big = declared is not None and declared.isdigit() and int(declared) > limit
    body = bytearray()

    async def read() -> None:
        nonlocal too_big
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                too_big = True
            if too_big:
                if seen > DRAIN_LIMIT:  # the 413 may not reach a client that goes on sending
                    break
                continue  # read and drop the rest, so the client can read the answer
            body.extend(chunk)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        if not too_big:
            raise HTTPException(408, f"the request body did not arrive within {timeout:g} s "
                                "(perceiver serve --body-timeout-s)", {"Connection": "close"}) from None
    if too_big:
        raise HTTPException(413, f"request body larger than the server's limit of {limit} bytes "
                            "(perceiver serve --max-body-mb)")
    if not body:
        raise HTTPException(400, "empty request body: send a JSON object")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise HTTPException(400, f"request body is not valid JSON: {e}") from None


def build_app(filler, options: ServeOptions, log: Callable[[str], None] | None = None,
              budget: Budget | None = None) -> Starlette:
    """The ASGI app serving `filler` (a loaded MaskFiller); `app.state.batcher` its batcher.
    `log(line)` takes the access log's lines (with `options.access_log`). `budget` is what
    one text may cost, estimated before any work (`perceiver serve --max-search`, ...; by
    default Budget's), its `max_inputs` always the server's `--max-inputs` (also counted per
    request) and its `max_answer_mb` also the bound on a whole /v1/fill answer."""
    budget = (budget or Budget()).replace(max_inputs=options.max_inputs)
    max_answer = budget.max_answer_mb << 20
    static_info = describe(filler, options, budget)
    metrics = Metrics(static_info, lambda: batcher.waiting)
    batcher = Batcher(_compute(filler, budget), key=lambda job: "fill-mask" if isinstance(job, HFJob) else job.options,
                      max_batch=options.max_batch, batch_wait=options.batch_wait_ms / 1000,
                      queue_size=options.queue_size, max_inputs=options.max_inputs, observe=_observer(metrics))
    window = filler.model.cfg.max_position_embeddings

    async def health(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def info(request: Request) -> Response:
        live = {"queue": {"waiting": batcher.waiting, "running": batcher.running, "batches": batcher.batches}}
        return json_response({**static_info, **live})

    async def fill_mask(request: Request) -> Response:
        job = hf_job(await read_json(request, options.max_body, options.body_timeout_s), window)
        answer = await batcher.submit(job, 1, lambda: _disconnected(request), tag=current())
        return await answer_response(lambda: encode(answer))

    async def fill(request: Request) -> Response:
        job = fill_job(await read_json(request, options.max_body, options.body_timeout_s))
        await run_in_threadpool(check_answer_size, job, max_answer)  # before any work (a large body takes a while)
        results = await batcher.submit(job, len(job.texts), lambda: _disconnected(request), tag=current())
        if job.single:
            if isinstance(results[0], Exception):
                raise results[0]
            return await answer_response(lambda: encode(result_json(results[0], job)))
        return await answer_response(lambda: encode_list(result_json(r, job) for r in results))

    async def prometheus(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=metrics.content_type)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/", fill_mask, methods=["POST"]),
        Route("/v1/fill", fill, methods=["POST"]),
        Route("/metrics", prometheus, methods=["GET"]),
        *page.routes(),  # GET / for browsers, its assets, /docs, /openapi.json
    ]

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        on_start = getattr(app.state, "on_start", None)
        if on_start is not None:  # uvicorn's signal handlers are in place by now
            on_start()
        try:
            yield
        finally:  # the requests in flight are answered by now: let the worker end (at once after `abort`)
            batcher.close()
            while not batcher.finished:
                await asyncio.sleep(0.05)

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=_error_handlers(options),
                    middleware=[Middleware(Observer, metrics=metrics, log=log if options.access_log else None,
                                           log_format=options.log_format),
                                *_cors(options.cors_origins), Middleware(_Guard, api_key=options.api_key)])
    app.router.redirect_slashes = False  # /info/ is a 404 like any unknown path, not a redirect
    app.state.batcher = batcher
    return app


def _compute(filler, budget: Budget) -> Callable[[list, Callable[[int], None]], list]:
    """The batcher's compute function over `filler`: the answers of jobs of one kind (all
    fill-mask, or all /v1/fill with equal options), `before_pass` on the filler's runner.
    Each text is held to `budget` (its `max_inputs` the server's), estimated before any work."""

    def compute(jobs: list, before_pass: Callable[[int], None]) -> list:
        filler.runner.before_pass = before_pass  # the batcher's worker alone uses the filler
        try:
            if isinstance(jobs[0], HFJob):
                logps = filler.logprobs([(job.ids, job.positions) for job in jobs])
                return [hf_answer(job, logp) for job, logp in zip(jobs, logps)]
            results = filler.fill_many([t for job in jobs for t in job.texts], jobs[0].options, return_errors=True,
                                       budget=budget)
            starts = [0]
            for job in jobs:
                starts.append(starts[-1] + len(job.texts))
            return [results[a:b] for a, b in zip(starts, starts[1:])]
        finally:
            filler.runner.before_pass = None

    return compute


def _error_handlers(options: ServeOptions) -> dict:
    """Starlette's exception handlers: every error a one-line JSON answer with its status."""

    async def http_error(request: Request, exc: HTTPException) -> Response:
        routes = [f"{m} {r.path}" for r in request.app.routes for m in sorted(getattr(r, "methods", None) or ()) if m != "HEAD"]
        message = {404: f"no such endpoint: {request.url.path} (the endpoints are {', '.join(routes)})",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return error_response(exc.status_code, message, exc.headers)

    async def queue_full(request: Request, exc: QueueFull) -> Response:
        return error_response(503, f"the server is busy: {options.queue_size} requests are waiting; retry later",
                              {"Retry-After": str(RETRY_AFTER_S)})

    async def too_much_work(request: Request, exc: TooMuchWork | OverBudget) -> Response:
        if isinstance(exc, OverBudget) and exc.limit != "max_inputs":
            return error_response(400, str(exc))  # a limit of the core's own budget: its message names it
        limit = exc.limit if isinstance(exc, TooMuchWork) else exc.allowed  # counted, or estimated before any work
        return error_response(400, f"the request needs more than {limit} model inputs, the server's limit "
                              "(perceiver serve --max-inputs): send fewer texts, or ask for less search "
                              "(a smaller top_k or beam_width, fewer iterative_passes)")

    async def option_error(request: Request, exc: OptionError) -> Response:
        return error_response(400, str(exc), option=exc.name, rule=exc.rule)

    def answer(code: int):  # the error's own message, with this status
        async def handler(request: Request, exc: Exception) -> Response:
            return error_response(code, str(exc))
        return handler

    async def internal_error(request: Request, exc: Exception) -> Response:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    return {
        HTTPException: http_error,
        QueueFull: queue_full,
        Cancelled: answer(503),
        TooMuchWork: too_much_work,
        OverBudget: too_much_work,
        OptionError: option_error,
        InputError: answer(400),
        PerceiverError: answer(500),
        Exception: internal_error,  # a bug: answered, then re-raised by Starlette for uvicorn to log
    }


def _observer(metrics: Metrics):
    """The batcher's report of each computation, for the metrics and its requests' timings."""

    def observe(items, inputs: int, started: float, seconds: float) -> None:
        metrics.computed([w.tag for w in items], [started - w.queued for w in items], sum(w.size for w in items),
                           inputs, seconds)

    return observe


def _cors(origins: tuple[str, ...]) -> list[Middleware]:
    """Starlette's CORS middleware for `--cors-origin`s (outside the API key's guard: a
    browser's preflight carries no key); none without origins."""
    if not origins:
        return []
    return [Middleware(CORSMiddleware, allow_origins=list(origins), allow_methods=["GET", "POST"],
                       allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                       expose_headers=list(TIMING_HEADERS), max_age=600)]


def warm_up(filler) -> None:
    """One forward pass, so that the first request costs what the others do (torch sets up
    its kernels and memory on the first pass)."""
    job = hf_job({"inputs": "warm [MASK] up"}, filler.model.cfg.max_position_embeddings)
    filler.logprobs([(job.ids, job.positions)])


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (its request body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Guard:
    """ASGI middleware: with an API key, every request needs `Authorization: Bearer <key>`
    (the key's UTF-8 bytes against the header's, in constant time), else 401; but GET
    /health and /metrics (what a supervisor and a Prometheus scraper ask, without a key of
    their own; neither holds a request's text), the page a browser loads, its assets and the
    API document (`page.is_open`)."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.digest = hashlib.sha256(api_key.encode("utf-8")).digest() if api_key else None

    async def __call__(self, scope, receive, send):
        if self.digest is not None and scope["type"] == "http" and not _open(scope):
            header = b""
            for name, value in scope.get("headers", ()):
                if name == b"authorization":
                    header = value
            scheme, _, token = header.partition(b" ")
            given = hashlib.sha256(token.strip()).digest()
            if not (hmac.compare_digest(given, self.digest) and scheme.lower() == b"bearer"):
                message = "missing API key: send Authorization: Bearer <key>" if not header else "wrong API key"
                response = error_response(401, message, {"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _open(scope) -> bool:
    return scope.get("path") in ("/health", "/metrics") or page.is_open(scope)


def describe(filler, options: ServeOptions, budget: Budget | None = None) -> dict:
    """What GET /info says about the model and the server (with `budget`: its work budget)."""
    resolved = filler.resolved
    load = filler.load_options
    if resolved is not None and resolved.repo_id is not None:
        model, revision, commit = resolved.repo_id, resolved.revision or "main", resolved.commit
    else:
        directory = getattr(resolved, "directory", None)
        model, revision, commit = (str(directory) if directory is not None else None), None, None
    cfg = filler.model.cfg
    return {
        "model": model,
        "revision": revision,
        "commit": commit,
        "device": str(filler.device),
        "dtype": filler.dtype,
        "mixed": filler.mixed,  # bfloat16 on the CPU: only the big products in bfloat16
        "quantize": getattr(load, "quantize", "none"),
        "parameters": filler.parameters,
        "version": __version__,
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "mask_token": "[MASK]",
        "batch_size": filler.runner.batch_size,
        "max_batch": options.max_batch,
        "batch_wait_ms": options.batch_wait_ms,
        "queue_size": options.queue_size,
        "max_inputs": options.max_inputs,
        "body_timeout_s": options.body_timeout_s,
        "max_body": options.max_body,
        "auth": options.api_key is not None,
        **({"budget": budget.to_dict()} if budget is not None else {}),
    }


# -- running ----------------------------------------------------------------------------


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one). `PerceiverError` when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"--host {host}: {e.strerror or e}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise PerceiverError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(filler, options: ServeOptions, *, announce: Callable[[str], None] | None = None,
        log: Callable[[str], None] | None = None, budget: Budget | None = None) -> None:
    """Serve `filler` in the foreground until SIGTERM or Ctrl-C: then stop accepting,
    answer the requests in flight, and return. Call from the main thread. One forward pass
    warms the model up before `announce`; `log` takes the access log's lines; `budget` is
    build_app's."""
    import uvicorn

    app = build_app(filler, options, log, budget)
    batcher = app.state.batcher
    sock = listen(options.host, options.port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=None, server_header=False)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            """The first SIGINT or SIGTERM stops gracefully. A second of either stops at
            once: the model work stops before its next forward pass and every connection
            is closed, so the graceful path ends without waiting (uvicorn's own forced exit,
            on a second SIGINT only, would skip the app's shutdown and log tracebacks)."""
            if not self.should_exit:
                super().handle_exit(sig, frame)
                return
            batcher.abort()
            for connection in list(self.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.close()

    server = Server(config)
    early: list[int] = []  # signals before uvicorn's handlers were in place

    def on_start() -> None:
        """Announced once uvicorn handles the signals, so a supervisor that stops the server
        as soon as it reads the line is heard; a signal that came before is acted on now."""
        if announce is not None:
            announce(url_of(sock))
        for sig in early:
            server.handle_exit(sig, None)

    app.state.on_start = on_start
    # Outside uvicorn's handlers a signal is recorded, not lost (nor the default: death); and
    # uvicorn re-raises the signal that stopped it once it has shut down: a no-op here, so a
    # graceful stop returns normally (exit 0).
    quiet = {sig: signal.signal(sig, lambda sig, _: early.append(sig)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        warm_up(filler)  # a signal meanwhile is recorded, and acted on once the server runs
        server.run(sockets=[sock])
    finally:
        for sig, handler in quiet.items():
            signal.signal(sig, handler)
        sock.close()


__all__ = ["build_app", "describe", "run"]
