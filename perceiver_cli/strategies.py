"""Fill strategies: which forward passes fill the masked bytes, and how.

A strategy takes a batched `run` function and the jobs (model inputs) of one or more
windows, and returns one `SpanFill` per span of every job:

    run([(ids, positions), ...]) -> [log_softmax over the vocabulary at positions, (M, V)]
    strategy(run, jobs, options) -> [[SpanFill per span of the job] per job]

`run` batches whatever it is given, so a strategy should hand it all the jobs of a step
at once. Strategies choose bytes only: the special ids 0-5 are never emitted.

Strategies:

- `oneshot`: every masked byte is the argmax of ONE pass (the reference's prediction);
- `iterative`: fill the most confident masked bytes, feed them back, re-predict the rest,
  until the span is full (at most `iterative_passes` passes, all windows batched);
- `beam`: the same search keeping `beam_width` whole-span hypotheses, each ranked by its
  own joint score (the sum of the log-probabilities of its bytes in the passes that chose
  them), which also gives the joint top-k candidates.

With `top_k` > 1, `iterative` and `beam` keep at least `top_k` hypotheses, so their
candidates are whole-span alternatives ranked by their joint score, never a product of
per-byte top-k lists.

Auto length (`[MASK]`) is decided before any strategy runs, in `lengths.py`.

Every tuning knob (passes, beam width) is a field of `FillOptions`, passed down: nothing
here changes at run time. With `single_line`, line-break bytes are never chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .options import FillOptions
from .tokenizer import byte_id, byte_ids, byte_logp, decode

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


class Reuse:
    """A `run` that answers an input it has already run from memory.

    `choose_lengths` scores each candidate length with one pass; the strategy's first
    pass at the chosen length is that same input, so sharing one `Reuse` between the two
    saves a pass per `[MASK]`.
    """

    def __init__(self, run: Run):
        self.run = run
        self.memory: dict[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}

    def __call__(self, jobs: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
        keys = [(tuple(ids), tuple(positions)) for ids, positions in jobs]
        missing = list(dict.fromkeys(k for k in keys if k not in self.memory))
        if missing:
            for k, logp in zip(missing, self.run([(list(i), list(p)) for i, p in missing])):
                self.memory[k] = logp
        return [self.memory[k] for k in keys]


def _split(logp: torch.Tensor, job: Job) -> list[torch.Tensor]:
    """Per-span slices of a job's (M, V) log-probabilities."""
    return list(torch.split(logp, [n for _, n in job.spans]))


LINE_BREAKS = [ord("\n"), ord("\r")]


def choosable(logp: torch.Tensor, options: FillOptions) -> torch.Tensor:
    """(..., 256) log-probabilities of the bytes a fill may take: never a special id, and
    with `single_line` never a line break (-inf there)."""
    scores = byte_logp(logp)
    if options.single_line:
        scores = scores.clone()
        scores[..., LINE_BREAKS] = -math.inf
    return scores


def oneshot(run: Run, jobs: list[Job], options: FillOptions) -> list[list[SpanFill]]:
    """Every masked byte is the argmax over the 256 byte ids of one pass (the reference's prediction)."""
    out = []
    for job, logp in zip(jobs, run([(job.ids, job.positions()) for job in jobs])):
        fills = []
        for span_logp in _split(logp, job):
            scores = choosable(span_logp, options)
            best, chosen = scores.max(-1)
            fills.append(SpanFill(bytes(chosen.tolist()), best.tolist(), span_logp, independent_k_best(scores, options.top_k)))
        out.append(fills)
    return out


def independent_k_best(scores: torch.Tensor, k: int) -> list[tuple[bytes, float]]:
    """The k most probable whole spans when the bytes are independent (exact k-best of a
    sum), from (n, 256) byte log-probabilities; never a -inf (forbidden) byte."""
    top = scores.topk(min(k, scores.shape[-1]), dim=-1)
    beam: list[tuple[float, bytes]] = [(0.0, b"")]
    for values, indices in zip(top.values.tolist(), top.indices.tolist()):
        beam = sorted(((s + v, seq + bytes([b])) for s, seq in beam for v, b in zip(values, indices) if v > -math.inf),
                      key=lambda t: -t[0])[:k]
    return [(seq, score) for score, seq in beam]


@dataclass
class _Hypothesis:
    ids: list[int]  # the job's ids, committed bytes written in
    score: float  # sum of the chosen bytes' log-probabilities
    chosen: dict[int, tuple[float, torch.Tensor]]  # position -> (log-prob, (V,) row it was chosen from)


def search(run: Run, jobs: list[Job], options: FillOptions, *, width: int = 1, max_passes: int | None = None) -> list[list[SpanFill]]:
    """Iterative refinement, as a beam search over the masked bytes of each job.

    Every pass re-predicts the still-masked positions of every hypothesis (one batched
    `run` over all jobs). Each hypothesis then commits the `c` positions it is most
    confident about (highest best-byte log-probability), `c = ceil(masked / passes left)`:
    the most confident one is expanded with its `width` best bytes, the others take their
    best byte. The `width` best distinct hypotheses by score survive. `width=1` is plain
    iterative decoding; `max_passes=None` commits one byte per pass. With `width` > 1, a
    job of several spans gets one beam per span (`_search_per_span`).
    """
    top_k = options.top_k
    width = max(width, top_k)
    if width > 1 and any(len(job.spans) > 1 for job in jobs):
        return _search_per_span(run, jobs, options, width, max_passes)
    beams = [[_Hypothesis(list(job.ids), 0.0, {})] for job in jobs]
    passes_left = [max_passes or len(job.positions()) for job in jobs]
    todo = [job.positions() for job in jobs]
    while True:
        work = [(j, h, [p for p in todo[j] if p not in h.chosen]) for j in range(len(jobs)) for h in beams[j]]
        work = [w for w in work if w[2]]
        if not work:
            break
        logps = run([(h.ids, rest) for _, h, rest in work])
        grown: dict[int, list[_Hypothesis]] = {}
        for (j, h, rest), logp in zip(work, logps):
            scores = choosable(logp, options)  # (m, 256): never a special id
            best, arg = scores.max(-1)
            c = max(1, math.ceil(len(rest) / max(1, passes_left[j])))
            order = best.argsort(descending=True).tolist()
            base_ids, base_chosen, base_score = list(h.ids), dict(h.chosen), h.score
            for r in order[1:c]:  # greedy commits alongside the expanded position
                base_ids[rest[r]] = byte_id(int(arg[r]))
                base_chosen[rest[r]] = (float(best[r]), logp[r])
                base_score += float(best[r])
            r = order[0]
            values, indices = scores[r].topk(min(width, scores.shape[-1]))
            for v, b in zip(values.tolist(), indices.tolist()):
                if v == -math.inf:  # a forbidden byte (single_line)
                    continue
                ids = list(base_ids)
                ids[rest[r]] = byte_id(b)
                grown.setdefault(j, []).append(_Hypothesis(ids, base_score + v, {**base_chosen, rest[r]: (v, logp[r])}))
        for j, hyps in grown.items():
            unique: dict[tuple[int, ...], _Hypothesis] = {}
            for h in sorted(hyps, key=lambda h: -h.score):
                unique.setdefault(tuple(h.ids), h)
            beams[j] = list(unique.values())[:width]
            passes_left[j] -= 1
    return [[_span_fill(beams[j], p, n, top_k) for p, n in job.spans] for j, job in enumerate(jobs)]


def _search_per_span(run: Run, jobs: list[Job], options: FillOptions, width: int, max_passes: int | None) -> list[list[SpanFill]]:
    """A beam per span: the job's other spans are first filled iteratively (width 1) and
    held fixed, so each span gets `width` distinct whole-span hypotheses of its own."""
    greedy = search(run, jobs, options.replace(top_k=1), width=1, max_passes=max_passes)
    units: list[tuple[int, int, Job]] = []
    for j, job in enumerate(jobs):
        for k, (start, n) in enumerate(job.spans):
            ids = list(job.ids)
            for other, ((p, m), fill) in enumerate(zip(job.spans, greedy[j])):
                if other != k:
                    ids[p : p + m] = byte_ids(fill.data)
            units.append((j, k, Job(ids, [(start, n)])))
    fills = search(run, [job for *_, job in units], options, width=width, max_passes=max_passes)
    out: list[list[SpanFill]] = [[] for _ in jobs]
    for (j, _, _), fill in zip(units, fills):
        out[j].append(fill[0])
    return out


def _span_fill(beam: list[_Hypothesis], start: int, n: int, top_k: int) -> SpanFill:
    """The span's distinct fills across the final hypotheses, best first by their own score."""
    options: dict[bytes, tuple[float, _Hypothesis]] = {}
    for h in beam:
        data = decode(h.ids[start : start + n])
        score = sum(h.chosen[p][0] for p in range(start, start + n))
        if data not in options or score > options[data][0]:
            options[data] = (score, h)
    ranked = sorted(options.items(), key=lambda kv: -kv[1][0])
    data, (_, h) = ranked[0]
    positions = range(start, start + n)
    return SpanFill(
        data=data,
        byte_logprobs=[h.chosen[p][0] for p in positions],
        logp=torch.stack([h.chosen[p][1] for p in positions]),
        candidates=[(d, score) for d, (score, _) in ranked[:top_k]],
    )


def iterative(run: Run, jobs: list[Job], options: FillOptions) -> list[list[SpanFill]]:
    return search(run, jobs, options, width=1, max_passes=options.iterative_passes)


def beam(run: Run, jobs: list[Job], options: FillOptions) -> list[list[SpanFill]]:
    return search(run, jobs, options, width=options.beam_width, max_passes=options.iterative_passes)


STRATEGIES: dict[str, Callable[[Run, list[Job], FillOptions], list[list[SpanFill]]]] = {
    "oneshot": oneshot,
    "iterative": iterative,
    "beam": beam,
}
