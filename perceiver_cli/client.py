"""`perceiver fill --server URL`: fill through a running `perceiver serve`.

This module never imports torch (nor anything that does): a client process starts in a
fraction of the time a model-loading one takes. It speaks HTTP with the standard library
(`http.client`, one kept-alive connection) and reads the server's answers in the exact
wire format (`results.result_from_wire`): the client rebuilds the very `FillResult` the
server computed (every byte and float exact) and renders it with the same code as an
in-process fill, so plain output (raw bytes, invalid UTF-8 included), terminal colours and
`--json` come out the same.

What it owns, beyond HTTP:
- `check`: the server's `/info`, asked once, judges what a loaded model would judge
  (`FillOptions.check_window` against its window) and whether `--model`/`--revision`
  name what it serves; a fill then takes one more round trip.
- `fill_many` loses only what fails: a request refused for its size (413, or a 400 that
  names one of the server's limits) is split in halves and sent again, down to one text,
  whose refusal is then that text's error, as a line that fails in-process.
- Bounds: an answer is read up to `max_answer` bytes (a clear error beyond), a busy
  server's `Retry-After` is taken only as a plain number of seconds, and errors show the
  URL without the credentials it may hold.

Which server: `--server URL` or `$PERCEIVER_SERVER`; nothing else (no discovery of a local
server: a fill never goes to a server that was not named). The API key, if the server
wants one: `$PERCEIVER_API_KEY` (options.client_api_key), sent as UTF-8.

It imports only errors, options and results of the package.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import fields
from typing import Any
from urllib.parse import urlsplit

from .errors import InputError, PerceiverError
from .options import (API_KEY_ENV, SERVER_ENV, Budget, FillOptions, OptionError, ServeOptions,
                      client_api_key, model_window)
from .results import FillResult, dumps, result_from_wire

CONNECT_TIMEOUT_S = 10.0
BUSY_RETRY_S = 120.0  # how long a client keeps retrying a server that answers 503 (busy)
MAX_ANSWER = 256 << 20  # bytes of one answer the client reads at most
MAX_INFO = 1 << 20  # bytes of an /info answer
# What a 400 refusing a whole request for its size says (the server's limits, by flag or
# field name, and its advice to send fewer texts): a smaller request may pass.
LIMITS = tuple(name for cls in (ServeOptions, Budget) for f in fields(cls) if f.name.startswith("max_")
               for name in ("--" + f.name.replace("_", "-"), f"({f.name})")) + ("send fewer texts",)


class ServerError(PerceiverError):
    """The server could not be used (unreachable, refused the key, failed): exit 1."""


class AnswerTooLarge(ServerError):
    """An answer longer than the client reads."""


def shown(url: str) -> str:
    """`url` as errors show it: without the `user:password@` it may hold."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)?[^/?#@]*@", r"\1", url)


class Client:
    """A `perceiver serve` at `url`, used like a MaskFiller: `check(options)`, then
    `fill(text, options)` and `fill_many(texts, options, return_errors=True)`."""

    def __init__(self, url: str, api_key: str | None = None, *, max_answer: int = MAX_ANSWER):
        self.url = shown(url)  # what messages show
        try:
            parts = urlsplit(url if "://" in url else f"http://{url}")
        except ValueError as e:  # e.g. "http://[::1": an unclosed IPv6 address
            raise InputError(f"--server {self.url!r} is not a URL: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"--server {self.url!r} is not an http:// or https:// URL of a perceiver server")
        self.scheme, self.host, self.prefix = parts.scheme, parts.hostname, parts.path.rstrip("/")
        try:
            self.port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise InputError(f"--server {self.url!r} has a bad port") from None
        self.api_key = api_key
        self.max_answer = max_answer
        self.max_body: int | None = None  # the server's request limit, from /info
        self._conn = None

    @classmethod
    def from_environment(cls, url: str, environ=os.environ) -> "Client":
        """A client with $PERCEIVER_API_KEY, checked as the server checks it (blank: `OptionError`)."""
        return cls(url, client_api_key(environ))

    # -- HTTP --

    def _connection(self):
        import http.client

        if self._conn is None:
            if self.scheme == "https":
                self._conn = http.client.HTTPSConnection(self.host, self.port, timeout=CONNECT_TIMEOUT_S)
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=CONNECT_TIMEOUT_S)
            self._conn.connect()
            self._conn.sock.settimeout(None)  # a fill on a CPU may take minutes
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, body: dict | None = None, *, limit: int | None = None):
        """The decoded JSON answer of a 2xx; else the error `refusal` makes of it."""
        status, answer = self._call(method, path, None if body is None else dumps(body), limit)
        if 200 <= status < 300 and answer is not None:
            return answer
        raise self.refusal(status, answer)

    def _call(self, method: str, path: str, payload: bytes | None, limit: int | None = None) -> tuple[int, Any]:
        """(status, the decoded JSON answer or None). A busy server (503) is asked again
        after its Retry-After, for up to BUSY_RETRY_S."""
        headers: dict[str, Any] = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = b"Bearer " + self.api_key.encode("utf-8")  # bytes: http.client would send Latin-1
        give_up = time.monotonic() + BUSY_RETRY_S
        while True:
            status, wait, data = self._send(method, self.prefix + path, payload, headers, limit or self.max_answer)
            if status == 503 and time.monotonic() < give_up:
                time.sleep(wait)
                continue
            break
        try:
            return status, json.loads(data) if data else None
        except ValueError:
            return status, None

    def refusal(self, status: int, answer: Any) -> PerceiverError:
        """The error of an answer that is not a result: `InputError` for a 400/413 (the
        request was bad: exit 2; `OptionError` when it names the option), `ServerError`
        for anything else (exit 1)."""
        message = answer.get("error") if isinstance(answer, dict) else None
        if status in (400, 413) and isinstance(message, str):
            if isinstance(answer.get("option"), str) and isinstance(answer.get("rule"), str):
                return OptionError(answer["option"], answer["rule"])
            return InputError(message)
        if status == 401:
            hint = f"set {API_KEY_ENV}" if not self.api_key else f"check {API_KEY_ENV}"
            return ServerError(f"the server at {self.url} refused the request: {message or 'unauthorized'} ({hint})")
        if isinstance(message, str):
            return ServerError(f"the server at {self.url} answered {status}: {message}")
        return ServerError(f"the server at {self.url} answered {status} without a perceiver answer: is it `perceiver serve`?")

    def _send(self, method, path, payload, headers, limit: int) -> tuple[int, float, bytes]:
        import http.client

        for attempt in (1, 2):  # a kept-alive connection the server closed: once more, afresh
            fresh = self._conn is None
            try:
                conn = self._connection()
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
                data = _read_body(response, limit)
                if data is None:
                    self.close()  # the rest of that answer is never read
                    raise AnswerTooLarge(f"the server at {self.url} answered more than {limit:,} bytes, "
                                         "the most this client reads: ask for less at a time")
                if response.will_close:
                    self.close()
                return response.status, retry_after(response.getheader("Retry-After")), data
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                self.close()
                if fresh or attempt == 2 or isinstance(e, (TimeoutError, ConnectionRefusedError)):
                    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
                    raise ServerError(f"cannot reach the server at {self.url}: {reason}") from None
        raise AssertionError("unreachable")

    # -- the API --

    def info(self) -> dict:
        """The server's GET /info (a `ServerError` when it is not a perceiver server's)."""
        answer = self.request("GET", "/info", limit=MAX_INFO)
        if not isinstance(answer, dict):
            raise ServerError(f"the server at {self.url} answered /info with something that is not a perceiver "
                              "server's: is it `perceiver serve`?")
        return answer

    def check(self, options: FillOptions, *, model: str | None = None, revision: str | None = None,
              model_from: str = "--model") -> FillOptions:
        """Like `MaskFiller.check`, with the server's /info (one round trip): `options`
        against its model's window, and `model` / `revision`, when the user named them
        (`model_from`: `--model` or the environment variable), against what it serves.
        An /info that is not a perceiver server's leaves the options to the server's own
        checks, unless a model was named (then `ServerError`)."""
        status, info = self._call("GET", "/info", None, MAX_INFO)
        if status == 401:
            raise self.refusal(status, info)
        if not (200 <= status < 300 and isinstance(info, dict)):
            if model is None and revision is None:
                return options
            raise ServerError(f"the server at {self.url} does not say which model it serves (GET /info answered "
                              f"{status}): is it `perceiver serve`?")
        self._check_model(info, model, revision, model_from)
        positions, max_body = info.get("max_position_embeddings"), info.get("max_body")
        if _whole(max_body):
            self.max_body = max_body
        return options.check_window(model_window(positions)) if _whole(positions) else options

    def _check_model(self, info: dict, model: str | None, revision: str | None, model_from: str) -> None:
        served = info.get("model") if isinstance(info.get("model"), str) else None
        if model is not None and not same_model(model, served):
            given, drop = (f"--model {model}", "drop --model") if model_from == "--model" else (
                f"{model_from}={model}", f"unset {model_from}")
            raise InputError(f"{given} is not the model of the server at {self.url}, which serves {served}: "
                             f"{drop} (or --server), or start a server with that model")
        names = [v for v in (info.get("revision"), info.get("commit")) if isinstance(v, str)]
        commit = info.get("commit") if isinstance(info.get("commit"), str) else ""
        if revision is not None and revision not in names and not (
            commit and len(revision) >= 7 and commit.startswith(revision)
        ):
            held = info.get("revision") if isinstance(info.get("revision"), str) else "a local directory"
            raise InputError(f"--revision {revision} is not the revision of the server at {self.url} ({held}): "
                             "drop --revision, or start a server with it")

    def fill_many(self, texts: list[str], options: FillOptions | None = None, *,
                  return_errors: bool = False) -> list[FillResult | InputError]:
        """Like `MaskFiller.fill_many`, on the server: with `return_errors`, a text that
        cannot be filled gets its `InputError` in its place; otherwise the first is raised."""
        results = self._fill_texts(list(texts), (options or FillOptions()).to_dict()) if texts else []
        if not return_errors:
            for r in results:
                if isinstance(r, InputError):
                    raise r
        return results

    def _fill_texts(self, texts: list[str], options: dict) -> list[FillResult | InputError]:
        """The results of `texts` in order. A request refused for its size (413, over
        the server's `max_body`, a 400 naming one of its limits, an answer over
        `max_answer`) is split in halves and sent again; a text refused alone gets the
        refusal as its error."""
        payload = dumps({"texts": texts, "options": options, "detail": True})
        if len(texts) > 1 and self.max_body is not None and len(payload) > self.max_body:
            return self._split(texts, options)
        try:
            status, answer = self._call("POST", "/v1/fill", payload)
        except AnswerTooLarge as e:
            if len(texts) > 1:
                return self._split(texts, options)
            return [InputError(str(e))]
        if not (200 <= status < 300 and answer is not None):
            refused = self.refusal(status, answer)
            if not (status == 413 or type(refused) is InputError and any(name in str(refused) for name in LIMITS)):
                raise refused
            if len(texts) > 1:
                return self._split(texts, options)
            return [refused if isinstance(refused, InputError) else InputError(str(refused))]
        if not isinstance(answer, list) or len(answer) != len(texts):
            raise ServerError(f"the server at {self.url} answered {len(answer) if isinstance(answer, list) else 'no'} "
                              f"results for {len(texts)} texts")
        return [self._read(lambda a=a: InputError(a["error"]) if "error" in a else result_from_wire(a))
                for a in answer]

    def _split(self, texts: list[str], options: dict) -> list[FillResult | InputError]:
        half = len(texts) // 2
        return self._fill_texts(texts[:half], options) + self._fill_texts(texts[half:], options)

    def fill(self, text: str, options: FillOptions | None = None) -> FillResult:
        """Like `MaskFiller.fill`: raises `InputError` for a text that cannot be filled."""
        body = {"text": text, "options": (options or FillOptions()).to_dict(), "detail": True}
        answer = self.request("POST", "/v1/fill", body)
        return self._read(lambda: result_from_wire(answer))

    def _read(self, parse):
        """`parse()` of an answer; `ServerError` when it is not the shape this client knows."""
        try:
            return parse()
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            raise ServerError(f"the server at {self.url} answered something that is not a perceiver fill: "
                              "is it `perceiver serve`, of this version?") from None


def _read_body(response, limit: int) -> bytes | None:
    """The answer's body, or None when it is longer than `limit` bytes (then not read)."""
    length = response.getheader("Content-Length", "")
    if length.isascii() and length.isdigit() and int(length) > limit:
        return None
    data = response.read(limit + 1)  # http.client reads no more than a Content-Length says
    return None if len(data) > limit else data


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 2


def retry_after(value: str | None) -> float:
    """Seconds to wait before asking a busy server again: its `Retry-After` when that is a
    plain number of seconds, kept between 0.05 and 5; else 1 (an HTTP date, `²`, garbage)."""
    try:
        seconds = float(value) if value is not None and value.strip().isascii() else 1.0
    except ValueError:
        seconds = 1.0
    return min(max(seconds, 0.05), 5.0) if math.isfinite(seconds) else 1.0


def same_model(asked: str, served: str | None) -> bool:
    """Whether `--model asked` names the model a server reports: the same Hub repo id, or
    the same local directory (the server reports a directory by its absolute path)."""
    if served is None:
        return False
    if asked == served or asked.strip("/") == served:
        return True
    if os.path.isabs(served) and os.path.isdir(asked):
        return os.path.realpath(asked) == os.path.realpath(served)
    return False


def server_url(option: str | None, environ=os.environ) -> str | None:
    """The server to fill through: --server, else $PERCEIVER_SERVER, else None (in-process)."""
    if option is not None:
        return option.strip() or None
    return environ.get(SERVER_ENV, "").strip() or None
