"""Fill strategies: which forward passes fill the masked bytes, and how.

A strategy takes a batched `run` function and the jobs (model inputs) of one or more
windows, and returns one `SpanFill` per span of every job:

    run([(ids, positions), ...]) -> [log_softmax over the vocabulary at positions, (M, V)]
    strategy(run, jobs, top_k) -> [[SpanFill per span of the job] per job]

`run` batches whatever it is given, so a strategy should hand it all the jobs of a step
at once. Strategies choose bytes only: the special ids 0-5 are never emitted.

Auto length (`[MASK]`) is decided before any strategy runs, by `choose_lengths`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .tokenizer import NUM_SPECIAL

Run = Callable[[list[tuple[list[int], list[int]]]], list[torch.Tensor]]


@dataclass
class Job:
    """One model input: `ids` with the spans masked, and the spans it fills."""

    ids: list[int]
    spans: list[tuple[int, int]]  # (first position in ids, length) of each span to fill
    targets: list[int] = field(default_factory=list)  # the caller's index of each span

    def positions(self) -> list[int]:
        return [p + k for p, n in self.spans for k in range(n)]


@dataclass
class SpanFill:
    data: bytes  # the chosen bytes
    byte_logprobs: list[float]  # log-probability of each chosen byte in the pass that chose it
    logp: torch.Tensor  # (n, V) log-probabilities each byte was chosen from
    candidates: list[tuple[bytes, float]]  # whole-span alternatives, best first; [0] is `data`


def _split(logp: torch.Tensor, job: Job) -> list[torch.Tensor]:
    """Per-span slices of a job's (M, V) log-probabilities."""
    return list(torch.split(logp, [n for _, n in job.spans]))


def oneshot(run: Run, jobs: list[Job], top_k: int) -> list[list[SpanFill]]:
    """Every masked byte is the argmax over the 256 byte ids of one pass (the reference's prediction)."""
    out = []
    for job, logp in zip(jobs, run([(job.ids, job.positions()) for job in jobs])):
        fills = []
        for span_logp in _split(logp, job):
            best, chosen = span_logp[:, NUM_SPECIAL:].max(-1)
            fills.append(SpanFill(bytes(chosen.tolist()), best.tolist(), span_logp, independent_k_best(span_logp, top_k)))
        out.append(fills)
    return out


def independent_k_best(logp: torch.Tensor, k: int) -> list[tuple[bytes, float]]:
    """The k most probable whole spans when the bytes are independent (exact k-best of a sum)."""
    top = logp[:, NUM_SPECIAL:].topk(min(k, 256), dim=-1)
    beam: list[tuple[float, bytes]] = [(0.0, b"")]
    for values, indices in zip(top.values.tolist(), top.indices.tolist()):
        beam = sorted(((s + v, seq + bytes([b])) for s, seq in beam for v, b in zip(values, indices)), key=lambda t: -t[0])[:k]
    return [(seq, score) for score, seq in beam]


STRATEGIES: dict[str, Callable[[Run, list[Job], int], list[list[SpanFill]]]] = {"oneshot": oneshot}
DEFAULT_STRATEGY = "oneshot"


@dataclass
class LengthRequest:
    """The spans of one text, for `choose_lengths`."""

    lengths: list[int | None]  # None: auto length
    space: list[bool]  # the span starts with an absorbed space
    make_jobs: Callable[[list[int]], list[Job]]  # the jobs of the text at the given lengths


def choose_lengths(run: Run, requests: list[LengthRequest], max_span: int) -> list[list[int]]:
    """Byte lengths of every span; `[MASK]` spans get the first word of a probe fill.

    Provisional rule: fill `max_span` masked bytes in one pass and keep the leading space
    (when the marker absorbed one) plus the bytes up to the next whitespace.
    """
    lengths = [[n if n is not None else max_span for n in r.lengths] for r in requests]
    probing = [i for i, r in enumerate(requests) if None in r.lengths]
    jobs = [(i, job) for i in probing for job in requests[i].make_jobs(lengths[i])]
    for (i, job), logp in zip(jobs, run([(job.ids, job.positions()) for _, job in jobs])):
        for s, span_logp in zip(job.targets, _split(logp, job)):
            if requests[i].lengths[s] is None:
                probe = bytes(span_logp[:, NUM_SPECIAL:].argmax(-1).tolist())
                lengths[i][s] = _first_word_length(probe, requests[i].space[s])
    return lengths


def _first_word_length(probe: bytes, space: bool) -> int:
    start = 1 if space else 0
    while start < len(probe) and probe[start : start + 1] == b" ":  # a run of spaces is not a word
        start += 1
    end = start
    while end < len(probe) and probe[end : end + 1] not in (b" ", b"\n", b"\r", b"\t"):
        end += 1
    return max(1, end)
