"""`perceiver serve`: the model behind HTTP, loaded once (Starlette on uvicorn).

    GET  /health    200 {"status": "ok"} (never needs the API key)
    GET  /info      the model, its revision and commit, device, dtype, parameters, version...
    POST /          the Hugging Face fill-mask task, as transformers' pipeline("fill-mask")
                    answers it for this model: {"inputs": str, "parameters": {"top_k": int,
                    "targets": [str]}} -> [{"score", "token", "token_str", "sequence"}, ...]
                    (a list of such lists when the text holds several mask tokens)
    POST /v1/fill   the library's own fill: {"text": str} or {"texts": [str, ...]}, with
                    "options" (FillOptions fields) -> the objects of `perceiver fill --json`

Every bad request is a 4xx with a one-line JSON body {"error": "..."} and the server lives
on. This module is a thin map from HTTP to the library: the options and their rules are
`options.py`'s, fills are `MaskFiller.fill_many`'s, the fill-mask task's forward passes are
`MaskFiller.logprobs`'. What it adds is the HTTP surface and `Batcher`:

Batching across requests. Every request that needs the model becomes one `Work` item on
one bounded queue. A single worker thread owns the model: it takes the first waiting item,
then keeps taking items for at most `batch_wait` seconds or until `max_batch` texts are
gathered, and runs them together: all fill-mask items in one `logprobs` call, the /v1/fill
items with equal FillOptions in one `fill_many` call (which batches their windows into
forward passes of `batch_size`). While a batch runs, new requests wait in the queue, so
under load each batch takes everything that arrived meanwhile. A full queue answers 503
with Retry-After. Each text's computation is independent of the others in its batch
(padding is masked), so an answer equals the request's answer alone (fills identical,
log-probabilities within float noise). If a merged batch fails as a whole (a float16
overflow), its items are run again one by one, so only the request that caused it fails.
Each request may take at most `max_inputs` model inputs (counted before each forward
pass, `Batcher._check`; a batch of several requests that takes more is run again one
request at a time, so a request fails exactly when it needs more alone), and
`body_timeout_s` seconds to send its body. A client that hangs up marks its work as
gone: the worker skips it, or stops a batch whose clients have all gone before its next
forward pass; a second SIGINT or SIGTERM stops the running work the same way and closes
the connections (`run`).

The library never prints: `run` calls `announce` with the address once it listens.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import queue
import re
import signal
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import __version__, tokenizer
from .errors import InputError, PerceiverError
from .options import FillOptions, OptionError, ServeOptions
from .results import dumps, result_to_wire

RETRY_AFTER_S = 1
DRAIN_LIMIT = 64 << 20  # bytes of an oversized body read (and dropped) so the 413 reaches the client
HF_TOP_K = 5  # the fill-mask pipeline's default
MAX_HF_ANSWER = 8 << 20  # bytes a fill-mask answer may take (masks x top_k candidates, each the whole sequence)


# -- the Hugging Face fill-mask task ---------------------------------------------------
#
# transformers' PerceiverTokenizer turns the six special-token literals in a text into
# their ids (so "[MASK]" is ONE masked byte position) and every other character into its
# UTF-8 bytes (id = byte + 6); it wraps the ids as [CLS] ... [SEP]. Decoding joins the
# bytes of byte ids and the literals of special ids and decodes the whole with
# errors="replace". The pipeline scores every mask position with softmax over the whole
# vocabulary. What follows reproduces it (tests/test_serve.py compares with the pipeline).

SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[MASK]", "[CLS]", "[SEP]")  # ids 0..5
_SPECIAL_SPLIT = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_SPECIAL_BYTES = tuple(t.encode() for t in SPECIAL_TOKENS)


def hf_encode(text: str, special_tokens: bool = True) -> list[int]:
    """PerceiverTokenizer's ids for `text` (wrapped in [CLS] ... [SEP] unless
    special_tokens=False). Raises UnicodeEncodeError for a lone surrogate."""
    ids: list[int] = [tokenizer.CLS] if special_tokens else []
    pos = 0
    for m in _SPECIAL_SPLIT.finditer(text):
        ids += tokenizer.byte_ids(text[pos : m.start()].encode("utf-8"))
        ids.append(SPECIAL_TOKENS.index(m.group()))
        pos = m.end()
    ids += tokenizer.byte_ids(text[pos:].encode("utf-8"))
    if special_tokens:
        ids.append(tokenizer.SEP)
    return ids


def _token_bytes(token: int, skip_special: bool) -> bytes:
    data = tokenizer.decode([token])  # b"" for a special id
    return data if data or skip_special else _SPECIAL_BYTES[token]


def hf_decode(ids: list[int], skip_special: bool = False) -> str:
    """PerceiverTokenizer.decode(ids, skip_special_tokens=skip_special)."""
    return b"".join(_token_bytes(t, skip_special) for t in ids).decode("utf-8", "replace")


def hf_target_ids(targets: list[str]) -> list[int]:
    """The pipeline's `get_target_ids`: a one-character target in the vocabulary (chr(b)
    for a byte b, or a special literal) is that id; another is tokenized and its first id
    taken; an empty one is dropped. Then `list(set(...))`, in the pipeline's order."""
    ids = []
    for target in targets:
        if len(target) == 1 and ord(target) < 256:
            ids.append(tokenizer.byte_id(ord(target)))
        elif target in SPECIAL_TOKENS:
            ids.append(SPECIAL_TOKENS.index(target))
        else:
            try:
                first = hf_encode(target, special_tokens=False)[:1]
            except UnicodeEncodeError:
                raise InputError(f"target {target!r} is not valid Unicode text") from None
            ids += first
    ids = list(set(ids))
    if not ids:
        raise InputError("At least one target must be provided when passed.")
    return ids


@dataclass
class HFJob:
    """One fill-mask request, ready for the model: ids, mask positions and what to answer."""

    ids: list[int]
    positions: list[int]
    top_k: int
    targets: list[int] | None


def hf_job(body: Any, window: int) -> HFJob:
    """Check a fill-mask request body and tokenize it (`InputError` for a bad one)."""
    if not isinstance(body, dict):
        raise InputError('the request must be a JSON object: {"inputs": "text with [MASK]", "parameters": {...}}')
    unknown = sorted(set(body) - {"inputs", "parameters", "options"})
    if unknown:
        raise InputError(f"unknown field {unknown[0]!r}: the fields are inputs, parameters")
    if "inputs" not in body:
        raise InputError('missing field "inputs": the text with [MASK] tokens to fill')
    text = body["inputs"]
    if not isinstance(text, str):
        raise InputError(f'"inputs" must be a string (got {_type(text)})')
    params = {} if body.get("parameters") is None else body["parameters"]
    if not isinstance(params, dict):
        raise InputError(f'"parameters" must be an object (got {_type(params)})')
    unknown = sorted(k for k in params if k not in ("top_k", "targets"))
    if unknown:
        raise InputError(f"unknown parameter {unknown[0]!r}: the fill-mask parameters are top_k, targets")
    top_k = params.get("top_k")
    if top_k is None:
        top_k = HF_TOP_K
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise InputError(f'"top_k" must be a whole number (got {_type(top_k)})')
    if top_k < 1:
        raise InputError(f'"top_k" must be at least 1 (got {top_k})')
    targets = params.get("targets")
    if targets is not None:
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise InputError('"targets" must be a string or a list of strings')
        targets = hf_target_ids(targets)
    try:
        ids = hf_encode(text)
    except UnicodeEncodeError:
        raise InputError('"inputs" is not valid Unicode text (it holds a lone surrogate)') from None
    positions = [i for i, t in enumerate(ids) if t == tokenizer.MASK]
    if not positions:
        raise InputError("No mask_token ([MASK]) found on the input")
    if len(ids) > window:
        raise InputError(f'"inputs" is {len(ids)} tokens with [CLS] and [SEP]: the model takes at most {window}')
    # Each candidate repeats the whole sequence (other masks and specials spelt out): bound the answer.
    per_candidate = len(dumps(hf_decode(ids))) + 100
    candidates = len(positions) * min(top_k, len(targets) if targets is not None else 256 + tokenizer.NUM_SPECIAL)
    if candidates * per_candidate > MAX_HF_ANSWER:
        raise InputError(f"the answer would hold {candidates} candidates of about {per_candidate} bytes each, "
                         f"over the server's {MAX_HF_ANSWER >> 20} MiB a fill-mask answer may take: "
                         "ask for a smaller top_k, or fewer [MASK] tokens per request")
    return HFJob(ids, positions, top_k, targets)


def hf_answer(job: HFJob, logp) -> list:
    """The pipeline's answer from the log-probabilities (M, vocab) at the mask positions."""
    scores = logp if job.targets is None else logp[:, job.targets]
    k = min(job.top_k, scores.shape[-1])
    values, indices = scores.topk(k, dim=-1)
    probs = values.exp().tolist()
    single = len(job.positions) == 1
    # the tokens as the pipeline decodes them: [PAD] filtered out, specials kept (several masks) or skipped (one)
    parts = [_token_bytes(t, single) if t != tokenizer.PAD else b"" for t in job.ids]
    rows = []
    for i, pos in enumerate(job.positions):
        row = []
        for score, index in zip(probs[i], indices[i].tolist()):
            token = job.targets[index] if job.targets is not None else index
            parts_i = parts.copy()
            parts_i[pos] = _token_bytes(token, single) if token != tokenizer.PAD else b""
            row.append({
                "score": score,
                "token": token,
                "token_str": hf_decode([token]),
                "sequence": b"".join(parts_i).decode("utf-8", "replace"),
            })
        rows.append(row)
    return rows[0] if single else rows


# -- /v1/fill ---------------------------------------------------------------------------


@dataclass
class FillJob:
    texts: list[str]
    options: FillOptions
    single: bool  # "text" (one object) rather than "texts" (a list)
    detail: bool  # the exact results (client.result_to_wire) instead of the JSON objects


def fill_job(body: Any) -> FillJob:
    """Check a /v1/fill request body (`InputError`/`OptionError` for a bad one)."""
    if not isinstance(body, dict):
        raise InputError('the request must be a JSON object: {"text": "...", "options": {...}}')
    unknown = sorted(set(body) - {"text", "texts", "options", "detail"})
    if unknown:
        raise InputError(f"unknown field {unknown[0]!r}: the fields are text or texts, options, detail")
    if ("text" in body) == ("texts" in body):
        raise InputError('give either "text" (a string) or "texts" (a list of strings)')
    if "text" in body:
        texts, single = [body["text"]], True
        if not isinstance(texts[0], str):
            raise InputError(f'"text" must be a string (got {_type(texts[0])})')
    else:
        texts, single = body["texts"], False
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise InputError('"texts" must be a list of strings')
    options = FillOptions.from_dict({} if body.get("options") is None else body["options"])
    detail = body.get("detail", False)
    if not isinstance(detail, bool):
        raise InputError(f'"detail" must be true or false (got {_type(detail)})')
    return FillJob(texts, options, single, detail)


def _type(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


# -- batching ---------------------------------------------------------------------------


class QueueFull(Exception):
    pass


class Cancelled(PerceiverError):
    """Work stopped between forward passes: its clients have gone, or the server is stopping at once."""


class TooMuchWork(InputError):
    """A request that needs more model inputs than the server's `--max-inputs`."""


@dataclass
class Work:
    job: HFJob | FillJob
    size: int  # texts
    deliver: Callable[[Any, BaseException | None], None]
    gone: threading.Event = field(default_factory=threading.Event)  # its client hung up: nobody to answer


class Batcher:
    """One queue, one worker thread that owns the model (see the module docstring)."""

    def __init__(self, filler, *, max_batch: int, batch_wait: float, queue_size: int,
                 max_inputs: int = ServeOptions.max_inputs):
        self.filler = filler
        self.max_batch, self.batch_wait, self.max_inputs = max_batch, batch_wait, max_inputs
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.running = 0  # requests in the batch being computed
        self.batches = 0  # batches run (for /info)
        self.aborting = threading.Event()  # stop at once: the running batch at its next pass, nothing queued
        self.current: list[Work] = []  # the items being computed
        self.used = 0  # model inputs they have taken
        self.thread = threading.Thread(target=self._work, name="perceiver-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        """No more work: the worker finishes what is queued, then ends."""
        if self.thread.is_alive():
            self.queue.put(None)

    def abort(self) -> None:
        """Stop at once: the running batch stops before its next forward pass, queued work is dropped."""
        self.aborting.set()
        self.close()

    async def submit(self, job: HFJob | FillJob, size: int, gone: Callable[[], Awaitable] | None = None):
        """The job's answer, computed with whatever else is waiting. Raises `QueueFull`.
        When `gone()` finishes first (the client hung up), the work is marked as gone, so
        the worker skips it or stops it between forward passes, and `Cancelled` is raised."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def settle(value, error):
            if not future.done():  # the client may have gone away (cancelled)
                future.set_exception(error) if error is not None else future.set_result(value)

        def deliver(value, error=None):
            loop.call_soon_threadsafe(settle, value, error)

        work = Work(job, size, deliver)
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

    def _work(self) -> None:
        stop = False
        while not stop:
            first = self.queue.get()
            if first is None or self.aborting.is_set():
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
                    try:
                        w.deliver(None, e)
                    except Exception:  # noqa: BLE001 - e.g. the event loop is gone
                        pass
            finally:
                self.running = 0
                self.batches += 1

    def _run(self, batch: list[Work]) -> None:
        batch = [w for w in batch if not w.gone.is_set()]  # nobody waits for these
        hf = [w for w in batch if isinstance(w.job, HFJob)]
        groups: dict[FillOptions, list[Work]] = {}
        for w in batch:
            if isinstance(w.job, FillJob):
                groups.setdefault(w.job.options, []).append(w)
        for items in ([hf] if hf else []) + list(groups.values()):
            try:
                answers = self._compute(items)
            except Exception as e:
                if len(items) > 1:  # run alone, so only the item that fails fails
                    for w in items:
                        self._run_alone(w)
                else:
                    items[0].deliver(None, e)
                continue
            for w, answer in zip(items, answers):
                w.deliver(answer)

    def _run_alone(self, w: Work) -> None:
        try:
            answer = self._compute([w])[0]
        except Exception as e:
            w.deliver(None, e)
        else:
            w.deliver(answer)

    def _check(self, inputs: int) -> None:
        """Before each forward pass of the items being computed (the runner's `before_pass`):
        raises to stop the work there, `Cancelled` when its clients have all gone or the
        server stops at once, `TooMuchWork` over the budget of model inputs."""
        if self.aborting.is_set() or all(w.gone.is_set() for w in self.current):
            raise Cancelled("stopped: the client has gone, or the server is stopping")
        self.used += inputs
        if self.used > self.max_inputs:  # a batch of several requests: each is then run alone, with its own
            raise TooMuchWork(f"the request needs more than {self.max_inputs} model inputs, the server's limit "
                              "(perceiver serve --max-inputs): send fewer texts, or ask for less search "
                              "(a smaller top_k or beam_width, fewer iterative_passes)")

    def _compute(self, items: list[Work]) -> list:
        """The answers of items of one kind (all fill-mask, or all /v1/fill with equal options)."""
        self.current, self.used = items, 0
        self.filler.runner.before_pass = self._check  # the worker alone uses the filler
        try:
            return self._answers(items)
        finally:
            self.filler.runner.before_pass = None
            self.current = []

    def _answers(self, items: list[Work]) -> list:
        if isinstance(items[0].job, HFJob):
            logps = self.filler.logprobs([(w.job.ids, w.job.positions) for w in items])
            return [hf_answer(w.job, lp) for w, lp in zip(items, logps)]
        texts = [t for w in items for t in w.job.texts]
        results = self.filler.fill_many(texts, items[0].job.options, return_errors=True)
        answers, i = [], 0
        for w in items:
            answers.append(results[i : i + len(w.job.texts)])
            i += len(w.job.texts)
        return answers


# -- HTTP -------------------------------------------------------------------------------


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def json_response(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dumps(obj), status_code=status, headers=headers, media_type="application/json")


def error_response(status: int, message: str, headers: dict | None = None, **extra) -> Response:
    return json_response({"error": " ".join(str(message).split()), **extra}, status, headers)


async def read_json(request: Request, limit: int, timeout: float | None = None) -> Any:
    """The request body as JSON; 413 beyond `limit` bytes, 408 when it has not all come
    within `timeout` seconds, 400 for what is not JSON."""
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
            raise HTTPError(408, f"the request body did not arrive within {timeout:g} s "
                            "(perceiver serve --body-timeout-s)", {"Connection": "close"}) from None
    if too_big:
        raise HTTPError(413, f"request body larger than the server's limit of {limit} bytes "
                        "(perceiver serve --max-body-mb)")
    if not body:
        raise HTTPError(400, "empty request body: send a JSON object")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise HTTPError(400, f"request body is not valid JSON: {e}") from None


def build_app(filler, options: ServeOptions) -> Starlette:
    """The ASGI app serving `filler` (a loaded MaskFiller)."""
    batcher = Batcher(filler, max_batch=options.max_batch, batch_wait=options.batch_wait_ms / 1000,
                      queue_size=options.queue_size, max_inputs=options.max_inputs)
    window = filler.model.cfg.max_position_embeddings
    static_info = describe(filler, options)

    async def model_work(request: Request, job, size: int):
        try:
            return await batcher.submit(job, size, lambda: _disconnected(request))
        except QueueFull:
            raise HTTPError(503, f"the server is busy: {options.queue_size} requests are waiting; retry later",
                            {"Retry-After": str(RETRY_AFTER_S)}) from None

    async def health(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def info(request: Request) -> Response:
        live = {"queue": {"waiting": batcher.queue.qsize(), "running": batcher.running, "batches": batcher.batches}}
        return json_response({**static_info, **live})

    async def fill_mask(request: Request) -> Response:
        job = hf_job(await read_json(request, options.max_body, options.body_timeout_s), window)
        return json_response(await model_work(request, job, 1))

    async def fill(request: Request) -> Response:
        job = fill_job(await read_json(request, options.max_body, options.body_timeout_s))
        results = await model_work(request, job, len(job.texts))
        if job.single:
            if isinstance(results[0], Exception):
                raise results[0]
            return json_response(_result_json(results[0], job))
        return json_response([{"error": str(r)} if isinstance(r, Exception) else _result_json(r, job) for r in results])

    routes = [
        Route("/health", _guarded(health), methods=["GET"]),
        Route("/info", _guarded(info), methods=["GET"]),
        Route("/", _guarded(fill_mask), methods=["POST"]),
        Route("/v1/fill", _guarded(fill), methods=["POST"]),
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
            while batcher.thread.is_alive() and not batcher.aborting.is_set():
                await asyncio.sleep(0.05)

    async def http_exception(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no such endpoint: {request.url.path} (the endpoints are GET /health, GET /info, "
                        "POST /, POST /v1/fill)",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return error_response(exc.status_code, message, exc.headers)

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_exception})
    app.router.redirect_slashes = False  # /info/ is a 404 like any unknown path, not a redirect
    app.state.batcher = batcher
    return _Guard(app, options.api_key)  # type: ignore[return-value]


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (its request body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _result_json(result, job: FillJob) -> dict:
    if job.detail:
        return result_to_wire(result)
    return result.to_dict(job.options.top_k, job.options.explain)


def _guarded(endpoint):
    """Every error of an endpoint as a one-line JSON answer: HTTPError as it says, bad input
    400 (an option error names its field), a runtime failure or anything unexpected 500."""

    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except HTTPError as e:
            return error_response(e.status, e.message, e.headers)
        except Cancelled as e:
            return error_response(503, str(e))
        except OptionError as e:
            return error_response(400, str(e), option=e.name, rule=e.rule)
        except InputError as e:
            return error_response(400, str(e))
        except PerceiverError as e:
            return error_response(500, str(e))
        except Exception as e:  # noqa: BLE001 - the server lives on; the client gets one line
            return error_response(500, f"internal error: {type(e).__name__}: {e}")

    return wrapped


class _Guard:
    """ASGI middleware: with an API key, every request but GET /health needs
    `Authorization: Bearer <key>` (compared in constant time), else 401."""

    def __init__(self, app: Starlette, api_key: str | None):
        self.app = app
        self.state = app.state
        self.digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def __call__(self, scope, receive, send):
        if self.digest is not None and scope["type"] == "http" and scope.get("path") != "/health":
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


def describe(filler, options: ServeOptions) -> dict:
    """What GET /info says about the model and the server."""
    resolved = filler.resolved
    load = filler.load_options
    if resolved is not None and resolved.repo_id is not None:
        model, revision, commit = resolved.repo_id, resolved.revision or "main", resolved.commit
    else:
        directory = getattr(resolved, "directory", None)
        model, revision, commit = (str(directory) if directory is not None else None), None, None
    cfg = filler.model.cfg
    dtype = next(filler.model.parameters()).dtype
    return {
        "model": model,
        "revision": revision,
        "commit": commit,
        "device": str(filler.device),
        "dtype": str(dtype).removeprefix("torch."),
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


def run(filler, options: ServeOptions, *, announce: Callable[[str], None] | None = None) -> None:
    """Serve `filler` in the foreground until SIGTERM or Ctrl-C: then stop accepting,
    answer the requests in flight, and return. Call from the main thread."""
    import uvicorn

    app = build_app(filler, options)
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
        server.run(sockets=[sock])
    finally:
        for sig, handler in quiet.items():
            signal.signal(sig, handler)
        sock.close()


__all__ = ["ServeOptions", "build_app", "run", "hf_encode", "hf_decode", "hf_target_ids"]
