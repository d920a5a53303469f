"""`perceiver fill --server URL`: fill through a running `perceiver serve`.

This module never imports torch (nor anything that does): a client process starts in a
fraction of the time a model-loading one takes. It speaks HTTP with the standard library
(`http.client`, one kept-alive connection) and holds both ends of the wire format the
server uses to send exact results:

`results.result_from_wire`: the client rebuilds the very `FillResult` the server computed
(every byte and float exact) and renders it with the same code as an in-process fill, so
plain output (raw bytes, invalid UTF-8 included), terminal colours (each byte's
log-probability) and `--json` (rounded from the same floats) come out the same.

Which server: `--server URL` or `$PERCEIVER_SERVER`; nothing else (no discovery of a local
server: a fill never goes to a server that was not named). The API key, if the server
wants one: `$PERCEIVER_API_KEY`.
"""

from __future__ import annotations

import json
import os
import time
from urllib.parse import urlsplit

from .errors import InputError, PerceiverError
from .options import API_KEY_ENV, SERVER_ENV, FillOptions, OptionError
from .results import FillResult, dumps, result_from_wire

CONNECT_TIMEOUT_S = 10.0
BUSY_RETRY_S = 120.0  # how long a client keeps retrying a server that answers 503 (busy)


# -- the client --------------------------------------------------------------------------


class ServerError(PerceiverError):
    """The server could not be used (unreachable, refused the key, failed): exit 1."""


class Client:
    """A `perceiver serve` at `url`, used like a MaskFiller: `fill_many(texts, options)`."""

    def __init__(self, url: str, api_key: str | None = None):
        try:
            parts = urlsplit(url if "://" in url else f"http://{url}")
        except ValueError as e:  # e.g. "http://[::1": an unclosed IPv6 address
            raise InputError(f"--server {url!r} is not a URL: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"--server {url!r} is not an http:// or https:// URL of a perceiver server")
        self.url = url
        self.scheme, self.host, self.prefix = parts.scheme, parts.hostname, parts.path.rstrip("/")
        try:
            self.port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise InputError(f"--server {url!r} has a bad port") from None
        self.api_key = api_key
        self._conn = None

    @classmethod
    def from_environment(cls, url: str, environ=os.environ) -> "Client":
        return cls(url, environ.get(API_KEY_ENV, "").strip() or None)

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

    def request(self, method: str, path: str, body: dict | None = None):
        """The decoded JSON answer of a 2xx; `InputError` for a 400/413 (the request was
        bad: exit 2), `ServerError` for anything else (exit 1). A busy server (503) is
        asked again after its Retry-After, for up to BUSY_RETRY_S."""
        payload = None if body is None else dumps(body)
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        give_up = time.monotonic() + BUSY_RETRY_S
        while True:
            status, retry_after, data = self._send(method, self.prefix + path, payload, headers)
            if status == 503 and time.monotonic() < give_up:
                time.sleep(min(max(retry_after, 0.05), 5.0))
                continue
            break
        try:
            answer = json.loads(data) if data else None
        except ValueError:
            answer = None
        if 200 <= status < 300 and answer is not None:
            return answer
        message = answer.get("error") if isinstance(answer, dict) else None
        if status in (400, 413) and isinstance(message, str):
            if isinstance(answer.get("option"), str) and isinstance(answer.get("rule"), str):
                raise OptionError(answer["option"], answer["rule"])
            raise InputError(message)
        if status == 401:
            hint = f"set {API_KEY_ENV}" if not self.api_key else f"check {API_KEY_ENV}"
            raise ServerError(f"the server at {self.url} refused the request: {message or 'unauthorized'} ({hint})")
        if isinstance(message, str):
            raise ServerError(f"the server at {self.url} answered {status}: {message}")
        raise ServerError(f"the server at {self.url} answered {status} without a perceiver answer: is it `perceiver serve`?")

    def _send(self, method, path, payload, headers) -> tuple[int, float, bytes]:
        import http.client

        for attempt in (1, 2):  # a kept-alive connection the server closed: once more, afresh
            fresh = self._conn is None
            try:
                conn = self._connection()
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
                data = response.read()
                retry = response.getheader("Retry-After", "1")
                if response.will_close:
                    self.close()
                return response.status, float(retry) if retry.replace(".", "", 1).isdigit() else 1.0, data
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                self.close()
                if fresh or attempt == 2 or isinstance(e, (TimeoutError, ConnectionRefusedError)):
                    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
                    raise ServerError(f"cannot reach the server at {self.url}: {reason}") from None
        raise AssertionError("unreachable")

    # -- the API --

    def info(self) -> dict:
        return self.request("GET", "/info")

    def check(self, options: FillOptions) -> FillOptions:
        """Like `MaskFiller.check`: the options, judged by the server's model (an
        `OptionError` for a --max-span beyond its window)."""
        self.request("POST", "/v1/fill", {"texts": [], "options": options.to_dict()})
        return options

    def fill_many(self, texts: list[str], options: FillOptions | None = None, *,
                  return_errors: bool = False) -> list[FillResult | InputError]:
        """Like `MaskFiller.fill_many`, on the server: with `return_errors`, a text that
        cannot be filled gets its `InputError` in its place; otherwise the first is raised."""
        if not texts:
            return []
        body = {"texts": list(texts), "options": (options or FillOptions()).to_dict(), "detail": True}
        answer = self.request("POST", "/v1/fill", body)
        if not isinstance(answer, list) or len(answer) != len(texts):
            raise ServerError(f"the server at {self.url} answered {len(answer) if isinstance(answer, list) else 'no'} "
                              f"results for {len(texts)} texts")
        results = [self._read(lambda a=a: InputError(a["error"]) if "error" in a else result_from_wire(a))
                   for a in answer]
        if not return_errors:
            for r in results:
                if isinstance(r, InputError):
                    raise r
        return results

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

    def check_model(self, model: str | None, revision: str | None) -> None:
        """`InputError` (exit 2) when `model` (or `revision`), as asked on the command line,
        is not what the server serves."""
        if model is None and revision is None:
            return
        info = self.info()
        served = info.get("model")
        if model is not None and not same_model(model, served):
            raise InputError(f"--model {model} is not the model of the server at {self.url}, which serves {served}: "
                             "drop --model (or --server), or start a server with that model")
        if revision is not None and revision not in (info.get("revision"), info.get("commit")) and not (
            info.get("commit") and len(revision) >= 7 and info["commit"].startswith(revision)
        ):
            shown = info.get("revision") or "a local directory"
            raise InputError(f"--revision {revision} is not the revision of the server at {self.url} ({shown}): "
                             "drop --revision, or start a server with it")


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
