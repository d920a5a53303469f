"""Fill strategies: which forward passes fill the masked bytes, and how.

A strategy takes a batched `run` function and the jobs (model inputs) of one or more
windows, and returns one `SpanFill` per span of every job:

    run([(ids, positions), ...]) -> [log_softmax over the vocabulary at positions, (M, V)]
    strategy(run, jobs, top_k) -> [[SpanFill per span of the job] per job]

`run` batches whatever it is given, so a strategy should hand it all the jobs of a step
at once. Strategies choose bytes only: the special ids 0-5 are never emitted.

Strategies:

- `oneshot`: every masked byte is the argmax of ONE pass (the reference's prediction);
- `iterative`: fill the most confident masked bytes, feed them back, re-predict the rest,
  until the span is full (at most `ITERATIVE_PASSES` passes, all windows batched);
- `beam`: the same search keeping `BEAM_WIDTH` whole-span hypotheses, each ranked by its
  own joint score (the sum of the log-probabilities of its bytes in the passes that chose
  them), which also gives the joint top-k candidates.

With `top_k` > 1, `iterative` and `beam` keep at least `top_k` hypotheses, so their
candidates are whole-span alternatives ranked by their joint score, never a product of
per-byte top-k lists.

Auto length (`[MASK]`) is decided before any strategy runs, by `choose_lengths`: a probe
pass proposes candidate lengths, one batched pass scores each, and the best
length-normalised score wins (its parameters were tuned on the validation split of the
small model's corpus, see QUALITY.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
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


@dataclass
class _Hypothesis:
    ids: list[int]  # the job's ids, committed bytes written in
    score: float  # sum of the chosen bytes' log-probabilities
    chosen: dict[int, tuple[float, torch.Tensor]]  # position -> (log-prob, (V,) row it was chosen from)


def search(run: Run, jobs: list[Job], top_k: int, *, width: int = 1, max_passes: int | None = None) -> list[list[SpanFill]]:
    """Iterative refinement, as a beam search over the masked bytes of each job.

    Every pass re-predicts the still-masked positions of every hypothesis (one batched
    `run` over all jobs). Each hypothesis then commits the `c` positions it is most
    confident about (highest best-byte log-probability), `c = ceil(masked / passes left)`:
    the most confident one is expanded with its `width` best bytes, the others take their
    best byte. The `width` best distinct hypotheses by score survive. `width=1` is plain
    iterative decoding; `max_passes=None` commits one byte per pass. With `width` > 1, a
    job of several spans gets one beam per span (`_search_per_span`).
    """
    width = max(width, top_k)
    if width > 1 and any(len(job.spans) > 1 for job in jobs):
        return _search_per_span(run, jobs, top_k, width, max_passes)
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
            byte_logp = logp[:, NUM_SPECIAL:]  # (m, 256): never a special id
            best, arg = byte_logp.max(-1)
            c = max(1, math.ceil(len(rest) / max(1, passes_left[j])))
            order = best.argsort(descending=True).tolist()
            base_ids, base_chosen, base_score = list(h.ids), dict(h.chosen), h.score
            for r in order[1:c]:  # greedy commits alongside the expanded position
                base_ids[rest[r]] = int(arg[r]) + NUM_SPECIAL
                base_chosen[rest[r]] = (float(best[r]), logp[r])
                base_score += float(best[r])
            r = order[0]
            values, indices = byte_logp[r].topk(min(width, byte_logp.shape[-1]))  # -k may exceed 256 bytes
            for v, b in zip(values.tolist(), indices.tolist()):
                ids = list(base_ids)
                ids[rest[r]] = b + NUM_SPECIAL
                grown.setdefault(j, []).append(_Hypothesis(ids, base_score + v, {**base_chosen, rest[r]: (v, logp[r])}))
        for j, hyps in grown.items():
            unique: dict[tuple[int, ...], _Hypothesis] = {}
            for h in sorted(hyps, key=lambda h: -h.score):
                unique.setdefault(tuple(h.ids), h)
            beams[j] = list(unique.values())[:width]
            passes_left[j] -= 1
    return [[_span_fill(beams[j], p, n, top_k) for p, n in job.spans] for j, job in enumerate(jobs)]


def _search_per_span(run: Run, jobs: list[Job], top_k: int, width: int, max_passes: int | None) -> list[list[SpanFill]]:
    """A beam per span: the job's other spans are first filled iteratively (width 1) and
    held fixed, so each span gets `width` distinct whole-span hypotheses of its own."""
    greedy = search(run, jobs, 1, width=1, max_passes=max_passes)
    units: list[tuple[int, int, Job]] = []
    for j, job in enumerate(jobs):
        for k, (start, n) in enumerate(job.spans):
            ids = list(job.ids)
            for other, ((p, m), fill) in enumerate(zip(job.spans, greedy[j])):
                if other != k:
                    ids[p : p + m] = [b + NUM_SPECIAL for b in fill.data]
            units.append((j, k, Job(ids, [(start, n)])))
    fills = search(run, [job for *_, job in units], top_k, width=width, max_passes=max_passes)
    out: list[list[SpanFill]] = [[] for _ in jobs]
    for (j, _, _), fill in zip(units, fills):
        out[j].append(fill[0])
    return out


def _span_fill(beam: list[_Hypothesis], start: int, n: int, top_k: int) -> SpanFill:
    """The span's distinct fills across the final hypotheses, best first by their own score."""
    options: dict[bytes, tuple[float, _Hypothesis]] = {}
    for h in beam:
        data = bytes(h.ids[p] - NUM_SPECIAL for p in range(start, start + n))
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


ITERATIVE_PASSES: int | None = 2  # most passes per span; None: one byte per pass (QUALITY.md)
BEAM_WIDTH = 4

STRATEGIES: dict[str, Callable[[Run, list[Job], int], list[list[SpanFill]]]] = {
    "oneshot": oneshot,
    "iterative": lambda run, jobs, top_k: search(run, jobs, top_k, width=1, max_passes=ITERATIVE_PASSES),
    "beam": lambda run, jobs, top_k: search(run, jobs, top_k, width=BEAM_WIDTH, max_passes=ITERATIVE_PASSES),
}
DEFAULT_STRATEGY = "iterative"  # chosen on the validation split, see QUALITY.md


@dataclass
class LengthRequest:
    """The spans of one text, for `choose_lengths`."""

    lengths: list[int | None]  # None: auto length
    space: list[bool]  # the span starts with an absorbed space
    make_jobs: Callable[[list[int]], list[Job]]  # the jobs of the text at the given lengths


# Auto length, tuned on the validation split only (scripts/eval_fill.py --tune, QUALITY.md).
LENGTH_ALPHA = 0.5  # score of a length L: (sum of best-byte log-probs) / L ** alpha
LENGTH_CANDIDATES: int | None = 3  # lengths scored per `[MASK]`, proposed by the probe; None: all
LENGTH_PRIOR = 0.5  # weight of the probe's log-probability that the word ends at L
LENGTH_REFINE: int | None = None  # score each candidate by an iterative fill of this many passes


def choose_lengths(
    run: Run, requests: list[LengthRequest], max_span: int, *,
    alpha: float | None = None, candidates: int | None | str = "default", prior: float | None = None,
    refine: int | None | str = "default",
) -> list[list[int]]:
    """Byte lengths of every span; each `[MASK]` span gets a scored length.

    1. Probe: one pass with `max_span` masked bytes per `[MASK]`. Its first word gives
       every auto span a provisional length, and its byte distributions give each length
       L the probability that the word ends there (no boundary byte before L, one at L);
       the `candidates` most probable lengths are kept (all lengths when None; with 0
       the provisional length stands, no scoring pass).
    2. Score: one pass per candidate length (all batched), the other auto spans at their
       provisional length; a length scores (sum of its best-byte log-probabilities) /
       L ** alpha + prior * log P(the probe's word ends at L), where an absorbed leading
       space counts in neither the sum nor L; the best score wins.
    """
    alpha = LENGTH_ALPHA if alpha is None else alpha
    prior = LENGTH_PRIOR if prior is None else prior
    refine = LENGTH_REFINE if refine == "default" else refine
    candidates = LENGTH_CANDIDATES if candidates == "default" else candidates
    lengths = [[n if n is not None else max_span for n in r.lengths] for r in requests]
    probing = [i for i, r in enumerate(requests) if None in r.lengths]
    proposals: dict[tuple[int, int], list[tuple[int, float]]] = {}
    jobs = [(i, job) for i in probing for job in requests[i].make_jobs(lengths[i])]
    for (i, job), logp in zip(jobs, run([(job.ids, job.positions()) for _, job in jobs])):
        for s, span_logp in zip(job.targets, _split(logp, job)):
            if requests[i].lengths[s] is None:
                space = requests[i].space[s]
                probe = bytes(span_logp[:, NUM_SPECIAL:].argmax(-1).tolist())
                lengths[i][s] = _first_word_length(probe, space)
                proposals[i, s] = _length_proposals(span_logp, space, candidates)
    scored = []  # (request, span, length, job)
    for (i, s), options in proposals.items():
        for n, p_end in options:
            trial = list(lengths[i])
            trial[s] = n
            job = next(job for job in requests[i].make_jobs(trial) if s in job.targets)
            scored.append((i, s, n, p_end, job))
    best: dict[tuple[int, int], tuple[float, int]] = {}
    if refine:  # each candidate filled iteratively; its bytes' log-probabilities score it
        fills = search(run, [job for *_, job in scored], 1, max_passes=refine)
        byte_lps = [torch.tensor(f[job.targets.index(s)].byte_logprobs) for (_, s, _, _, job), f in zip(scored, fills)]
    else:  # one pass: each byte's best log-probability
        logps = run([(job.ids, job.positions()) for *_, job in scored])
        byte_lps = [_split(logp, job)[job.targets.index(s)][:, NUM_SPECIAL:].max(-1).values
                    for (_, s, _, _, job), logp in zip(scored, logps)]
    for (i, s, n, p_end, job), lps in zip(scored, byte_lps):
        lead = 1 if requests[i].space[s] else 0  # the absorbed space is nearly free: not counted
        score = float(lps[lead:].sum()) / (n - lead) ** alpha
        score += prior * math.log(max(p_end, 1e-30))
        if (i, s) not in best or score > best[i, s][0]:
            best[i, s] = (score, n)
    for (i, s), (_, n) in best.items():
        lengths[i][s] = n
    return lengths


_BOUNDARY = torch.tensor([not (chr(b).isalnum() or b >= 128) for b in range(256)])


def _length_proposals(span_logp: torch.Tensor, space: bool, k: int | None) -> list[tuple[int, float]]:
    """(length, probability that the word ends there), most probable first, from a probe's
    (max_span, V) log-probabilities: no boundary byte before the length, one at it."""
    first = 2 if space else 1  # a span that took a space needs a byte after it
    n = span_logp.shape[0]
    if k == 0:  # no scoring: the probe's first word decides
        return []
    p = span_logp[:, NUM_SPECIAL:].exp()
    boundary = (p * _BOUNDARY).sum(-1) / p.sum(-1)  # (n,) P(byte j is not part of a word)
    inside = 1.0 - boundary
    scores = []
    for length in range(first, n + 1):
        word = inside[first - 1 : length].prod()  # bytes after the space are word bytes
        end = boundary[length] if length < n else torch.tensor(1.0)
        scores.append((length, float(word * end)))
    scores.sort(key=lambda t: -t[1])
    return scores if k is None else scores[:k]


def _first_word_length(probe: bytes, space: bool) -> int:
    start = 1 if space else 0
    while start < len(probe) and probe[start : start + 1] == b" ":  # a run of spaces is not a word
        start += 1
    end = start
    while end < len(probe) and probe[end : end + 1] not in (b" ", b"\n", b"\r", b"\t"):
        end += 1
    return max(1, end)
