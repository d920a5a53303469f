"""Measure the `--choice` scoring rules: which of 4 words fits the masked span?

    python scripts/eval_choices.py --model tests/assets/perceiver-small \
        --cases tests/assets/eval/valid.jsonl tests/assets/eval/test.jsonl

Cases: each sentence of an evaluation file (`scripts/build_corpus.py --cases-out`: one
word masked, its leading space in the span) whose masked word is alphabetic. The choices
are the true word and 3 distractors drawn (fixed seed) from the words of the same file's
sentences, each occurrence counting (so frequent words are drawn as often as they occur,
like the true words), of the true word's length +-1 bytes, all different from each other
and from the true word (ignoring case); the 4 are shuffled. Chance is 25%.

Every rule of `choices.py` (sum, pll, chain, each with and without length normalisation)
is measured on the same cases; each method's passes are run once (batched) and every rule
of that method is an aggregation of the same byte log-probabilities. The default rule
(`FillOptions.choice_score`) is also run end to end through `MaskFiller.fill` on the
first `--check` cases of each file, which must give the same choice.

Pick the rule on the VALIDATION cases; the test cases are for reporting.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch

from perceiver_cli import choices, masks
from perceiver_cli.checkpoint import load_model
from perceiver_cli.filler import MaskFiller
from perceiver_cli.options import CHOICE_SCORES, FillOptions
from perceiver_cli.windows import Layout

_WORD = re.compile(r"[A-Za-z]+")


def build_cases(path: str, seed: int, distractors: int = 3) -> list[dict]:
    """{"text", "choices", "answer"} per usable case (module docstring)."""
    raw = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    pool = [w for c in raw for part in (c["prefix"], c["answer"], c["suffix"]) for w in _WORD.findall(part)]
    rng = random.Random(seed)
    cases = []
    for c in raw:
        word = c["answer"][1:] if c["answer"].startswith(" ") else None
        if not word or not _WORD.fullmatch(word):
            continue
        near = [w for w in pool if abs(len(w) - len(word)) <= 1 and w.lower() != word.lower()]
        picked: list[str] = []
        while len(picked) < distractors and near:
            w = rng.choice(near)
            if w.lower() not in {p.lower() for p in picked}:
                picked.append(w)
        if len(picked) < distractors:
            continue
        options = [word, *picked]
        rng.shuffle(options)
        cases.append({"text": f"{c['prefix']} [MASK]{c['suffix']}", "choices": options, "answer": word})
    return cases


class Counter:
    def __init__(self, runner):
        self.runner, self.inputs = runner, 0

    def __call__(self, jobs):
        self.inputs += len(jobs)
        return self.runner(jobs)


def evaluate(filler: MaskFiller, cases: list[dict]) -> dict:
    """{rule: (accuracy, model inputs per case)} on `cases`."""
    items, keys = [], []
    for n, case in enumerate(cases):
        t = masks.parse(case["text"])
        span = t.spans[0]
        lead = b" " if span.space else b""
        for w in case["choices"]:
            data = lead + w.encode()
            layout = Layout(t, [len(data)], filler.window)
            items.append(choices.item_of(layout.jobs()[0], 0, data, len(lead)))
            keys.append((n, w))
    out = {}
    for method in choices.METHODS:
        counter = Counter(filler.runner)
        t0 = time.perf_counter()
        scored = choices.byte_scores(counter, items, method)
        seconds = time.perf_counter() - t0
        for rule in CHOICE_SCORES:
            if rule.removesuffix("-mean") != method:
                continue
            best: dict[int, tuple[float, str]] = {}
            for (n, w), item, (values, _) in zip(keys, items, scored):
                s = choices.score(values, item.lead, rule)
                if n not in best or s > best[n][0]:  # ties: the first listed wins, as in the filler
                    best[n] = (s, w)
            correct = sum(best[n][1] == case["answer"] for n, case in enumerate(cases))
            out[rule] = (correct / len(cases), counter.inputs / len(cases), seconds / len(cases))
    return out


def check_end_to_end(filler: MaskFiller, cases: list[dict], rule: str) -> int:
    """How many of `cases` the filler answers as `evaluate` would (it must be all)."""
    agree = 0
    for case in cases:
        r = filler.fill(case["text"], FillOptions(choices=tuple(case["choices"]), choice_score=rule))
        scores = {c.fill.strip(): c.score for c in r.spans[0].candidates}
        agree += r.spans[0].fill.strip() == max(case["choices"], key=lambda w: scores[w])
    return agree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tests/assets/perceiver-small")
    ap.add_argument("--cases", nargs="+", default=["tests/assets/eval/valid.jsonl", "tests/assets/eval/test.jsonl"])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check", type=int, default=20, help="cases run end to end through MaskFiller.fill")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    filler = MaskFiller(load_model(args.model), batch_size=args.batch_size)
    table: dict[str, list[str]] = {rule: [] for rule in CHOICE_SCORES}
    header = []
    for path in args.cases:
        cases = build_cases(path, args.seed)[: args.limit]
        header.append(f"{Path(path).stem} ({len(cases)} cases)")
        results = evaluate(filler, cases)
        for rule, (acc, inputs, seconds) in results.items():
            table[rule].append(f"{acc:.1%}")
        table.setdefault("_cost", []).append(
            "; ".join(f"{r}: {results[r][1]:.1f} inputs, {results[r][2] * 1000:.0f} ms" for r in ("sum", "pll", "chain")))
        agree = check_end_to_end(filler, cases[: args.check], FillOptions.choice_score)
        print(f"{path}: {len(cases)} cases; end to end with {FillOptions.choice_score}: "
              f"{agree}/{min(args.check, len(cases))} agree", flush=True)
    print(f"model {args.model}, seed {args.seed}, 4 choices (chance 25%)")
    print("| rule | " + " | ".join(header) + " |")
    print("|---|" + "---|" * len(header))
    for rule in CHOICE_SCORES:
        print(f"| {rule} | " + " | ".join(table[rule]) + " |")
    print("cost per case (all 4 choices):", " / ".join(table["_cost"]))


if __name__ == "__main__":
    main()
