"""The server's own fill, `POST /v1/fill`, apart from HTTP: a request body checked into a
`FillJob`, the size of its answer estimated before any work, its answer built.

    job = fill_job({"texts": ["a [MASK:3] b"], "options": {"top_k": 2}})  # InputError/OptionError
    check_answer_size(job, limit)  # InputError when the answer would pass limit (Budget.max_answer_mb)
    results = filler.fill_many(job.texts, job.options, return_errors=True)
    [result_json(r, job) for r in results]   # the objects of `perceiver fill --json`

An answer is the objects of `fill --json` (results.py's `to_dict`), or with `"detail":
true` the exact wire format the CLI's client reads (`result_to_wire`); a text that cannot
be filled answers `{"error": "..."}` in its place. Answers are bounded like the fill-mask
task's (fillmask.py): `answer_bytes` estimates one from the texts, their spans, top_k,
explain, choices and detail, so a request whose answer would be too large is refused
before the model or the answer's objects take any memory. The limit is the work budget's
`max_answer_mb` (options.Budget: `perceiver serve --max-answer-mb`), which also bounds each
text's answer: one rule for the size of an answer, per text and per /v1/fill answer.

It imports no torch and nothing of HTTP or the server (`masks` reads the spans).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import masks
from .errors import InputError
from .fillmask import json_type
from .options import Budget, FillOptions
from .results import result_to_wire

MAX_FILL_ANSWER = Budget.max_answer_mb << 20  # bytes a /v1/fill answer may take by default, as `answer_bytes` estimates it


@dataclass
class FillJob:
    texts: list[str]
    options: FillOptions
    single: bool  # "text" (one object) rather than "texts" (a list)
    detail: bool  # the exact results (results.result_to_wire) instead of the JSON objects


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
            raise InputError(f'"text" must be a string (got {json_type(texts[0])})')
    else:
        texts, single = body["texts"], False
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise InputError('"texts" must be a list of strings')
    options = FillOptions.from_dict({} if body.get("options") is None else body["options"])
    detail = body.get("detail", False)
    if not isinstance(detail, bool):
        raise InputError(f'"detail" must be true or false (got {json_type(detail)})')
    return FillJob(texts, options, single, detail)


def answer_bytes(job: FillJob) -> int:
    """About how many bytes the answer to `job` takes (an upper bound for ordinary text),
    from its texts, their spans (a `[MASK]` at `max_span` bytes), top_k, explain, choices
    and detail, without filling anything."""
    options, total = job.options, 2
    for text in job.texts:
        try:
            template = masks.parse(text, options.mask_token)
        except InputError:
            total += 300  # its error message
            continue
        literal = sum(len(p) for p in template.pieces)
        if options.choices:  # every choice is a candidate of every span
            lengths = [1 + max(len(masks.to_bytes(c)) for c in options.choices)] * len(template.spans)
            candidates = len(options.choices)
        else:
            lengths = [s.length or options.max_span for s in template.spans]
            candidates = options.top_k if options.top_k > 1 else 0
        if job.detail:  # base64 of the text and its pieces; floats at full precision, alternatives always
            total += 100 + 3 * literal + sum(200 + 180 * n + candidates * (30 + 2 * n) for n in lengths)
        else:  # the text escaped at worst; per masked byte its fill and number, alternatives with explain
            per_byte = 17 + (200 if options.explain else 0)
            total += 20 + 6 * literal + sum(100 + per_byte * n + candidates * (45 + 11 * n) for n in lengths)
    return total


def check_answer_size(job: FillJob, limit: int = MAX_FILL_ANSWER) -> None:
    """`InputError` when the answer to `job` would take more than `limit` bytes (the
    server's: its budget's `max_answer_mb`)."""
    size = answer_bytes(job)
    if size > limit:
        raise InputError(f"the answer would take about {size >> 20} MiB, over the {limit >> 20} MiB a "
                         "/v1/fill answer may take (perceiver serve --max-answer-mb): send fewer texts (or fewer [MASK] per text), or ask for less "
                         "per span (a smaller top_k or max_span, explain off, fewer choices)")


def result_json(result, job: FillJob) -> dict:
    """The answer's object for one text's result (or its `InputError`)."""
    if isinstance(result, Exception):
        return {"error": str(result)}
    if job.detail:
        return result_to_wire(result)
    return result.to_dict(job.options.top_k, job.options.explain)


__all__ = ["FillJob", "fill_job", "answer_bytes", "check_answer_size", "result_json", "MAX_FILL_ANSWER"]
