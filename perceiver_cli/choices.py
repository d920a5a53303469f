"""Choices: fill every span with the best of the words the caller gives (`--choice WORD`).

A byte-level model can score a candidate of any length, so choices may differ in length
from each other and from anything a marker says. Each span is scored with each choice
written in its place; the span's absorbed leading space (a marker right after a space
takes that space, as for `[MASK:N]`) is put before the choice: with `words are [MASK]`
and the choice `missing`, the span's bytes are ` missing`.

How a choice of n bytes (absorbed space included) is scored, `FillOptions.choice_score`:

- `sum`: ONE pass with the span masked (n bytes); the sum of the log-probabilities of the
  choice's bytes at their positions (each byte predicted without the others);
- `pll`: pseudo-log-likelihood, n passes: the choice written in, one byte masked at a
  time; the sum of each masked byte's log-probability;
- `chain`: left to right, n passes: pass k has the choice's first k bytes written in and
  the rest masked; the sum of the log-probability of byte k in pass k. This is a proper
  joint log-probability of the choice's bytes (the chain rule, left to right), so choices
  of different lengths compare on one scale;
- `-mean` variants divide the sum by the choice's byte count, its absorbed space not
  counted (length normalisation).

Log-probabilities are log_softmax over the full vocabulary, as everywhere else. Which rule
is the default was chosen on the validation split (scripts/eval_choices.py, QUALITY.md).
A span's numbers keep one meaning each (`ChoiceFill`): every choice carries the sum of its
bytes' log-probabilities in the rule's passes (its `logprob`, as any fill's) and, apart
from it, the rule's score that ranked it.

Other spans of the text: a text with several spans is scored in rounds. In the first,
the other spans stay masked, each at the length of the median choice (its absorbed space
added); in each later round, each span is scored again with the other spans holding their
choices of the round before. Rounds go on while a span of the text changes its choice, at
most `MAX_ROUNDS`: once settled, every span's ranking is its ranking with the other spans
holding their final choices. The passes of a round are batched through `run` a chunk at a
time (budget.CHUNK_INPUTS), and only the best choice's rows are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from .budget import CHUNK_INPUTS
from .masks import Span, Template
from .options import FillOptions
from .strategies import Check, Job, Run, SpanFill, _go_on
from .tokenizer import MASK, byte_id, byte_ids
from .windows import Layout

METHODS = ("sum", "pll", "chain")
MAX_ROUNDS = 4  # scoring rounds of a text with several spans (module docstring)


@dataclass
class Item:
    """One choice in one span: the window (`job`, the span masked at the choice's length)
    and where the span starts in it."""

    job: Job
    start: int  # position of the span's first byte in job.ids
    data: bytes  # the choice's bytes, absorbed space included
    lead: int  # 1 when the span absorbed a leading space (its first byte), else 0


@dataclass
class ChoiceFill(SpanFill):
    """A span filled with its best choice. `candidates` are every choice, best first, each
    with the sum of its bytes' log-probabilities in the rule's passes (`byte_logprobs` and
    `logp` are the best one's, from those passes); `scores[k]` is what ranked
    `candidates[k]`, under `rule`."""

    scores: list[float] = field(default_factory=list)
    rule: str = ""


def item_of(job: Job, target: int, data: bytes, lead: int) -> Item:
    start, n = job.spans[job.targets.index(target)]
    assert n == len(data)
    return Item(job, start, data, lead)


def _inputs(item: Item, method: str) -> list[tuple[list[int], list[int]]]:
    p, data = item.start, item.data
    n = len(data)
    if method == "sum":  # the job's ids have the span masked already
        return [(item.job.ids, list(range(p, p + n)))]
    out = []
    for k in range(n):
        ids = list(item.job.ids)
        if method == "pll":
            ids[p : p + n] = byte_ids(data)
            ids[p + k] = MASK
        else:  # chain
            ids[p : p + k] = byte_ids(data[:k])
            ids[p + k : p + n] = [MASK] * (n - k)
        out.append((ids, [p + k]))
    return out


def byte_scores(run: Run, items: list[Item], method: str) -> list[tuple[list[float], torch.Tensor]]:
    """For each item: the log-probability of each of its bytes under `method`, and the
    (n, V) log-probability rows they were read from."""
    return list(iter_byte_scores(run, items, method))


def iter_byte_scores(run: Run, items: Iterable[Item], method: str, *,
                     check: Check = _go_on) -> Iterator[tuple[list[float], torch.Tensor]]:
    """`byte_scores`, lazily: the inputs are built and run a chunk at a time (at least
    `CHUNK_INPUTS` inputs, whole items), and each item's answer is handed on at once."""
    if method not in METHODS:
        raise ValueError(f"unknown scoring method {method!r}")
    pending: list[tuple[Item, int]] = []
    inputs: list[tuple[list[int], list[int]]] = []

    def answers():
        logps, at = run(inputs), 0
        for item, n in pending:
            check()
            rows = torch.cat(logps[at : at + n])  # (n, V) in every method
            at += n
            values = [float(rows[k, byte_id(b)]) for k, b in enumerate(item.data)]
            yield values, rows

    for item in items:
        xs = _inputs(item, method)
        pending.append((item, len(xs)))
        inputs.extend(xs)
        if len(inputs) >= CHUNK_INPUTS:
            yield from answers()
            pending, inputs = [], []
    if pending:
        yield from answers()


def score(byte_logprobs: list[float], lead: int, rule: str) -> float:
    """The rule's score of a choice from its bytes' log-probabilities."""
    total = float(sum(byte_logprobs))
    if rule.endswith("-mean"):
        return total / max(1, len(byte_logprobs) - lead)
    return total


def fill_choices(run: Run, templates: list[Template], window: int, options: FillOptions, *,
                 check: Check = _go_on) -> list[list[ChoiceFill]]:
    """Every span of every template filled with its best choice under `options.choice_score`
    (`ChoiceFill`: all the choices, best first, each with its log-probability and score).
    Only the best choice's rows of log-probabilities are kept."""
    words = [c.encode("utf-8", "surrogateescape") for c in options.choices]
    rule = options.choice_score
    method = rule.removesuffix("-mean")
    typical = sorted(len(w) for w in words)[len(words) // 2]
    fills: list[list[ChoiceFill | None]] = [[None] * len(t.spans) for t in templates]
    chosen: dict[tuple[int, int], bytes] = {}
    again = set(range(len(templates)))  # texts to score (again) in this round
    for round_ in range(MAX_ROUNDS):
        keys: list[tuple[int, int]] = []
        items: list[Item] = []
        for i, t in enumerate(templates):
            if i not in again:
                continue
            if round_ == 0:
                layout = Layout(t, [typical + span.space for span in t.spans], window)
            for s, span in enumerate(t.spans):
                lead = b" " if span.space else b""
                if round_ > 0:
                    layout = Layout(_with_others(t, s, chosen, i), [typical + span.space], window)
                target = s if round_ == 0 else 0
                for w in words:
                    data = lead + w
                    keys.append((i, s))
                    items.append(item_of(layout.job_of(target, len(data)), target, data, len(lead)))
        if not items:
            break
        ranked: dict[tuple[int, int], list] = {}
        best_rows: dict[tuple[int, int], tuple[float, torch.Tensor]] = {}
        for key, item, (values, rows) in zip(keys, items, iter_byte_scores(run, items, method, check=check)):
            item_score = score(values, item.lead, rule)
            ranked.setdefault(key, []).append((item_score, item.data, values))
            if key not in best_rows or item_score > best_rows[key][0]:  # the first best, as the sort below
                best_rows[key] = (item_score, rows)
        again = set()
        for (i, s), entries in ranked.items():
            entries.sort(key=lambda e: -e[0])  # stable: equal scores keep the given order
            best_score, data, values = entries[0]
            rows = best_rows[i, s][1]
            if len(templates[i].spans) > 1 and (round_ == 0 or chosen[i, s] != data):
                again.add(i)  # the others' context changed: score this text's spans again
            chosen[i, s] = data
            fills[i][s] = ChoiceFill(data=data, byte_logprobs=values, logp=rows,
                                     candidates=[(d, float(sum(v))) for _, d, v in entries],
                                     scores=[sc for sc, _, _ in entries], rule=rule)
    return fills  # type: ignore[return-value]


def _with_others(t: Template, s: int, chosen: dict[tuple[int, int], bytes], i: int) -> Template:
    """The text with span `s` the only span, every other span holding its chosen bytes."""
    before = [t.pieces[0]]
    for k in range(s):
        before += [chosen[i, k], t.pieces[k + 1]]
    after = [t.pieces[s + 1]]
    for k in range(s + 1, len(t.spans)):
        after += [chosen[i, k], t.pieces[k + 1]]
    span: Span = t.spans[s]
    return Template((b"".join(before), b"".join(after)), (span,))
