"""The work budget: what a fill will cost, estimated from what it asks, before anything is built.

    from perceiver_cli.options import Budget
    filler.fill_many(texts, options, budget=Budget(max_inputs=2_000))  # or filler.budget = Budget(...)
    cost = estimate(masks.parse(text), options, filler.window)           # a Cost
    check(cost, Budget())                                                # raises OverBudget

`MaskFiller.fill` and `fill_many` check every text against their budget (`budget=` or
`filler.budget`, `Budget()` by default) before any window of it is built: a text over a
limit gets `OverBudget` (an `InputError`: exit 2 on the command line, a 400 from the
server, the line's error in batch mode), whose one-line message names the option to turn.
The texts of one call are then filled in groups whose estimated memory fits
`max_memory_mb` together, so a call of many texts is bounded as each text is.

What a text costs (`Cost`), each an upper bound computed in time of its number of spans
(`[MASK]` counted at `max_span` bytes, the most it may take):

- `inputs`: model inputs, a window in one pass: the auto-length probe and one input per
  scored length (lengths.py), then the strategy's passes (one per window for `oneshot`;
  up to `max(top_k, beam_width)` hypotheses per pass for the searches, strategies.py),
  or, with choices, a pass per choice (`sum`) or per byte of each choice (`pll`, `chain`)
  in each round (choices.py). On the full model each costs ~1 s of CPU.
- `search`: scores handled outside the passes: the rows the searches and the length
  scoring read, the k x k candidates of each byte of the k-best ranking, the length
  proposals (quadratic in `max_span` when `length_candidates` is None).
- `memory`: bytes held at the peak: the log-probability rows a strategy keeps (262
  float32 a masked byte and hypothesis, twice for a search: its pass and its kept rows),
  each masked byte's result, the inputs of one pass.
- `answer`: bytes of the text's JSON answer: the text, each masked byte, its alternatives
  with `explain`, `top_k` candidates, every choice.

Work is built lazily in passes of at most `CHUNK_INPUTS` inputs / `CHUNK_ROWS` rows where
the results of a pass are reduced at once (length scoring, choices), so what is held
stays near these estimates. This module imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import InputError
from .masks import Template
from .options import NO_FLAG, Budget, FillOptions, flag_of

__all__ = ["Budget", "Cost", "OverBudget", "estimate", "check", "as_flags", "CHUNK_INPUTS", "CHUNK_ROWS"]

VOCAB = 262  # ids a row of log-probabilities holds
ROW = VOCAB * 4  # bytes of one float32 row
RESULT = 700  # bytes of Python objects per masked byte of a result (its byte log-prob, alternatives)
INPUT = 3 * 8  # bytes per id of an input held during a pass (its job, its key, the batch)
EXPLAIN_TOP = 5  # alternatives per masked byte (filler.EXPLAIN_TOP)
CHUNK_INPUTS = 512  # inputs per pass of work whose results are reduced at once
CHUNK_ROWS = 65_536  # rows of log-probabilities per such pass (~68 MB)
MB = 1 << 20


class OverBudget(InputError):
    """A text whose estimated cost is over a limit of the `Budget`: `limit` is the field.
    Its message names fields (`(max_inputs)`, `top_k`), as a Python caller and the server's
    clients give them; `flag()` is the same message in the command line's flags."""

    def __init__(self, limit: str, needed: int, allowed: int, message: str, *, what: str = "", knob: str = ""):
        self.limit, self.needed, self.allowed = limit, needed, allowed
        self.what, self.knob = what, knob  # "{:,} model inputs", a key of KNOBS
        super().__init__(message)

    def flag(self) -> str:
        """`the fill would take about 40,531 model inputs, over the budget's 20,000
        (--max-inputs): ask for ... a smaller --max-span, or raise --max-inputs`; an option
        without a flag (length_candidates) is named as such."""
        if not self.what:
            return str(self)
        flagless: list[str] = []

        def shown(name: str) -> str:
            if name in NO_FLAG:
                flagless.append(name)
                return name
            return flag_of(name)

        hint = KNOBS[self.knob].format_map(_Names(shown))
        flag = flag_of(self.limit)
        note = f"; {', '.join(flagless)}: no command-line flag (Python's FillOptions and /v1/fill only)" if flagless else ""
        return (f"the fill would take about {self.what.format(self.needed)}, over the budget's {self.allowed:,} "
                f"({flag}): ask for {hint}, or raise {flag}{note}")


class _Names(dict):
    """`str.format_map` of a KNOBS text: each `{field}` as `shown(field)`."""

    def __init__(self, shown):
        super().__init__()
        self.shown = shown

    def __missing__(self, name: str) -> str:
        return self.shown(name)


@dataclass
class Cost:
    """A text's estimated cost, and for each measure the options that weigh most in it."""

    inputs: int = 0
    search: int = 0  # scores handled outside the passes
    memory: int = 0  # bytes
    answer: int = 0  # bytes
    parts: dict[str, dict[str, float]] = field(default_factory=dict, repr=False)  # measure -> part -> amount

    def add(self, measure: str, amount: float, part: str) -> None:
        setattr(self, measure, getattr(self, measure) + int(amount))
        weights = self.parts.setdefault(measure, {})
        weights[part] = weights.get(part, 0) + amount

    def why(self, measure: str) -> str:
        """The part of the work (a key of KNOBS) that weighs most in `measure`."""
        weights = self.parts.get(measure) or {"text": 0}
        return max(weights.items(), key=lambda kv: kv[1])[0]


KNOBS = {  # what to turn, by the part of the work that weighs most ({field}: an option, shown as a flag on the CLI)
    "windows": "fewer markers or a shorter text per request (split it)",
    "lengths": "fewer scored lengths ({length_candidates}) or a smaller {max_span}",
    "search": "a smaller {top_k} or {beam_width}, fewer {iterative_passes} (or {strategy} oneshot)",
    "k-best": "a smaller {top_k}",
    "choices": "fewer or shorter {choices} (or {choice_score} sum)",
    "explain": "{explain} off, or fewer masked bytes per text",
    "text": "fewer masked bytes per text (split it)",
}


def _groups(template: Template, lengths: list[int], window: int) -> list[list[int]]:
    """The spans of each window at these lengths (windows.Layout's grouping, without ids)."""
    groups: list[list[int]] = []
    starts, pos = [], 0
    for piece, n in zip(template.pieces, lengths):
        pos += len(piece)
        starts.append(pos)
        pos += n
    for s, n in enumerate(lengths):
        if groups and starts[s] + n - starts[groups[-1][0]] <= window:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def estimate(template: Template, options: FillOptions, window: int) -> Cost:
    """The cost of filling `template` with `options` on a model of this window (bytes)."""
    cost = Cost()
    text = sum(len(p) for p in template.pieces)
    cost.add("memory", text * 60, "text")  # the document's ids, its layouts
    cost.add("answer", text * 6, "text")  # the filled text, escaped at worst
    if options.choices:
        _choices(cost, template, options, window)
        return cost
    lengths = [s.length if s.length is not None else options.max_span for s in template.spans]
    groups = _groups(template, lengths, window)
    masked = [sum(lengths[s] for s in g) for g in groups]
    # auto length: the probe, then one input per scored length, reduced a pass at a time
    probe = [g for g in groups if any(template.spans[s].length is None for s in g)]
    cost.add("inputs", len(probe), "windows")
    scoring = 0  # rows of the scored inputs, held a chunk at a time
    for g, m in zip(groups, masked):
        for s in g:
            span = template.spans[s]
            if span.length is not None:
                continue
            first = 2 if span.space else 1
            total = max(0, options.max_span - first + 1)
            k = total if options.length_candidates is None else min(options.length_candidates, total)
            cost.add("inputs", k, "lengths")
            cost.add("search", k * options.max_span * 256 + (total * total // 2 if k else 0), "lengths")
            scoring += k * m
    cost.add("memory", min(scoring, CHUNK_ROWS) * ROW, "lengths")
    # the strategy
    rows_held = 0  # rows of one pass and of what the search keeps
    inputs_per_pass = 0
    if options.strategy == "oneshot":
        cost.add("inputs", len(groups), "windows")
        inputs_per_pass = len(groups)
        rows_held = sum(masked)
        for n in lengths:
            kb = min(options.top_k, 256)
            cost.add("search", n * 256 + (n * options.top_k * kb if options.top_k > 1 else 0), "k-best")
    else:
        width = max(options.top_k, options.beam_width if options.strategy == "beam" else 1)
        units = [m for m in masked]
        if width > 1 and any(len(g) > 1 for g in groups):  # a beam per span, after a greedy pass
            for m in masked:
                _search(cost, m, 1, options.iterative_passes, "windows")
            units = list(lengths)
        for m in units:
            _search(cost, m, width, options.iterative_passes, "search" if width > 1 else "windows")
        inputs_per_pass = len(units) * width
        rows_held = (2 if width > 1 else 1) * width * sum(units)  # a pass's rows, and the rows kept
    cost.add("memory", rows_held * ROW, "search" if rows_held > sum(masked) else "text")
    cost.add("memory", min(inputs_per_pass, CHUNK_INPUTS * 4) * (window + 2) * INPUT, "search")
    cost.add("memory", sum(masked) * (ROW + RESULT), "text")
    # the answer
    for n in lengths:
        cost.add("answer", 120 + 12 * n, "text")
        if options.explain:
            cost.add("answer", n * EXPLAIN_TOP * 40, "explain")
        if options.top_k > 1:
            cost.add("answer", options.top_k * (60 + 12 * n), "k-best")
    return cost


def _search(cost: Cost, n: int, width: int, max_passes: int | None, knob: str) -> None:
    """One job of n masked bytes searched with `width` hypotheses (strategies.search)."""
    passes = min(max_passes or n, n)
    inputs = 1 + (passes - 1) * width
    cost.add("inputs", inputs, knob)
    cost.add("search", inputs * n * 256 + passes * width * min(width, 256), knob)


def _choices(cost: Cost, template: Template, options: FillOptions, window: int) -> None:
    words = [len(c.encode("utf-8", "surrogateescape")) for c in options.choices]
    rounds = 1 if len(template.spans) == 1 else 4  # choices.MAX_ROUNDS
    per_byte = options.choice_score.removesuffix("-mean") != "sum"
    for span in template.spans:
        for w in words:
            n = w + span.space
            inputs = n if per_byte else 1
            cost.add("inputs", rounds * inputs, "choices")
            cost.add("search", rounds * n * VOCAB, "choices")
            cost.add("memory", n * 40, "choices")  # its byte log-probabilities
            cost.add("answer", 60 + 12 * n, "choices")
        cost.add("memory", (max(words) + 1) * (ROW + RESULT), "choices")  # the best one's rows
    cost.add("memory", CHUNK_INPUTS * (window + 2) * INPUT + CHUNK_ROWS * ROW, "choices")


def check(cost: Cost, budget: Budget) -> None:
    """Raise `OverBudget` when `cost` is over a limit of `budget`."""
    limits = [
        ("inputs", cost.inputs, budget.max_inputs, "max_inputs", "{:,} model inputs"),
        ("search", math.ceil(cost.search / 1e6), budget.max_search, "max_search", "{:,} million scores of search"),
        ("memory", math.ceil(cost.memory / MB), budget.max_memory_mb, "max_memory_mb", "{:,} MB of memory"),
        ("answer", math.ceil(cost.answer / MB), budget.max_answer_mb, "max_answer_mb", "a {:,} MB answer"),
    ]
    for measure, needed, allowed, name, what in limits:
        if needed > allowed:
            knob = cost.why(measure)
            hint = KNOBS[knob].format_map(_Names(str))
            raise OverBudget(name, needed, allowed,
                             f"the fill would take about {what.format(needed)}, over the budget's {allowed:,} "
                             f"({name}): ask for {hint}", what=what, knob=knob)


def as_flags(results: list) -> list:
    """`fill_many`'s results with each `OverBudget` worded in the command line's flags
    (`flag()`): the line errors `fill --batch` and `ray-fill` write."""
    return [OverBudget(r.limit, r.needed, r.allowed, r.flag()) if isinstance(r, OverBudget) else r for r in results]
