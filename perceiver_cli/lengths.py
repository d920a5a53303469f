"""Auto length: the byte length of each `[MASK]` span, chosen before any strategy runs.

1. Probe: one pass with `max_span` masked bytes per `[MASK]`. Its first word gives every
   auto span a provisional length, and its byte distributions give each length L the
   probability that the word ends there (no boundary byte before L, one at L); the
   `length_candidates` most probable lengths are kept (all lengths when None; with 0 the
   provisional length stands, no scoring pass).
2. Score: one pass per candidate length (batched, a chunk at a time), the other auto spans at their
   provisional length; a length scores (sum of its best-byte log-probabilities) /
   L ** length_alpha + length_prior * log P(the probe's word ends at L), where an absorbed
   leading space counts in neither the sum nor L; the best score wins.

The parameters are `FillOptions` fields, tuned on the validation split of the small
model's corpus only (scripts/eval_fill.py --tune, QUALITY.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .budget import CHUNK_INPUTS, CHUNK_ROWS
from .options import FillOptions
from .strategies import Check, Run, _go_on, _split, choosable, input_key

if TYPE_CHECKING:
    from .windows import Layout


@dataclass
class LengthRequest:
    """The spans of one text."""

    lengths: list[int | None]  # None: auto length
    space: list[bool]  # the span starts with an absorbed space
    layout: Callable[[list[int]], "Layout"]  # the text's windows at the given lengths


def choose_lengths(run: Run, requests: list[LengthRequest], options: FillOptions, *,
                   check: Check = _go_on) -> list[list[int]]:
    """Byte lengths of every span; each `[MASK]` span gets a scored length (module docstring).

    The scored inputs are built and run a chunk at a time (`CHUNK_INPUTS` inputs or
    `CHUNK_ROWS` rows), each reduced to its score at once: only the best length of each
    span is held. With a `run` that remembers inputs (`strategies.Reuse`), the inputs of
    lengths that lost are forgotten; the best ones and the provisional ones are kept, as
    the strategy's first pass may ask for them again."""
    lengths = [[n if n is not None else options.max_span for n in r.lengths] for r in requests]
    probing = [i for i, r in enumerate(requests) if None in r.lengths]
    proposals: dict[tuple[int, int], list[tuple[int, float]]] = {}
    jobs = [(i, job) for i in probing for job in requests[i].layout(lengths[i]).jobs()]
    for (i, job), logp in zip(jobs, run([(job.ids, job.positions()) for _, job in jobs])):
        check()
        for s, span_logp in zip(job.targets, _split(logp, job)):
            if requests[i].lengths[s] is None:
                space = requests[i].space[s]
                scores = choosable(span_logp, options)
                lengths[i][s] = _first_word_length(bytes(scores.argmax(-1).tolist()), space)
                proposals[i, s] = _length_proposals(scores, space, options.length_candidates)
    del jobs
    provisional = {i: requests[i].layout(lengths[i]) for i in {i for i, _ in proposals}}

    def scored():  # (request, span, length, P(word ends there), job), the others at their provisional length
        for (i, s), candidates in proposals.items():
            for n, p_end in candidates:
                yield i, s, n, p_end, provisional[i].job_of(s, n)

    forget = getattr(run, "forget", None)
    best: dict[tuple[int, int], tuple[float, int, bytes | None]] = {}  # (score, length, its input's key)
    for chunk in _chunks(scored()):
        logps = run([(job.ids, job.positions()) for *_, job in chunk])
        for (i, s, n, p_end, job), logp in zip(chunk, logps):
            check()
            lps = choosable(_split(logp, job)[job.targets.index(s)], options).max(-1).values  # each byte's best
            lead = 1 if requests[i].space[s] else 0  # the absorbed space is nearly free: not counted
            score = float(lps[lead:].sum()) / (n - lead) ** options.length_alpha
            score += options.length_prior * math.log(max(p_end, 1e-30))
            # the provisional input (n is the probe's length) is kept: other spans' candidates may ask for it
            key = input_key(job.ids, job.positions()) if forget is not None and n != lengths[i][s] else None
            loser = key
            if (i, s) not in best or score > best[i, s][0]:
                loser = best[i, s][2] if (i, s) in best else None
                best[i, s] = (score, n, key)
            if loser is not None:
                forget(loser)
    for (i, s), (_, n, _) in best.items():
        lengths[i][s] = n
    return lengths


def _chunks(items):
    """Lists of scored items of at most CHUNK_INPUTS inputs and about CHUNK_ROWS rows."""
    chunk, rows = [], 0
    for item in items:
        chunk.append(item)
        rows += len(item[-1].positions())
        if len(chunk) >= CHUNK_INPUTS or rows >= CHUNK_ROWS:
            yield chunk
            chunk, rows = [], 0
    if chunk:
        yield chunk


_BOUNDARY = torch.tensor([not (chr(b).isalnum() or b >= 128) for b in range(256)])


def _length_proposals(scores: torch.Tensor, space: bool, k: int | None) -> list[tuple[int, float]]:
    """(length, probability that the word ends there), most probable first, from a probe's
    (max_span, 256) byte log-probabilities: no boundary byte before the length, one at it."""
    first = 2 if space else 1  # a span that took a space needs a byte after it
    n = scores.shape[0]
    if k == 0:  # no scoring: the probe's first word decides
        return []
    p = scores.exp()
    boundary = (p * _BOUNDARY).sum(-1) / p.sum(-1)  # (n,) P(byte j is not part of a word)
    inside = 1.0 - boundary
    proposals = []
    for length in range(first, n + 1):
        word = inside[first - 1 : length].prod()  # bytes after the space are word bytes
        end = boundary[length] if length < n else torch.tensor(1.0)
        proposals.append((length, float(word * end)))
    proposals.sort(key=lambda t: -t[1])
    return proposals if k is None else proposals[:k]


def _first_word_length(probe: bytes, space: bool) -> int:
    start = 1 if space else 0
    while start < len(probe) and probe[start : start + 1] == b" ":  # a run of spaces is not a word
        start += 1
    end = start
    while end < len(probe) and probe[end : end + 1] not in (b" ", b"\n", b"\r", b"\t"):
        end += 1
    return max(1, end)
