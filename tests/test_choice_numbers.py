"""One meaning per number with `--choice` (choices.py, results.py, options.py).

A span's `logprob` and every candidate's `logprob` are the sum of their bytes'
log-probabilities; a choice's `score`, named by `score_rule`, is what ranked it, apart;
`candidates[0]` is the fill, with the span's numbers. Options that a fill with choices
would ignore are refused. On the small trained model (tests/assets/perceiver-small), with
passes built here by hand.
"""

from __future__ import annotations

import json

import pytest

from perceiver_cli.options import CHOICE_SCORES, NOT_WITH_CHOICES, FillOptions, OptionError
from perceiver_cli.results import Candidate, dumps, result_from_wire, result_to_wire
from perceiver_cli.tokenizer import CLS, MASK, SEP, byte_id, byte_ids

from .conftest import SMALL, invoke

ON_CPU = ("--device", "cpu", "--threads", "1")
TEXT = "Acquire [MASK] global interpreter lock."
BEFORE, AFTER = b"Acquire", b" global interpreter lock."
WORDS = ("with", "the", "from", "make")


def byte_values(filler, before: bytes, data: bytes, after: bytes, method: str) -> list[float]:
    """Each byte's log-probability under a choice rule's passes (choices.py), built here."""
    p, n = 1 + len(before), len(data)  # [CLS] comes first
    ids = [CLS, *byte_ids(before), *byte_ids(data), *byte_ids(after), SEP]
    if method == "sum":
        logp = filler.logprobs([(ids[:p] + [MASK] * n + ids[p + n :], list(range(p, p + n)))])[0]
        return [float(logp[k, byte_id(b)]) for k, b in enumerate(data)]
    jobs = []
    for k in range(n):
        x = list(ids)
        if method == "pll":
            x[p + k] = MASK
        else:  # chain
            x[p + k : p + n] = [MASK] * (n - k)
        jobs.append((x, [p + k]))
    return [float(logp[0, byte_id(b)]) for logp, b in zip(filler.logprobs(jobs), data, strict=True)]


# -- the numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", CHOICE_SCORES)
def test_each_choice_carries_its_logprob_and_apart_the_score_that_ranked_it(filler, rule):
    span = filler.fill(TEXT, choices=WORDS, choice_score=rule).spans[0]
    assert sorted(c.data for c in span.candidates) == sorted(b" " + w.encode() for w in WORDS)
    for c in span.candidates:
        values = byte_values(filler, BEFORE, c.data, AFTER, rule.removesuffix("-mean"))
        assert c.logprob == pytest.approx(sum(values), abs=1e-4)  # the sum, whatever the rule
        mean = sum(values) / (len(c.data) - 1)  # the absorbed space not counted
        assert c.score == pytest.approx(mean if rule.endswith("-mean") else sum(values), abs=1e-4)
        assert c.score_rule == rule
    scores = [c.score for c in span.candidates]
    assert scores == sorted(scores, reverse=True)  # ranked by the score, not by the logprob
    best = span.candidates[0]
    assert (best.data, best.logprob) == (span.data, span.logprob)  # the very same numbers
    assert span.logprob == sum(span.byte_logprobs)
    assert span.byte_logprobs == pytest.approx(byte_values(filler, BEFORE, span.data, AFTER, rule.removesuffix("-mean")),
                                               abs=1e-4)


def test_a_mean_rule_ranks_by_the_mean_while_logprob_stays_the_sum(filler):
    # the case: ' mat' had logprob -6.24 in the span and -2.08 in candidates[0]
    span = filler.fill("The cat sat on the [MASK].", choices=("mat", "dog")).spans[0]
    best = span.candidates[0]
    assert best.score_rule == FillOptions.choice_score == "sum-mean"
    assert best.logprob == span.logprob and best.score == pytest.approx(span.logprob / 3, abs=1e-9)
    assert best.score != pytest.approx(best.logprob, abs=0.1)


def test_several_spans_report_the_sums_of_the_final_round(filler):
    text = "The [MASK] sat on the [MASK] and the [MASK] barked."
    result = filler.fill(text, choices=("cat", "mat", "dog"))
    for span in result.spans:
        assert (span.candidates[0].data, span.candidates[0].logprob) == (span.data, span.logprob)
    before = f"The{result.spans[0].fill} sat on the".encode()
    after = f" and the{result.spans[2].fill} barked.".encode()
    for c in result.spans[1].candidates:  # scored with the other spans holding their final choices
        assert c.logprob == pytest.approx(sum(byte_values(filler, before, c.data, after, "sum")), abs=1e-4)


@pytest.mark.parametrize("strategy", ["oneshot", "iterative", "beam"])
def test_without_choices_the_first_candidate_is_the_fill_with_the_span_numbers(filler, strategy):
    result = filler.fill("Return the number of [MASK] in [MASK:4] list.", strategy=strategy, top_k=3)
    for span in result.spans:
        assert span.logprob == sum(span.byte_logprobs)
        assert (span.candidates[0].data, span.candidates[0].logprob) == (span.data, span.logprob)
        assert all(c.score is None and c.score_rule is None for c in span.candidates)


# -- JSON and the wire ------------------------------------------------------------------------


def test_choice_json_has_logprob_score_and_score_rule(filler):
    result = invoke(SMALL, *ON_CPU, "--choice", "mat", "--choice", "dog", "--json", "The cat sat on the [MASK].")
    assert result.exit_code == 0, result.stderr
    span = json.loads(result.stdout)["spans"][0]
    assert set(span) == {"start", "length", "fill", "bytes", "logprob", "candidates"}
    want = filler.fill("The cat sat on the [MASK].", choices=("mat", "dog")).spans[0]
    for c, w in zip(span["candidates"], want.candidates, strict=True):
        assert list(c) == ["fill", "bytes", "logprob", "score", "score_rule"]
        assert c["fill"] == w.fill and c["score_rule"] == "sum-mean"
        assert c["logprob"] == pytest.approx(w.logprob, abs=1e-5) and c["score"] == pytest.approx(w.score, abs=1e-5)
    assert span["candidates"][0]["logprob"] == span["logprob"] and span["candidates"][0]["fill"] == span["fill"]


def test_json_without_choices_has_no_new_keys(tiny_checkpoint):
    assert dumps(Candidate(b" the", -0.036382).to_dict()) == \
        b'{"fill": " the", "bytes": [32, 116, 104, 101], "logprob": -0.036382}'
    result = invoke(tiny_checkpoint, *ON_CPU, "--json", "-k", "2", "--explain", "Hello [MASK:3] world.")
    assert result.exit_code == 0, result.stderr
    span = json.loads(result.stdout)["spans"][0]
    assert list(span) == ["start", "length", "fill", "bytes", "logprob", "candidates", "alternatives"]
    assert all(list(c) == ["fill", "bytes", "logprob"] for c in span["candidates"])


def test_the_wire_carries_scores_exactly_and_free_fills_as_before(filler):
    chosen = filler.fill("The [MASK] sat on the [MASK].", choices=("cat", "mat", "a"), choice_score="chain")
    back = result_from_wire(json.loads(dumps(result_to_wire(chosen))))
    assert back == chosen
    assert back.spans[0].candidates[0].score_rule == "chain"
    free = filler.fill("Hello [MASK:4] world.", top_k=3)
    wire = json.loads(dumps(result_to_wire(free)))
    assert all(len(c) == 2 for c in wire["spans"][0]["candidates"])  # [data, logprob], the format of before
    assert result_from_wire(wire) == free
    wire["spans"][0]["candidates"][0].append(1.0)  # a third item is neither form
    with pytest.raises(ValueError, match="candidate"):
        result_from_wire(wire)


# -- options a fill with choices would ignore -----------------------------------------------


OTHER_VALUES = {"strategy": "beam", "max_span": 8, "iterative_passes": 3, "beam_width": 2, "length_alpha": 1.0,
                "length_candidates": 3, "length_prior": 0.0}


def test_every_ignored_option_has_a_value_to_try():
    assert set(OTHER_VALUES) == set(NOT_WITH_CHOICES)


@pytest.mark.parametrize("name", NOT_WITH_CHOICES)
def test_an_option_that_choices_ignore_is_refused_naming_it(name):
    value = OTHER_VALUES[name]
    with pytest.raises(OptionError, match=f"cannot be combined with {name}={value!r}: ") as error:
        FillOptions(choices=("cat",), **{name: value})
    assert error.value.name == "choices"
    assert f"--{name.replace('_', '-')} {value}:" in error.value.flag()
    FillOptions(**{name: value})  # without choices it is a fine value


def test_several_ignored_options_are_named_in_one_error():
    with pytest.raises(OptionError) as error:
        FillOptions(choices=("cat",), strategy="oneshot", max_span=4, length_prior=2.0)
    assert "strategy='oneshot', max_span=4, length_prior=2.0: " in str(error.value)
    named = "--strategy oneshot, --max-span 4, --length-prior 2.0: "
    assert error.value.flag().startswith(f"--choice cannot be combined with {named}")


def test_defaults_given_in_full_and_top_k_go_with_choices():
    # the client and the web page send every option (to_dict); -k picks the rows of the table
    with_choices = FillOptions(choices=("cat", "dog"), top_k=5, explain=True, strategy=" Iterative")
    assert FillOptions.from_dict(with_choices.to_dict()) == with_choices
    assert FillOptions.from_dict({**FillOptions().to_dict(), "choices": ["cat"], "top_k": 5}).choices == ("cat",)


def test_a_choice_score_without_choices_is_refused():
    with pytest.raises(OptionError, match="choice_score 'pll' applies with choices only"):
        FillOptions(choice_score="pll")
    assert FillOptions().replace(choices=("cat",), choice_score="pll").choice_score == "pll"


@pytest.mark.parametrize("args, named", [
    (["--strategy", "beam"], "--strategy beam"),
    (["--strategy", "oneshot", "--max-span", "4"], "--strategy oneshot, --max-span 4"),
])
def test_cli_refuses_options_that_choices_ignore(args, named):
    result = invoke(SMALL, *ON_CPU, *args, "--choice", "mat", "--choice", "dog", "The cat sat on the [MASK].")
    assert result.exit_code == 2 and result.stdout == ""
    leave = "it at its default" if "," not in named else "them at their defaults"
    assert result.stderr.splitlines() == [(f"error: --choice cannot be combined with {named}: each choice is scored "
                                           f"as written, never searched for or given a length; leave {leave}")]
    fine = invoke(SMALL, *ON_CPU, "--strategy", "iterative", "--choice", "mat", "The cat sat on the [MASK].")
    assert fine.exit_code == 0 and fine.stdout == "The cat sat on the mat.\n"
