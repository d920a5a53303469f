"""What a fill returns, and its one JSON format (`perceiver fill --json`, batch mode, the server).

    {"text": "<filled text>",
     "spans": [{"start": <char offset of the marker in the input>, "length": <bytes>,
                "fill": "<decoded text>", "bytes": [<ints 0-255>], "logprob": <float>,
                "candidates": [{"fill": ..., "bytes": [...], "logprob": ...}, ...],   # top_k > 1, choices
                "alternatives": [[{"byte": b, "logprob": lp}, ...] per masked byte]}]} # explain

Batch mode adds `"line": n` to each object; a line that fails is `{"line": n, "error":
"..."}` and a blank line `{"line": n, "text": "<the line>", "spans": []}` (`line_record`,
`error_record`, `blank_record`). `logprob` is the sum over the span's bytes of log_softmax
over the full 262-id vocabulary, taken at the chosen byte; JSON floats are rounded to 6
decimals. A fill is bytes; `fill` decodes them with errors="replace".

With choices (`--choice`), `candidates` is always there and holds every choice, best
first; a candidate's `logprob` is its score under `choice_score` (choices.py: with the
default, `sum-mean`, the mean over its bytes, an absorbed space not counted, of each
byte's log-probability in one pass with the whole span masked), and the span's `logprob` is the sum
of its `byte_logprobs` under that rule's passes.

This module imports no torch: results travel to places (a server's client) that never load
the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROUND = 6  # decimals of log-probabilities in JSON


@dataclass
class Candidate:
    """One whole-span alternative."""

    data: bytes
    logprob: float  # sum over its bytes of log_softmax over the full vocabulary

    @property
    def fill(self) -> str:
        return self.data.decode("utf-8", "replace")

    def to_dict(self) -> dict:
        return {"fill": self.fill, "bytes": list(self.data), "logprob": round(self.logprob, ROUND)}


@dataclass
class SpanResult:
    start: int  # character offset of the marker in the input
    length: int  # bytes
    data: bytes  # the chosen fill
    logprob: float
    byte_logprobs: list[float]  # log-probability of each chosen byte
    alternatives: list[list[tuple[int, float]]]  # per byte: the top bytes and their log-probabilities
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
