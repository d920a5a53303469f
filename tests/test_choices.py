"""`--choice WORD`: every span filled with the best of the given words (choices.py).

On the small trained model (tests/assets/perceiver-small). The scores are checked against
passes built here by hand, so a ranking that is off by a position or a byte fails.
"""

from __future__ import annotations

import json

import pytest

from perceiver_cli import choices
from perceiver_cli.errors import InputError
from perceiver_cli.filler import MaskFiller
from perceiver_cli.options import CHOICE_SCORES, FillOptions, OptionError
from perceiver_cli.tokenizer import CLS, MASK, SEP, byte_id, byte_ids

from .conftest import SMALL, invoke

WINDOW = 126  # the small model's bytes per window
ON_CPU = ("--device", "cpu", "--threads", "1")


def by_hand(filler: MaskFiller, before: bytes, data: bytes, after: bytes, rule: str) -> float:
    """A choice's score in a one-window text, from passes built here (choices.py's rules)."""
    p = 1 + len(before)  # [CLS] comes first
    n = len(data)
    ids = [CLS, *byte_ids(before), *byte_ids(data), *byte_ids(after), SEP]
    method = rule.removesuffix("-mean")
    if method == "sum":
        masked = ids[:p] + [MASK] * n + ids[p + n :]
        logp = filler.logprobs([(masked, list(range(p, p + n)))])[0]
        values = [float(logp[k, byte_id(b)]) for k, b in enumerate(data)]
    else:
        jobs = []
        for k in range(n):
            x = list(ids)
            if method == "pll":
                x[p + k] = MASK
            else:
                x[p + k : p + n] = [MASK] * (n - k)
            jobs.append((x, [p + k]))
        values = [float(logp[0, byte_id(b)]) for logp, b in zip(filler.logprobs(jobs), data)]
    total = sum(values)
    lead = 1 if data.startswith(b" ") else 0
    return total / (n - lead) if rule.endswith("-mean") else total


# -- ranking and scores -----------------------------------------------------------------


@pytest.mark.parametrize("rule", CHOICE_SCORES)
def test_choices_are_ranked_by_their_score_computed_by_hand(filler, rule):
    words = ("with", "the", "from", "make")
    result = filler.fill("Acquire [MASK] global interpreter lock.", choices=words, choice_score=rule)
    span = result.spans[0]
    assert sorted(c.data for c in span.candidates) == sorted(b" " + w.encode() for w in words)
    expected = {c.data: by_hand(filler, b"Acquire", c.data, b" global interpreter lock.", rule) for c in span.candidates}
    for c in span.candidates:
        assert c.score == pytest.approx(expected[c.data], abs=1e-4) and c.score_rule == rule
    scores = [c.score for c in span.candidates]
    assert scores == sorted(scores, reverse=True)
    assert span.data == span.candidates[0].data
    assert result.text == f"Acquire{span.fill} global interpreter lock."


def test_the_default_rule_picks_the_right_word_where_the_model_knows_it(filler):
    # A sentence of the validation split: the frequent word wins over 3 others.
    result = filler.fill("Acquire [MASK] global interpreter lock.", choices=("with", "the", "from", "make"))
    assert result.text == "Acquire the global interpreter lock."
    assert [c.fill for c in result.spans[0].candidates][0] == " the"


def test_choices_of_different_lengths(filler):
    words = ("a", "elephant", "interpreter", "the")
    result = filler.fill("Acquire [MASK] global interpreter lock.", choices=words)
    span = result.spans[0]
    assert {c.data for c in span.candidates} == {b" a", b" elephant", b" interpreter", b" the"}
    assert span.length == len(span.data) == len(span.byte_logprobs)
    assert result.text == f"Acquire{span.fill} global interpreter lock."
    rule = FillOptions.choice_score
    for c in span.candidates:  # each length is scored in its own window, by the default rule
        assert c.score == pytest.approx(by_hand(filler, b"Acquire", c.data, b" global interpreter lock.", rule), abs=1e-4)
    # a longer choice can win: a 1-byte choice is not favoured for being short
    long_wins = filler.fill("Acquire [MASK] global interpreter lock.", choices=("x", "the"))
    assert long_wins.spans[0].data == b" the"


def test_a_choice_takes_the_absorbed_space_and_none_where_there_is_none(filler):
    result = filler.fill("some words are [MASK]", choices=("missing",))
    assert result.spans[0].data == b" missing" and result.text == "some words are missing"
    glued = filler.fill("some words are[MASK].", choices=("missing",))
    assert glued.spans[0].data == b"missing" and glued.text == "some words aremissing."
    first = filler.fill("[MASK] words are here.", choices=("Some",))
    assert first.spans[0].data == b"Some" and first.text == "Some words are here."


def test_a_sized_marker_is_refused_with_choices(filler):
    with pytest.raises(InputError, match=r"gives a length \(:4\).*write \[MASK\]"):
        filler.fill("The [MASK:4] sat.", choices=("cat",))


def test_a_choice_longer_than_the_window_is_an_input_error(filler):
    fits = "a" * (WINDOW - 1)
    assert filler.fill("x [MASK] y", choices=(fits,)).spans[0].length == WINDOW  # with its space: exactly the window
    with pytest.raises(InputError, match=r"127 bytes with the space its span at character 2 takes in.*126-byte window"):
        filler.fill("x [MASK] y", choices=("a" * WINDOW,))
    with pytest.raises(OptionError, match="longer than this model's 126-byte window"):
        filler.fill("x[MASK]y", choices=("a" * (WINDOW + 1),))
    # in a batch, only the text that cannot take the choice fails
    out = filler.fill_many(["x [MASK] y", "[MASK] y"], choices=("a" * WINDOW,), return_errors=True)
    assert isinstance(out[0], InputError) and out[1].spans[0].data == b"a" * WINDOW


def test_several_spans_each_get_every_choice_with_the_others_filled(filler):
    words = ("cat", "mat", "dog")
    text = "The [MASK] sat on the [MASK] and the [MASK] barked."
    result = filler.fill(text, choices=words)
    assert len(result.spans) == 3
    for span in result.spans:
        assert sorted(c.fill for c in span.candidates) == [" cat", " dog", " mat"]
        assert span.data == span.candidates[0].data
    assert result.text == "The{} sat on the{} and the{} barked.".format(*(s.fill for s in result.spans))
    # the final ranking of span 1 is its ranking with the other spans written in
    before = f"The{result.spans[0].fill} sat on the".encode()
    after = f" and the{result.spans[2].fill} barked.".encode()
    for c in result.spans[1].candidates:
        assert c.score == pytest.approx(by_hand(filler, before, c.data, after, FillOptions.choice_score), abs=1e-4)


def test_choices_in_many_texts_equal_each_text_alone(filler):
    texts = ["Acquire [MASK] global interpreter lock.", "The [MASK] sat on the [MASK].", "some words are [MASK]"]
    words = ("the", "cat", "missing")
    together = filler.fill_many(texts, choices=words)
    for text, r in zip(texts, together):
        alone = filler.fill(text, choices=words)
        assert r.data == alone.data
        assert [(c.data, round(c.logprob, 4), round(c.score, 4)) for s in r.spans for c in s.candidates] == \
               [(c.data, round(c.logprob, 4), round(c.score, 4)) for s in alone.spans for c in s.candidates]


# -- the command line ---------------------------------------------------------------------


def test_cli_json_lists_every_choice_ranked(filler):
    args = ["--choice", "cat", "--choice", "elephant", "--choice", "a", "--json", "The [MASK] sat on the [MASK]."]
    result = invoke(SMALL, *ON_CPU, *args)
    assert result.exit_code == 0, result.stderr
    answer = json.loads(result.stdout)
    expected = filler.fill("The [MASK] sat on the [MASK].", choices=("cat", "elephant", "a"))
    assert answer["text"] == expected.text
    assert len(answer["spans"]) == 2
    for span, want in zip(answer["spans"], expected.spans):
        assert set(span) == {"start", "length", "fill", "bytes", "logprob", "candidates"}
        assert [c["fill"] for c in span["candidates"]] == [c.fill for c in want.candidates]
        assert {c["fill"] for c in span["candidates"]} == {" cat", " elephant", " a"}
        for c in span["candidates"]:
            assert set(c) == {"fill", "bytes", "logprob", "score", "score_rule"} and bytes(c["bytes"]) == c["fill"].encode()
            assert c["score_rule"] == FillOptions.choice_score
        scores = [c["score"] for c in span["candidates"]]
        assert scores == sorted(scores, reverse=True)
        assert span["fill"] == span["candidates"][0]["fill"] and span["length"] == len(span["bytes"])
    plain = invoke(SMALL, *ON_CPU, *args[:-2], "The [MASK] sat on the [MASK].")
    assert plain.exit_code == 0 and plain.stdout == expected.text + "\n"


@pytest.mark.parametrize("args, fragment", [
    (["--choice", "a" * WINDOW, "x [MASK] y"], "127 bytes with the space"),
    (["--choice", "a" * (WINDOW + 1), "x[MASK]y"], "--choice 'aaaaaaaaaaaaaaaaaaaa'... is 127 bytes"),
    (["--choice", "cat", "The [MASK:4] sat."], "with --choice the choice gives the length"),
    (["--choice", "", "The [MASK] sat."], "--choice must not hold an empty word"),
])
def test_cli_bad_choice_is_exit_2_with_one_error_line(args, fragment):
    result = invoke(SMALL, *ON_CPU, *args)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert result.stdout == ""


def test_scores_of_items_equal_the_filler(filler):
    # the eval script scores through choices.byte_scores: it must be what the filler does
    from perceiver_cli import masks
    from perceiver_cli.windows import Layout

    t = masks.parse("Acquire [MASK] global interpreter lock.")
    result = filler.fill("Acquire [MASK] global interpreter lock.", choices=("the", "with"), choice_score="pll")
    for c in result.spans[0].candidates:
        item = choices.item_of(Layout(t, [len(c.data)], WINDOW).jobs()[0], 0, c.data, 1)
        (values, rows), = choices.byte_scores(filler.logprobs, [item], "pll")
        assert rows.shape[0] == len(c.data)
        assert choices.score(values, 1, "pll") == pytest.approx(c.score, abs=1e-5)


# -- the server ---------------------------------------------------------------------------


def test_native_server_endpoint_takes_choices_as_a_json_list(filler, tmp_path):
    from tests.serving import Server, assert_close, perceiver, server_env

    server = Server(SMALL, tmp_path)
    try:
        text = "The [MASK] sat on the [MASK]."
        options = {"choices": ["cat", "elephant", "a"], "choice_score": "pll"}
        expected = filler.fill(text, FillOptions.from_dict(options)).to_dict()
        status, _, _, answer = server.request("POST", "/v1/fill", {"text": text, "options": options})
        assert status == 200
        assert_close(answer, expected)
        assert [c["fill"] for c in answer["spans"][0]["candidates"]] == [c["fill"] for c in expected["spans"][0]["candidates"]]
        status, _, _, answer = server.request("POST", "/v1/fill", {"text": text, "options": {"choices": [""]}})
        assert status == 400 and "must not hold an empty word" in answer["error"]
        env = server_env(tmp_path)
        args = ["--choice", "cat", "--choice", "elephant", "--json", text]
        alone = perceiver(["fill", "-m", str(SMALL), "--device", "cpu", "--threads", "1", *args], env, None)
        served = perceiver(["fill", "--server", server.url, *args], env, None)
        assert alone.returncode == 0 and len(json.loads(alone.stdout)["spans"][0]["candidates"]) == 2
        assert (served.returncode, served.stdout, served.stderr) == (alone.returncode, alone.stdout, alone.stderr)
    finally:
        assert server.stop() == 0
