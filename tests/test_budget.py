"""The work budget (budget.py) and bounded search (strategies.py): issue 21's findings.

The memory cases run on a tiny random model with the real model's 2048-byte window (the
bookkeeping per input is the real model's; its passes are cheap), each in a subprocess
under a memory ceiling (RLIMIT_AS) and a timeout, so a regression fails fast instead of
swapping. Ceilings are what the process has after importing torch plus a margin well
under what the unbounded code took.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from perceiver_cli import budget, choices, masks, strategies
from perceiver_cli.budget import OverBudget
from perceiver_cli.checkpoint import load_model
from perceiver_cli.errors import InputError
from perceiver_cli.filler import MaskFiller
from perceiver_cli.options import Budget, FillOptions, OptionError

from .conftest import TINY, make_reference

pytestmark = pytest.mark.usefixtures("one_thread")

BASE_MB = 900  # what the child holds in address space once torch and the model are loaded (~650 MB)

CHILD = """
import json, resource, sys, time
limit = int(sys.argv[2]) << 20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import torch
torch.set_num_threads(1)
from perceiver_cli.checkpoint import load_model
from perceiver_cli.filler import MaskFiller
from perceiver_cli.options import Budget, FillOptions
filler = MaskFiller(load_model(sys.argv[1]), batch_size=8)
t0 = time.perf_counter()
"""


@pytest.fixture(scope="module")
def window_2048(tmp_path_factory):
    """A tiny random checkpoint with the real model's 2048 positions."""
    directory = tmp_path_factory.mktemp("tiny2048")
    make_reference(directory, **{**TINY, "max_position_embeddings": 2048})
    return directory


def limited(checkpoint, code: str, *, extra_mb: int, timeout: float = 60) -> dict:
    """Run `code` after CHILD in a fresh process (`filler` ready, RLIMIT_AS at BASE_MB +
    extra_mb); it sets `out`, which comes back with the seconds the code took."""
    program = CHILD + textwrap.dedent(code) + "\nout['seconds'] = time.perf_counter() - t0\nprint(json.dumps(out))\n"
    done = subprocess.run([sys.executable, "-c", program, str(checkpoint), str(BASE_MB + extra_mb)],
                          capture_output=True, text=True, timeout=timeout, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


REFUSE = """
results = filler.fill_many({texts}, FillOptions(**{options}), return_errors=True)
got = {{"errors": [type(r).__name__ + ": " + str(r) if isinstance(r, Exception) else None for r in results],
        "limits": [getattr(r, "limit", None) for r in results]}}
"""


# -- the findings of issue 21, each under a ceiling ------------------------------------------


REFUSED = {  # issue 21's bodies refused before anything of them is built: (texts, options, limit, hint)
    # 249 KB: every length-scoring window and Reuse key used to be built before any check
    "20,000 [MASK]": ('["w [MASK] " * 20_000]', "{}", "max_inputs", "length_candidates"),
    # 98 bytes: 8,184 scored lengths kept an (n x 262) row set each, ~2.2 GB per marker
    "max_span 2046, every length": ('["a [MASK] b [MASK] c [MASK] d [MASK] e"]',
                                    '{"max_span": 2046, "length_candidates": None}', "max_search", "length_candidates"),
    # every input (64 choices x 2,000 bytes x 4 spans, one per byte) was built before the first pass
    "64 choices by pll": ('["x [MASK] y [MASK] z [MASK] w [MASK]."]',
                          '{"choices": [f"{k:02d}" + "c" * 1998 for k in range(64)], "choice_score": "pll"}',
                          "max_inputs", "choice"),
    # an 11 KB request: a 402 MB answer at a 5.5 GB peak
    "explain on 1,000 [MASK:2046]": ('["[MASK:2046]" * 1000]', '{"strategy": "oneshot", "explain": True}',
                                     "max_memory_mb", "masked bytes"),
}


def test_the_issue_bodies_are_refused_before_anything_is_built(window_2048):
    code = "out = {}\n" + "".join(
        f"t = time.perf_counter()\n{REFUSE.format(texts=texts, options=options)}\n"
        f"out[{name!r}] = {{**got, 'seconds': time.perf_counter() - t}}\n"
        for name, (texts, options, _, _) in REFUSED.items())
    out = limited(window_2048, code, extra_mb=300, timeout=60)
    for name, (_, _, limit, hint) in REFUSED.items():
        got = out[name]
        assert got["limits"] == [limit], name
        error = got["errors"][0]
        assert error.startswith("OverBudget: the fill would take about ") and f"({limit})" in error, name
        assert hint in error and "\n" not in error, name
        assert got["seconds"] < 5, name


@pytest.mark.parametrize("options", [{"top_k": 256}, {"strategy": "beam", "beam_width": 256}])
def test_a_joint_search_of_256_hypotheses_is_compact(window_2048, options):
    # each of 256 x 256 grown hypotheses was a copy of the window's ids and of a dict of rows:
    # 2.1 GB at [MASK:500]; kept as arrays with back-pointers it takes the rows of its passes
    out = limited(window_2048, f"""
        result = filler.fill("[MASK:500]", FillOptions(**{options!r}))
        cands = result.spans[0].candidates
        out = {{"n": len(cands), "distinct": len({{c.data for c in cands}}), "lengths": sorted({{len(c.data) for c in cands}}),
               "sorted": [c.logprob for c in cands] == sorted((c.logprob for c in cands), reverse=True),
               "first": cands[0].data == result.spans[0].data}}
    """, extra_mb=700, timeout=90)
    want_k = options.get("top_k", 1)
    assert out["n"] == want_k and out["distinct"] == want_k and out["lengths"] == [500]
    assert out["sorted"] and out["first"]


def test_all_lengths_of_a_long_auto_span_are_scored_a_chunk_at_a_time(window_2048):
    # max_span 1024, length_candidates null: an (n x 262) float32 row set was kept per scored
    # length, ~0.55 GB for one marker (2.2 GB at max_span 2046); now only each span's best
    out = limited(window_2048, """
        options = FillOptions(strategy="oneshot", max_span=1024, length_candidates=None)
        result = filler.fill("a [MASK] b", options, budget=Budget(max_search=10_000))
        out = {"length": result.spans[0].length, "passes": filler.runner.passes}
    """, extra_mb=350, timeout=90)
    assert 1 <= out["length"] <= 1024


def test_the_k_best_of_twenty_120_byte_spans_takes_seconds(window_2048):
    # 262 bytes, oneshot, top_k 256: the pure-Python ranking took 114 s after its one pass
    out = limited(window_2048, """
        result = filler.fill("[MASK:120] " * 20, FillOptions(strategy="oneshot", top_k=256))
        out = {"n": [len(s.candidates) for s in result.spans]}
    """, extra_mb=300, timeout=60)
    assert out["n"] == [256] * 20 and out["seconds"] < 15


# -- the stop check runs inside the loops after the passes -----------------------------------


class Stop(Exception):
    pass


@pytest.mark.parametrize("options", [dict(strategy="oneshot", top_k=50), dict(strategy="beam", top_k=3),
                                     dict(choices=("a", "b"), choice_score="pll")])
def test_the_stop_check_runs_between_passes(tiny_checkpoint, options):
    filler = MaskFiller(load_model(tiny_checkpoint))
    calls: list[int] = []

    def before_pass(n: int) -> None:
        calls.append(n)
        if n == 0:  # the check of a loop between passes (the server: the client is gone)
            raise Stop()

    filler.runner.before_pass = before_pass
    with pytest.raises(Stop):
        filler.fill("Some text [MASK:8] here." if not options.get("choices") else "Some [MASK] here.", **options)
    assert calls[-1] == 0


# -- the budget's rules ----------------------------------------------------------------------


def test_budget_fields_are_validated():
    assert Budget().max_inputs == 20_000
    for name in ("max_inputs", "max_search", "max_memory_mb", "max_answer_mb"):
        with pytest.raises(OptionError, match=name):
            Budget().replace(**{name: 0})
    with pytest.raises(OptionError, match="max_inputs must be a whole number"):
        Budget.from_dict({"max_inputs": "many"})


def test_a_text_over_budget_fails_alone_and_names_its_knob(tiny_checkpoint):
    filler = MaskFiller(load_model(tiny_checkpoint))
    texts = ["Hello [MASK:3] world.", "A [MASK] B [MASK] C.", "Bye [MASK:2]."]
    small = Budget(max_inputs=6)
    results = filler.fill_many(texts, FillOptions(strategy="iterative", top_k=4), return_errors=True, budget=small)
    assert isinstance(results[1], OverBudget) and isinstance(results[1], InputError)
    assert results[1].limit == "max_inputs" and results[1].allowed == 6
    assert "(max_inputs)" in str(results[1]) and "top_k" in str(results[1])
    assert results[0].spans and results[2].spans
    with pytest.raises(OverBudget):
        filler.fill(texts[1], top_k=4, budget=small)
    filler.budget = small  # the filler's own budget, when a call gives none
    with pytest.raises(OverBudget):
        filler.fill(texts[1], top_k=4)


def test_over_budget_on_the_command_line_names_flags_and_in_python_fields():
    cost = budget.estimate(masks.parse("a [MASK:40] b"), FillOptions(top_k=4, iterative_passes=None), 2046)
    with pytest.raises(OverBudget) as caught:
        budget.check(cost, Budget(max_inputs=50))
    e = caught.value
    assert str(e) == ("the fill would take about 157 model inputs, over the budget's 50 (max_inputs): ask for a smaller "
                      "top_k or beam_width, fewer iterative_passes (or strategy oneshot)")
    assert e.flag() == ("the fill would take about 157 model inputs, over the budget's 50 (--max-inputs): ask for a "
                        "smaller --top-k or beam_width, fewer iterative_passes (or --strategy oneshot), or raise "
                        "--max-inputs; beam_width, iterative_passes: no command-line flag (Python's FillOptions and "
                        "/v1/fill only)")
    flagged = budget.as_flags([e, None])
    assert str(flagged[0]) == e.flag() and isinstance(flagged[0], OverBudget) and flagged[1] is None
    cost = budget.estimate(masks.parse("[MASK:2000]" * 300), FillOptions(strategy="oneshot", explain=True), 2046)
    with pytest.raises(OverBudget) as caught:
        budget.check(cost, Budget(max_memory_mb=100_000))
    assert caught.value.flag().endswith("(--max-answer-mb): ask for --explain off, or fewer masked bytes per text, "
                                        "or raise --max-answer-mb")


def test_answer_size_is_bounded():
    cost = budget.estimate(masks.parse("[MASK:2000]" * 300), FillOptions(strategy="oneshot", explain=True), 2046)
    with pytest.raises(OverBudget, match=r"\(max_answer_mb\): ask for explain off"):
        budget.check(cost, Budget(max_memory_mb=100_000))


def test_texts_of_one_call_are_filled_in_groups_that_fit_the_memory_budget(tiny_checkpoint):
    filler = MaskFiller(load_model(tiny_checkpoint))
    texts = [f"Text {k}: [MASK:60]" for k in range(12)]
    options = FillOptions(strategy="oneshot")
    alone = [filler.fill(t, options) for t in texts]
    runner, calls = filler.runner, []

    def counting(jobs):
        calls.append(len(jobs))
        return runner(jobs)

    filler.runner = counting
    grouped = filler.fill_many(texts, options, budget=Budget(max_memory_mb=1))
    assert len(calls) > 1 and sum(calls) == len(texts)  # several groups, every text once
    assert [r.text for r in grouped] == [r.text for r in alone]


def test_every_default_example_fits_the_default_budget():
    examples = ["This is an incomplete sentence where some words are [MASK:9]",
                "The [MASK] sat on the [MASK] mat. " * 2_500]  # README: 5,000 [MASK]s in a document
    for text in examples:
        for options in (FillOptions(), FillOptions(strategy="oneshot", top_k=5), FillOptions(explain=True)):
            budget.check(budget.estimate(masks.parse(text), options, 2046), Budget())
    for options in (FillOptions(top_k=256), FillOptions(strategy="oneshot", top_k=256, explain=True),
                    FillOptions(choices=("cat", "dog")), FillOptions(choices=("cat", "dog"), choice_score="pll")):
        budget.check(budget.estimate(masks.parse(examples[0]), options, 2046), Budget())


# -- bounded search gives what the exhaustive ranking gives ----------------------------------


def exhaustive_k_best(scores: torch.Tensor, k: int) -> list[tuple[bytes, float]]:
    """The k best spans of independent bytes, ties in the order the candidates are made."""
    top = scores.topk(min(k, scores.shape[-1]), dim=-1)
    beam: list[tuple[float, bytes]] = [(0.0, b"")]
    for values, indices in zip(top.values.tolist(), top.indices.tolist()):
        beam = sorted(((s + v, seq + bytes([b])) for s, seq in beam for v, b in zip(values, indices) if v > -math.inf),
                      key=lambda t: -t[0])[:k]
    return [(seq, score) for score, seq in beam]


@pytest.mark.parametrize("k", [1, 2, 5, 16, 40])
def test_independent_k_best_equals_the_exhaustive_ranking_ties_included(k):
    torch.manual_seed(k)
    scores = torch.log_softmax((torch.randn(6, 256) * 2).round() / 2, -1)  # rounded: many ties
    scores[2, 10] = -math.inf
    assert strategies.independent_k_best(scores, k) == exhaustive_k_best(scores, k)


def test_choices_are_scored_a_chunk_of_inputs_at_a_time(tiny_checkpoint):
    filler = MaskFiller(load_model(tiny_checkpoint))
    calls: list[int] = []

    def run(jobs):
        calls.append(len(jobs))
        return filler.runner(jobs)

    template = masks.parse("A [MASK] b.")
    words = [f"w{k:03d}" + "x" * 20 for k in range(40)]
    options = FillOptions(choices=tuple(words), choice_score="pll")
    lazy = choices.fill_choices(run, [template], filler.window, options)
    assert max(calls) < budget.CHUNK_INPUTS + 30 and sum(calls) == sum(len(w) + 1 for w in words)
    assert lazy[0][0].data == filler.fill("A [MASK] b.", options).spans[0].data


def reference_search(run, job: strategies.Job, options: FillOptions, width: int, max_passes):
    """The search as it was, a copy of the ids and a dict per hypothesis (one job of one
    span): what the array search must give, ties included."""
    from perceiver_cli.tokenizer import byte_id, decode

    width = max(width, options.top_k)
    beam = [(list(job.ids), 0.0, {})]  # (ids, score, position -> (log-prob, row))
    passes_left = max_passes or len(job.positions())
    while True:
        work = [(h, [p for p in job.positions() if p not in h[2]]) for h in beam]
        work = [w for w in work if w[1]]
        if not work:
            break
        grown = []
        for (h, rest), logp in zip(work, run([(h[0], rest) for h, rest in work])):
            scores = strategies.choosable(logp, options)
            best, arg = scores.max(-1)
            c = max(1, math.ceil(len(rest) / max(1, passes_left)))
            order = best.argsort(descending=True).tolist()
            ids, chosen, score = list(h[0]), dict(h[2]), h[1]
            for r in order[1:c]:
                ids[rest[r]] = byte_id(int(arg[r]))
                chosen[rest[r]] = (float(best[r]), logp[r])
                score += float(best[r])
            r = order[0]
            values, indices = scores[r].topk(min(width, scores.shape[-1]))
            for v, b in zip(values.tolist(), indices.tolist()):
                if v > -math.inf:
                    grown.append((ids[: rest[r]] + [byte_id(b)] + ids[rest[r] + 1 :], score + v,
                                  {**chosen, rest[r]: (v, logp[r])}))
        unique: dict = {}
        for h in sorted(grown, key=lambda h: -h[1]):
            unique.setdefault(tuple(h[0]), h)
        beam = list(unique.values())[:width]
        passes_left -= 1
    (start, n), = job.spans
    fills: dict = {}
    for ids, _, chosen in beam:
        data, score = decode(ids[start : start + n]), sum(chosen[p][0] for p in range(start, start + n))
        if data not in fills or score > fills[data][0]:
            fills[data] = (score, chosen)
    ranked = sorted(fills.items(), key=lambda kv: -kv[1][0])
    chosen = ranked[0][1][1]
    return (ranked[0][0], [chosen[p][0] for p in range(start, start + n)],
            torch.stack([chosen[p][1] for p in range(start, start + n)]), [(d, s) for d, (s, _) in ranked[:options.top_k]])


def tied_run(jobs):
    """A made-up model with many tied log-probabilities, the same for the same input."""
    out = []
    for ids, positions in jobs:
        g = torch.Generator().manual_seed(hash((tuple(ids), tuple(positions))) % 2**62)
        out.append(torch.log_softmax((torch.randn(len(positions), 262, generator=g) * 4).round() / 2, -1))
    return out


@pytest.mark.parametrize("n, width, top_k, passes, single_line", [
    (6, 1, 1, None, False), (7, 1, 3, 2, False), (5, 4, 4, 2, True), (9, 6, 2, 3, False), (4, 16, 16, None, False)])
def test_search_equals_the_search_with_a_copy_per_hypothesis(n, width, top_k, passes, single_line):
    job = strategies.Job(ids=[4, 80] + [3] * n + [90, 5], spans=[(2, n)], targets=[0])
    options = FillOptions(top_k=top_k, single_line=single_line)
    (fill,), = strategies.search(tied_run, [job], options, width=width, max_passes=passes)
    data, byte_logprobs, logp, candidates = reference_search(tied_run, job, options, width, passes)
    assert fill.data == data and fill.byte_logprobs == byte_logprobs and torch.equal(fill.logp, logp)
    assert fill.candidates == candidates
