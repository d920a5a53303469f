"""What a fill returns, and its one wire format: every record and request/response body of
`perceiver fill --json`, batch mode, ray-fill, the server and its client is built and
JSON-encoded here (`dumps`), with one policy for text that is not UTF-8.

    {"text": "<filled text>",
     "spans": [{"start": <char offset of the marker in the input>, "length": <bytes>,
                "fill": "<decoded text>", "bytes": [<ints 0-255>], "logprob": <float>,
                "candidates": [{"fill": ..., "bytes": [...], "logprob": ...}, ...],   # top_k > 1, choices
                # a --choice candidate adds "score": <float>, "score_rule": "<its choice_score>"
                "alternatives": [[{"byte": b, "logprob": lp}, ...] per masked byte]}]} # explain

Batch mode adds `"line": n` to each object; a line that fails is `{"line": n, "error":
"..."}` and a blank line `{"line": n, "text": "<the line>", "spans": []}` (`line_record`,
`error_record`, `blank_record`). `logprob` is the sum over the span's bytes of log_softmax
over the full 262-id vocabulary, taken at the chosen byte; JSON floats are rounded to 6
decimals. A fill is bytes; `fill` decodes them with errors="replace".

Every `logprob`, of a span or of a candidate, is that one thing: the sum of its bytes'
log-probabilities, whatever picked the fill; `candidates[0]` is the fill, with the span's
numbers. With choices (`--choice`), `candidates` is always there and holds every choice,
ranked by `score`, best first: each carries its `logprob` (the sum of its bytes'
log-probabilities in the passes of the choice rule) and, apart from it, the `score` that
ranked it and `score_rule`, the `choice_score` that made it (choices.py; with the default,
`sum-mean`: one pass with the whole span masked, the sum divided by its byte count, an
absorbed space not counted). Without choices a candidate has no `score` key.

One encoder, one surrogate policy (`dumps`): JSON as UTF-8 with non-ASCII characters kept,
and a lone surrogate (a text read with surrogateescape holds `\\udc80`-`\\udcff` for each
byte that is not UTF-8; an error message may quote one) written as its `\\uXXXX` escape,
so every record is valid UTF-8 JSON and reads back (json.loads, then
.encode("utf-8", "surrogateescape")) to the very bytes it was made from.

The exact wire format (`result_to_wire` / `result_from_wire`): a `FillResult` as JSON with
nothing lost, for the server's answers to its own client (`"detail": true`): the bytes
(filled document, the literal pieces, each fill and candidate) as base64, every float at
full precision (Python's float repr round-trips). The client rebuilds the very
`FillResult` the server computed and renders it with the same code as an in-process fill.

This module imports no torch and no other module of the package: results travel to places
(a server's client) that never load the model.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

ROUND = 6  # decimals of log-probabilities in JSON


def dumps(obj: Any) -> bytes:
    """`obj` as one line of UTF-8 JSON (no newline); lone surrogates as `\\uXXXX` escapes."""
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "backslashreplace")


def json_line(obj: Any) -> bytes:
    """`dumps(obj)` and a newline: one record of a JSON Lines file."""
    return dumps(obj) + b"\n"


def encode(obj: Any, depth: int = 4) -> bytes:
    """`dumps(obj)`, byte for byte, built a piece at a time down to `depth` levels of lists
    and objects: the encoder holds the GIL through each call, so short calls let the event
    loop answer other requests (GET /health) while a large answer is encoded."""
    if depth and isinstance(obj, list) and obj:
        return encode_list(obj, depth - 1)
    if depth and isinstance(obj, dict) and obj:
        return b"{" + b", ".join(dumps(k) + b": " + encode(v, depth - 1) for k, v in obj.items()) + b"}"
    return dumps(obj)


def encode_list(items: Iterable, depth: int = 3) -> bytes:
    """`encode` of the list of `items`, each encoded as it comes: a generator's items are
    built one at a time, so a large answer never holds all of its objects at once."""
    return b"[" + b", ".join(encode(x, depth) for x in items) + b"]"


@dataclass
class Candidate:
    """One whole-span alternative."""

    data: bytes
    logprob: float  # sum over its bytes of log_softmax over the full vocabulary
    score: float | None = None  # a --choice candidate: what ranked it, under `score_rule`
    score_rule: str | None = None  # the FillOptions.choice_score of `score`

    @property
    def fill(self) -> str:
        return self.data.decode("utf-8", "replace")

    def to_dict(self) -> dict:
        d: dict = {"fill": self.fill, "bytes": list(self.data), "logprob": round(self.logprob, ROUND)}
        if self.score is not None:
            d["score"], d["score_rule"] = round(self.score, ROUND), self.score_rule
        return d


@dataclass
class SpanResult:
    start: int  # character offset of the marker in the input
    length: int  # bytes
    data: bytes  # the chosen fill
    logprob: float
    byte_logprobs: list[float]  # log-probability of each chosen byte
    alternatives: list[list[tuple[int, float]]]  # per byte: the top bytes and their log-probabilities
    # (the filled byte is among them only when it is one of the top: a search or a choice
    # may fill a byte that is not the model's best at its position)
    candidates: list[Candidate] = field(default_factory=list)  # best first; [0] is the fill itself
    from_choices: bool = False  # the fill is the best of the caller's choices: candidates are all of them

    @property
    def fill(self) -> str:
        return self.data.decode("utf-8", "replace")

    def to_dict(self, top_k: int = 1, explain: bool = False) -> dict:
        """The span's JSON object: `candidates` when top_k > 1, `alternatives` with explain."""
        d: dict = {"start": self.start, "length": self.length, "fill": self.fill, "bytes": list(self.data),
                   "logprob": round(self.logprob, ROUND)}
        if self.from_choices:
            d["candidates"] = [c.to_dict() for c in self.candidates]
        elif top_k > 1:
            d["candidates"] = [c.to_dict() for c in self.candidates[:top_k]]
        if explain:
            d["alternatives"] = [[{"byte": b, "logprob": round(lp, ROUND)} for b, lp in alts] for alts in self.alternatives]
        return d


@dataclass
class FillResult:
    data: bytes  # the whole filled text, every byte outside the spans unchanged
    spans: list[SpanResult]
    pieces: tuple[bytes, ...] = ()  # the literal bytes around the spans (for rendering)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    def to_dict(self, top_k: int = 1, explain: bool = False) -> dict:
        """The JSON object of `perceiver fill --json` (see the module docstring)."""
        return {"text": self.text, "spans": [s.to_dict(top_k, explain) for s in self.spans]}


def line_record(n: int, result: FillResult, top_k: int = 1, explain: bool = False) -> dict:
    """Batch mode's object for input line `n` (1-based) that was filled."""
    return {"line": n, **result.to_dict(top_k, explain)}


def error_record(n: int, message: str) -> dict:
    """Batch mode's object for input line `n` that could not be filled."""
    return {"line": n, "error": message}


def blank_record(n: int, text: str) -> dict:
    """Batch mode's object for a blank input line: passed through, nothing to fill."""
    return {"line": n, "text": text, "spans": []}


def file_record(file: str, record: dict) -> dict:
    """ray-fill's object: batch mode's record for a line of `file`, with `"file"` first."""
    return {"file": file, **record}


# -- the exact wire format ------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _candidate_to_wire(c: Candidate) -> list:
    """`[data, logprob]`, and `score, score_rule` after them for a --choice candidate."""
    return [_b64(c.data), c.logprob] + ([] if c.score is None else [c.score, c.score_rule])


def _candidate_from_wire(c: list) -> Candidate:
    if len(c) not in (2, 4):
        raise ValueError(f"a candidate is [data, logprob] or [data, logprob, score, rule] (got {len(c)} items)")
    score = None if len(c) == 2 else (float(c[2]), str(c[3]))
    return Candidate(_unb64(c[0]), float(c[1]), *(score or ()))


def result_to_wire(result: FillResult) -> dict:
    """`result` as JSON-able data with every byte and every float exact."""
    return {
        "data": _b64(result.data),
        "pieces": [_b64(p) for p in result.pieces],
        "spans": [
            {
                "start": s.start,
                "length": s.length,
                "data": _b64(s.data),
                "logprob": s.logprob,
                "byte_logprobs": list(s.byte_logprobs),
                "alternatives": [[[b, lp] for b, lp in alts] for alts in s.alternatives],
                "candidates": [_candidate_to_wire(c) for c in s.candidates],
                "from_choices": s.from_choices,
            }
            for s in result.spans
        ],
    }


def result_from_wire(d: dict) -> FillResult:
    """The `FillResult` that `result_to_wire` was given (KeyError, TypeError or ValueError
    for data of another shape)."""
    spans = [
        SpanResult(
            start=s["start"],
            length=s["length"],
            data=_unb64(s["data"]),
            logprob=float(s["logprob"]),
            byte_logprobs=[float(x) for x in s["byte_logprobs"]],
            alternatives=[[(int(b), float(lp)) for b, lp in alts] for alts in s["alternatives"]],
            candidates=[_candidate_from_wire(c) for c in s["candidates"]],
            from_choices=bool(s.get("from_choices", False)),
        )
        for s in d["spans"]
    ]
    return FillResult(_unb64(d["data"]), spans, tuple(_unb64(p) for p in d["pieces"]))
