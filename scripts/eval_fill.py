"""Measure fill strategies on held-out sentences: one masked word per sentence.

    python scripts/eval_fill.py --model tests/assets/perceiver-small \
        --cases tests/assets/eval/test.jsonl

Each case is a sentence of the test split (`scripts/build_corpus.py --cases-out`) with
one word masked, its leading space included in the span. Rows:

- every strategy at the TRUE length (`[MASK:N]`): exact-match rate of the span and the
  mean log-probability of the chosen fill (sum over its bytes);
- `[MASK]` (auto length) followed by a strategy: exact match and length accuracy;
- joint top-5 (`beam`, top_k 5) and per-byte independent top-5 (`oneshot`): recall@5;
- cost: forward passes per fill (one pass = one model input, whatever the batch) and
  seconds per fill (all cases batched, `--batch-size` inputs per pass, this machine).

`--tune` searches the auto-length parameters (FillOptions.length_candidates, _alpha, _prior) on
the given cases (use the VALIDATION cases, never the test cases) and prints the grid.
`--probe` reports how often the auto-length probe's most probable length, and its
`length_candidates` proposals (the default's), hold the true length, and the ceiling of
any rule that chooses among the proposals (how often the default fill at one of them is
exact).
`--bench-full` times one fill of one sentence on the full-size config (random weights,
2 threads): oneshot `[MASK:N]`, oneshot `[MASK]`, the defaults `[MASK:N]` and `[MASK]`, and
`[MASK]` with one more scored length than the default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from perceiver_cli.checkpoint import load_model
from perceiver_cli.filler import MaskFiller
from perceiver_cli.options import FillOptions


def load_cases(path: str, limit: int | None) -> list[dict]:
    cases = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return cases[:limit] if limit else cases


def text_of(case: dict, sized: bool) -> str:
    """The case with its word masked: `[MASK:N]` at the true length if `sized`, else `[MASK]`."""
    return text_at(case, len(case["answer"].encode()) if sized else None)


def text_at(case: dict, n: int | None) -> str:
    """The case with `[MASK:n]` (`[MASK]` for None) where its word is."""
    marker = "[MASK]" if n is None else f"[MASK:{n}]"
    return f"{case['prefix']} {marker}{case['suffix']}"  # the marker absorbs the space


class Counter:
    """Wraps the filler's runner: counts model inputs, optionally caches results."""

    def __init__(self, runner, cache: bool = False):
        self.runner, self.inputs, self.cache = runner, 0, {} if cache else None

    def __call__(self, jobs):
        if self.cache is None:
            self.inputs += len(jobs)
            return self.runner(jobs)
        keys = [(tuple(i), tuple(p)) for i, p in jobs]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        self.inputs += len(missing)
        for k, v in zip(missing, self.runner([(list(i), list(p)) for i, p in missing])):
            self.cache[k] = v
        return [self.cache[k] for k in keys]


def measure(filler: MaskFiller, cases, *, sized: bool, options: FillOptions) -> dict:
    counter = Counter(filler.runner)
    filler.runner = counter
    top_k = options.top_k
    try:
        t0 = time.perf_counter()
        results = filler.fill_many([text_of(c, sized) for c in cases], options)
        seconds = time.perf_counter() - t0
    finally:
        filler.runner = counter.runner
    exact = length = recall = 0
    logprob = 0.0
    for case, result in zip(cases, results):
        span = result.spans[0]
        answer = case["answer"].encode()
        exact += span.data == answer
        length += span.length == len(answer)
        recall += any(c.data == answer for c in span.candidates[:top_k])
        logprob += span.logprob
    n = len(cases)
    return {"exact": exact / n, "length": length / n, "recall": recall / n, "logprob": logprob / n,
            "passes": counter.inputs / n, "seconds": seconds / n}


def tune(filler: MaskFiller, cases) -> None:
    """Grid over the auto-length parameters (FillOptions' length_* fields) with the default
    strategy; passes are cached, so the grid is cheap."""
    counter = Counter(filler.runner, cache=True)
    filler.runner = counter
    texts = [text_of(c, False) for c in cases]
    print("| candidates | alpha | prior | length acc. | exact match |")
    print("|---|---|---|---|---|")
    grid = [(c, a, p) for c in (0, 1, 2, 3, 4, 6) for a in (0.5, 1.0, 1.5, 2.0) for p in (0.0, 0.5, 1.0, 2.0, 4.0)]
    for candidates, alpha, prior in grid:
        if candidates in (0, 1) and (alpha != 0.5 or prior):  # nothing to weigh: one row each
            continue
        options = FillOptions(length_candidates=candidates, length_alpha=alpha, length_prior=prior)
        results = filler.fill_many(texts, options)
        exact = sum(r.spans[0].data == c["answer"].encode() for r, c in zip(results, cases)) / len(cases)
        length = sum(r.spans[0].length == len(c["answer"].encode()) for r, c in zip(results, cases)) / len(cases)
        print(f"| {candidates} | {alpha} | {prior} | {length:.1%} | {exact:.1%} |", flush=True)
    filler.runner = counter.runner


def probe(filler: MaskFiller, cases) -> None:
    """How often the auto-length probe's most probable length (and its `length_candidates`
    proposals) hold the true length: one pass per case with `max_span` masked bytes, as
    `[MASK]` does; the proposals are `lengths._length_proposals` of that pass."""
    from perceiver_cli.lengths import _length_proposals
    from perceiver_cli.strategies import choosable

    options = FillOptions()
    seen: list[torch.Tensor] = []
    runner = filler.runner

    def recording(jobs):
        out = runner(jobs)
        seen.extend(out)
        return out

    filler.runner = recording
    try:
        filler.fill_many([text_at(c, options.max_span) for c in cases], FillOptions(strategy="oneshot"))
    finally:
        filler.runner = runner
    assert len(seen) == len(cases), "one window per case, the span its only masked bytes"
    k = options.length_candidates
    top1 = topk = 0
    proposed = []
    for case, logp in zip(cases, seen):
        lengths = [n for n, _ in _length_proposals(choosable(logp, options), True, k)]
        true = len(case["answer"].encode())
        top1 += lengths[0] == true
        topk += true in lengths
        proposed.append(lengths)
    n = len(cases)
    print(f"probe: most probable length right {top1 / n:.1%}, in the {k} proposals {topk / n:.1%}")
    # the ceiling of any rule that chooses among the proposals: the default strategy's fill
    # at some proposed length is the answer (a rule can do no better than that)
    answers = [c["answer"].encode() for c in cases]
    hit = [False] * n
    for rank in range(k):
        at = [(i, lengths[rank]) for i, lengths in enumerate(proposed) if rank < len(lengths)]
        for (i, _), result in zip(at, filler.fill_many([text_at(cases[i], m) for i, m in at], options)):
            hit[i] |= result.spans[0].data == answers[i]
    exact_true = measure(filler, cases, sized=True, options=options)["exact"]
    exact_auto = measure(filler, cases, sized=False, options=options)["exact"]
    print(f"defaults: true length {exact_true:.1%} exact; [MASK] {exact_auto:.1%}; the best choice among the "
          f"{k} proposals {sum(hit) / n:.1%} (= {sum(hit) / n / exact_true:.0%} of the true length)")


def bench_full(default: str) -> None:
    """Median of 5 interleaved runs (background load hits every row alike) of one fill of
    one sentence, full-size config, random weights, 2 threads; ratios to oneshot `[MASK:9]`."""
    from perceiver_cli.model import PerceiverConfig, PerceiverMaskedLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = PerceiverMaskedLM(PerceiverConfig())
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    filler = MaskFiller(model.eval().requires_grad_(False))
    text = "This is an incomplete sentence where some words are [MASK]."
    sized = text.replace("[MASK]", "[MASK:9]")
    more = FillOptions.length_candidates + 1
    rows = [("oneshot [MASK:9]", sized, {"strategy": "oneshot"}), ("oneshot [MASK]", text, {"strategy": "oneshot"}),
            (f"{default} [MASK:9]", sized, {}), (f"{default} [MASK] (defaults)", text, {}),
            (f"{default} [MASK], {more} scored lengths", text, {"length_candidates": more}),
            (f"{default} [MASK], the probe's length only", text, {"length_candidates": 0})]
    inputs, times = {}, {label: [] for label, *_ in rows}
    for label, t, changes in rows:  # warm-up, and the count of model inputs
        counter = Counter(filler.runner)
        filler.runner = counter
        filler.fill(t, **changes)
        filler.runner = counter.runner
        inputs[label] = counter.inputs
    for _ in range(5):
        for label, t, changes in rows:
            t0 = time.perf_counter()
            filler.fill(t, **changes)
            times[label].append(time.perf_counter() - t0)
    base = statistics.median(times[rows[0][0]])
    for label, *_ in rows:
        m = statistics.median(times[label])
        print(f"| {label} | {inputs[label]} | {m:.2f} | {m / base:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tests/assets/perceiver-small")
    ap.add_argument("--cases", default="tests/assets/eval/test.jsonl")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tune", action="store_true", help="grid-search the auto-length parameters (validation cases!)")
    ap.add_argument("--probe", action="store_true", help="how often the auto-length probe proposes the true length")
    ap.add_argument("--bench-full", action="store_true", help="time one fill on the full-size config")
    ap.add_argument("--only", default=None, help="semicolon-separated row labels to run")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if args.bench_full:
        print("| full-size config, one sentence | model inputs | seconds | vs oneshot `[MASK:9]` |\n|---|---|---|---|")
        bench_full(FillOptions.strategy)
        return
    filler = MaskFiller(load_model(args.model), batch_size=args.batch_size)
    cases = load_cases(args.cases, args.limit)
    if args.tune:
        tune(filler, cases)
        return
    if args.probe:
        probe(filler, cases)
        return

    full = {"iterative_passes": None}
    rows = [
        # label, strategy, sized (true length), top_k, parameters
        ("oneshot, true length", "oneshot", True, 1, {}),
        ("iterative 1 byte/pass, true length", "iterative", True, 1, full),
        ("iterative 2 passes, true length", "iterative", True, 1, {"iterative_passes": 2}),
        ("iterative 3 passes, true length", "iterative", True, 1, {"iterative_passes": 3}),
        ("iterative 4 passes, true length", "iterative", True, 1, {"iterative_passes": 4}),
        (f"beam {FillOptions.beam_width}, 1 byte/pass, true length", "beam", True, 1, full),
        (f"beam {FillOptions.beam_width}, 2 passes, true length", "beam", True, 1, {"iterative_passes": 2}),
        (f"beam {FillOptions.beam_width}, 3 passes, true length", "beam", True, 1, {"iterative_passes": 3}),
        ("[MASK] probe rule + oneshot", "oneshot", False, 1, {"length_candidates": 0}),
        ("[MASK] auto + oneshot", "oneshot", False, 1, {}),
        ("[MASK] auto + iterative 1 byte/pass", "iterative", False, 1, full),
        ("[MASK] auto + iterative 3 passes", "iterative", False, 1, {"iterative_passes": 3}),
        (f"[MASK] auto + beam {FillOptions.beam_width}", "beam", False, 1, full),
        (f"[MASK] auto + beam {FillOptions.beam_width}, 3 passes", "beam", False, 1, {"iterative_passes": 3}),
        ("[MASK] defaults", FillOptions.strategy, False, 1, {}),
        ("top-5 independent per byte (oneshot), true length", "oneshot", True, 5, {}),
        ("top-5 joint (beam 5, 1 byte/pass), true length", "beam", True, 5, full),
        ("top-5 joint (beam 5, 3 passes), true length", "beam", True, 5, {"iterative_passes": 3}),
    ]
    only = set(args.only.split(";")) if args.only else None
    print(f"{len(cases)} cases from {args.cases}, model {args.model}")
    print("| strategy | exact match | length acc. | recall@k | mean logprob | passes/fill | ms/fill |")
    print("|---|---|---|---|---|---|---|")
    exact = {}
    for label, strategy, sized, top_k, params in rows:
        if only and label not in only:
            continue
        m = measure(filler, cases, sized=sized, options=FillOptions(strategy=strategy, top_k=top_k, **params))
        exact[label] = m["exact"]
        recall = f"{m['recall']:.1%}" if top_k > 1 else ""
        length = "" if sized else f"{m['length']:.1%}"
        print(f"| {label} | {m['exact']:.1%} | {length} | {recall} | {m['logprob']:.2f} | {m['passes']:.1f} | "
              f"{m['seconds'] * 1000:.1f} |", flush=True)
    # the targets: the default vs oneshot at the true length, and auto length vs the default at the true length
    true_default = f"iterative {FillOptions.iterative_passes} passes, true length"
    if FillOptions.strategy == "iterative" and {"oneshot, true length", true_default} <= set(exact):
        print(f"default - oneshot, true length: {100 * (exact[true_default] - exact['oneshot, true length']):+.1f} points")
    if FillOptions.strategy == "iterative" and {"[MASK] defaults", true_default} <= set(exact) and exact[true_default]:
        print(f"auto length / true length (defaults): {exact['[MASK] defaults'] / exact[true_default]:.0%}")


if __name__ == "__main__":
    main()
