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

Bounded work: a search keeps its hypotheses as arrays (`_Beam`: the bytes each has
chosen, their log-probabilities, and back-pointers to the rows they were chosen from),
never a copy of the window per hypothesis, and the k-best ranking of `oneshot` is a
vectorised beam over the bytes with back-pointers. Ties are broken as a stable sort of
the candidates in the order they are made. Every long loop calls `check()` (a strategy's
keyword; the filler passes its runner's stop check), which raises to stop the work.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from dataclasses import dataclass, field
from typing import Callable

import torch

from .options import FillOptions
from .tokenizer import NUM_SPECIAL, byte_ids, byte_logp

Run = Callable[[list[tuple[list[int], list[int]]]], list[torch.Tensor]]
Check = Callable[[], None]  # raises to stop the work (the client has gone, the server stops)


def _go_on() -> None:
    """The default `check`: never stops."""


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


def input_key(ids: list[int], positions: list[int]) -> bytes:
    """A 16-byte digest of one model input (ids < 262 and positions < 65536 fit 16 bits)."""
    raw = len(ids).to_bytes(4, "little") + array("H", ids).tobytes() + array("H", positions).tobytes()
    return hashlib.blake2b(raw, digest_size=16).digest()


class Reuse:
    """A `run` that answers an input it has already run from memory.

    `choose_lengths` scores each candidate length with one pass; the strategy's first
    pass at the chosen length is that same input, so sharing one `Reuse` between the two
    saves a pass per `[MASK]`. Inputs are remembered by a digest, not a copy; the length
    scoring `forget`s the inputs of lengths that lost, and once the lengths are chosen
    `remember` is turned off: the strategy's later passes are never asked again.
    """

    def __init__(self, run: Run):
        self.run = run
        self.remember = True  # keep what new inputs answer
        self.memory: dict[bytes, torch.Tensor] = {}

    def __call__(self, jobs: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
        keys = [input_key(ids, positions) for ids, positions in jobs]
        missing: dict[bytes, tuple[list[int], list[int]]] = {}
        for k, job in zip(keys, jobs):
            if k not in self.memory and k not in missing:
                missing[k] = job
        fresh = dict(zip(missing, self.run(list(missing.values())))) if missing else {}
        out = [fresh[k] if k in fresh else self.memory[k] for k in keys]
        if self.remember:
            self.memory.update(fresh)
        return out

    def forget(self, key: bytes) -> None:
        """Drop the answer of the input whose `input_key` this is."""
        self.memory.pop(key, None)


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


def oneshot(run: Run, jobs: list[Job], options: FillOptions, *, check: Check = _go_on) -> list[list[SpanFill]]:
    """Every masked byte is the argmax over the 256 byte ids of one pass (the reference's prediction)."""
    out = []
    for job, logp in zip(jobs, run([(job.ids, job.positions()) for job in jobs])):
        check()
        fills = []
        for span_logp in _split(logp, job):
            scores = choosable(span_logp, options)
            best, chosen = scores.max(-1)
            fills.append(SpanFill(bytes(chosen.tolist()), best.tolist(), span_logp,
                                  independent_k_best(scores, options.top_k, check=check)))
        out.append(fills)
    return out


def independent_k_best(scores: torch.Tensor, k: int, *, check: Check = _go_on) -> list[tuple[bytes, float]]:
    """The k most probable whole spans when the bytes are independent (exact k-best of a
    sum), from (n, 256) byte log-probabilities; never a -inf (forbidden) byte.

    A beam over the bytes: at byte t each of the k kept prefixes is extended by each of the
    byte's top bytes (float64 sums, as Python adds them), the k best kept in a stable
    order (ties: the earlier prefix, then the more probable byte), with back-pointers; the
    spans are read back at the end. O(n k log k) time, O(n k) memory."""
    top = scores.topk(min(k, scores.shape[-1]), dim=-1)
    if top.values.shape[-1] == 1:  # one byte each: no beam to keep
        values = top.values[:, 0].tolist()
        return [] if -math.inf in values else [(bytes(top.indices[:, 0].tolist()), sum(values))]
    values, indices = top.values.double(), top.indices
    width = values.shape[-1]
    # Prefixes and bytes both come sorted, best first, so the pair (i, j) has (i+1)(j+1)-1
    # pairs at least as good made before it: only pairs with (i+1)(j+1) <= k can be kept.
    pairs = [(i, j) for i in range(k) for j in range(width) if (i + 1) * (j + 1) <= k]
    pair_i = torch.tensor([i for i, _ in pairs])
    pair_j = torch.tensor([j for _, j in pairs])
    beam = torch.zeros(1, dtype=torch.float64)
    parents: list[torch.Tensor] = []
    chosen: list[torch.Tensor] = []
    for t in range(values.shape[0]):
        if t % 64 == 63:
            check()
        live = int(torch.searchsorted(pair_i, beam.numel()))  # the pairs of existing prefixes
        ii, jj = pair_i[:live], pair_j[:live]
        candidates = beam[ii] + values[t][jj]  # in the order they are made (prefix-major)
        order = torch.sort(candidates, descending=True, stable=True).indices[:k]
        order = order[candidates[order] > -math.inf]
        if order.numel() == 0:
            return []
        beam = candidates[order]
        parents.append(ii[order])
        chosen.append(indices[t][jj[order]])
    rows = torch.arange(beam.numel())
    out = torch.empty((beam.numel(), len(chosen)), dtype=torch.uint8)
    for t in range(len(chosen) - 1, -1, -1):
        out[:, t] = chosen[t][rows].to(torch.uint8)
        rows = parents[t][rows]
    return [(bytes(row), score) for row, score in zip(out.tolist(), beam.tolist())]


class _Beam:
    """A job's hypotheses as arrays over its masked positions (`job.positions()` order):
    the byte each has chosen (-1: still masked), its log-probability, and where its row of
    log-probabilities is (`store[src[h, i, 0]][src[h, i, 1]]`)."""

    def __init__(self, job: Job):
        self.positions = torch.tensor(job.positions(), dtype=torch.long)
        self.ids = torch.tensor(job.ids, dtype=torch.long)
        m = len(self.positions)
        self.data = torch.full((1, m), -1, dtype=torch.int16)
        self.lps = torch.zeros((1, m), dtype=torch.float64)
        self.src = torch.zeros((1, m, 2), dtype=torch.long)
        self.scores = [0.0]  # sum of the chosen bytes' log-probabilities, as Python adds them
        self.store: list[torch.Tensor | None] = []  # rows kept by the passes

    def open(self, h: int) -> torch.Tensor:
        """Indices (into positions) still masked in hypothesis h, in order."""
        return (self.data[h] < 0).nonzero().squeeze(1)

    def input(self, h: int, rest: torch.Tensor) -> tuple[list[int], list[int]]:
        ids = self.ids.clone()
        done = self.data[h] >= 0
        ids[self.positions[done]] = self.data[h][done].long() + NUM_SPECIAL
        return ids.tolist(), self.positions[rest].tolist()

    def collect(self) -> None:
        """Drop the kept rows no hypothesis points to."""
        used = torch.zeros(len(self.store), dtype=torch.bool)
        used[self.src[..., 0][self.data >= 0]] = True
        for i in (~used).nonzero().squeeze(1).tolist():
            self.store[i] = None


def search(run: Run, jobs: list[Job], options: FillOptions, *, width: int = 1, max_passes: int | None = None,
           check: Check = _go_on) -> list[list[SpanFill]]:
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
        return _search_per_span(run, jobs, options, width, max_passes, check)
    beams = [_Beam(job) for job in jobs]
    passes_left = [max_passes or len(job.positions()) for job in jobs]
    while True:
        work = [(j, h, beams[j].open(h)) for j in range(len(jobs)) for h in range(len(beams[j].scores))]
        work = [w for w in work if w[2].numel()]
        if not work:
            break
        check()
        logps = run([beams[j].input(h, rest) for j, h, rest in work])
        grown: dict[int, list[tuple[float, int, int, float]]] = {}  # job -> (score, work item, byte, its log-prob)
        bases: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
        for w, (j, h, rest) in enumerate(work):
            if w % 16 == 15:
                check()
            logp, logps[w] = logps[w], None  # held no longer than needed
            beam = beams[j]
            scores = choosable(logp, options)  # (m, 256): never a special id
            best, arg = scores.max(-1)
            c = max(1, math.ceil(len(rest) / max(1, passes_left[j])))
            order = best.argsort(descending=True)
            best_list = best.tolist()
            base_score = beam.scores[h]
            for r in order[1:c].tolist():  # greedy commits alongside the expanded position
                base_score += best_list[r]
            committed = order[:c]
            at = rest[committed]  # their indices into positions; at[0] is the expanded one
            last = c == len(rest)  # every row is kept: no copy
            beam.store.append(logp if last else logp[committed])  # the rows they were chosen from
            data, lps, src = beam.data[h].clone(), beam.lps[h].clone(), beam.src[h].clone()
            data[at[1:]] = arg[committed[1:]].to(torch.int16)
            lps[at[1:]] = best[committed[1:]].double()
            src[at, 0] = len(beam.store) - 1
            src[at, 1] = committed if last else torch.arange(c)
            bases.append((data, lps, src, int(at[0])))
            values, indices = scores[int(order[0])].topk(min(width, scores.shape[-1]))
            for v, b in zip(values.tolist(), indices.tolist()):
                if v == -math.inf:  # a forbidden byte (single_line)
                    continue
                grown.setdefault(j, []).append((base_score + v, w, b, v))
        for j, candidates in grown.items():
            check()
            seen: set[bytes] = set()
            kept: list[tuple[float, torch.Tensor, int, float]] = []
            for score, w, b, v in sorted(candidates, key=lambda t: -t[0]):
                data, _, _, a0 = bases[w]
                data = data.clone()
                data[a0] = b
                key = data.numpy().tobytes()
                if key in seen:
                    continue
                seen.add(key)
                kept.append((score, data, w, v))
                if len(kept) == width:
                    break
            beam = beams[j]
            lps = []
            for _, _, w, v in kept:
                row = bases[w][1].clone()
                row[bases[w][3]] = v
                lps.append(row)
            beam.data = torch.stack([d for _, d, _, _ in kept])
            beam.lps = torch.stack(lps)
            beam.src = torch.stack([bases[w][2] for _, _, w, _ in kept])
            beam.scores = [score for score, *_ in kept]
            beam.collect()
            passes_left[j] -= 1
    out = []
    for beam, job in zip(beams, jobs):
        fills, offset = [], 0
        for _, n in job.spans:
            fills.append(_span_fill(beam, offset, n, top_k))
            offset += n
        out.append(fills)
    return out


def _search_per_span(run: Run, jobs: list[Job], options: FillOptions, width: int, max_passes: int | None,
                     check: Check) -> list[list[SpanFill]]:
    """A beam per span: the job's other spans are first filled iteratively (width 1) and
    held fixed, so each span gets `width` distinct whole-span hypotheses of its own."""
    greedy = search(run, jobs, options.replace(top_k=1), width=1, max_passes=max_passes, check=check)
    units: list[tuple[int, int, Job]] = []
    for j, job in enumerate(jobs):
        for k, (start, n) in enumerate(job.spans):
            ids = list(job.ids)
            for other, ((p, m), fill) in enumerate(zip(job.spans, greedy[j])):
                if other != k:
                    ids[p : p + m] = byte_ids(fill.data)
            units.append((j, k, Job(ids, [(start, n)])))
    fills = search(run, [job for *_, job in units], options, width=width, max_passes=max_passes, check=check)
    out: list[list[SpanFill]] = [[] for _ in jobs]
    for (j, _, _), fill in zip(units, fills):
        out[j].append(fill[0])
    return out


def _span_fill(beam: _Beam, offset: int, n: int, top_k: int) -> SpanFill:
    """The span's distinct fills across the final hypotheses, best first by their own score."""
    options: dict[bytes, tuple[float, int]] = {}
    lps = beam.lps[:, offset : offset + n].tolist()
    for h, data in enumerate(beam.data[:, offset : offset + n].tolist()):
        data = bytes(data)
        score = sum(lps[h])
        if data not in options or score > options[data][0]:
            options[data] = (score, h)
    ranked = sorted(options.items(), key=lambda kv: -kv[1][0])
    data, (_, h) = ranked[0]
    rows = [beam.store[a][r] for a, r in beam.src[h, offset : offset + n].tolist()]  # type: ignore[index]
    return SpanFill(
        data=data,
        byte_logprobs=lps[h],
        logp=torch.stack(rows),
        candidates=[(d, score) for d, (score, _) in ranked[:top_k]],
    )


def iterative(run: Run, jobs: list[Job], options: FillOptions, *, check: Check = _go_on) -> list[list[SpanFill]]:
    return search(run, jobs, options, width=1, max_passes=options.iterative_passes, check=check)


def beam(run: Run, jobs: list[Job], options: FillOptions, *, check: Check = _go_on) -> list[list[SpanFill]]:
    return search(run, jobs, options, width=options.beam_width, max_passes=options.iterative_passes, check=check)


STRATEGIES: dict[str, Callable[..., list[list[SpanFill]]]] = {
    "oneshot": oneshot,
    "iterative": iterative,
    "beam": beam,
}
