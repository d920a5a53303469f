"""Terminal tables (render.py): each column says what it is, and `--explain` shows the bytes
that were filled, whatever filled them.

Hand-built results pin the tables line by line; the issue's own example (`--choice mat
--choice dog --explain`) runs end to end on the small model (tests/assets/perceiver-small).
"""

from __future__ import annotations

import io
import math
import re

import pytest
from rich.console import Console

from perceiver_cli import render
from perceiver_cli.results import Candidate, FillResult, SpanResult

from .conftest import SMALL, invoke

pytestmark = pytest.mark.usefixtures("one_thread")

# Per masked byte of " ab": the model's top bytes at that position, best first.
TOP = [[(32, -0.01), (44, -5.0), (10, -6.0)], [(97, -0.2), (101, -2.5), (111, -3.0)], [(98, -0.3), (100, -1.6), (226, -9.0)]]


def table(draw, result: FillResult, *args, width: int = 80) -> list[str]:
    """What `draw(result, console, *args)` shows on a terminal `width` columns wide without
    colour, line by line (rich pads the cells; the padding at the ends of lines is cut)."""
    buf = io.StringIO()
    draw(result, Console(file=buf, force_terminal=True, color_system=None, width=width), *args)
    return [line.rstrip() for line in buf.getvalue().splitlines()]


def span_of(data: bytes, byte_logprobs: list[float], candidates: list[Candidate] | None = None) -> FillResult:
    span = SpanResult(start=4, length=len(data), data=data, logprob=sum(byte_logprobs), byte_logprobs=byte_logprobs,
                      alternatives=TOP, candidates=candidates or [])
    return FillResult(b"Say" + data + b".", [span], (b"Say", b"."))


# -- --explain --------------------------------------------------------------------------------


def test_explain_is_unchanged_where_the_fill_took_the_best_byte_at_each_position():
    # oneshot: every filled byte is the argmax, so the table reads as it always did
    assert table(render.explain, span_of(b" ab", [-0.01, -0.2, -0.3])) == [
        "span   byte   chosen      alternatives",
        "────────────────────────────────────────────────",
        "1 @4      1   ' ' 99.0%   ',' 0.7%   '\\n' 0.2%",
        "          2   'a' 81.9%   'e' 8.2%   'o' 5.0%",
        "          3   'b' 74.1%   'd' 20.2%   \\xe2 <0.1%",
    ]


def test_explain_shows_the_filled_byte_where_it_is_not_the_best_and_never_repeats_it():
    # ' eq': 'e' is the runner-up at position 2 and 'q' is not among the top bytes at all
    lines = table(render.explain, span_of(b" eq", [-0.01, -2.5, -7.0]))
    assert lines[2:] == [
        "1 @4      1   ' ' 99.0%   ',' 0.7%   '\\n' 0.2%",
        "          2   'e' 8.2%    'a' 81.9%   'o' 5.0%",
        "          3   'q' 0.1%    'b' 74.1%   'd' 20.2%",
    ]


def test_explain_on_a_narrow_terminal_keeps_every_number_whole():
    # 60, 40 and 30 columns: the chosen byte's probability is never cut ("99…"); the
    # alternatives shown are the most probable whole ones that fit, in their order
    result = span_of(b" ab", [-0.01, -0.2, -0.3])
    assert table(render.explain, result, width=40)[2:] == [
        "1 @4      1   ' ' 99.0%   ',' 0.7%",
        "          2   'a' 81.9%   'e' 8.2%",
        "          3   'b' 74.1%   'd' 20.2%",
    ]
    assert table(render.explain, result, width=30)[2:] == [
        "1 @4      1   ' ' 99.0%",
        "          2   'a' 81.9%",
        "          3   'b' 74.1%",
    ]
    wide = table(render.explain, result)
    for width in (60, 40, 30):
        lines = table(render.explain, result, width=width)
        assert all("…" not in line and len(line) <= width for line in lines)
        for narrow, full in zip(lines[2:], wide[2:]):
            assert full.startswith(narrow)


def test_filled_and_others_takes_the_fill_and_as_many_others_as_beside_the_best():
    result = span_of(b" eq", [-0.01, -2.5, -7.0])
    span = result.spans[0]
    assert render.filled_and_others(span, 1) == ((101, -2.5), [(97, -0.2), (111, -3.0)])
    assert render.filled_and_others(span, 2) == ((113, -7.0), [(98, -0.3), (100, -1.6)])  # cut to 2, as beside the best
    assert render.filled_and_others(span, 0) == ((32, -0.01), [(44, -5.0), (10, -6.0)])


# -- the candidates table ---------------------------------------------------------------------


def test_candidates_table_shows_each_whole_fill_probability():
    result = span_of(b" ab", [-0.01, -0.2, -0.3], [Candidate(b" ab", -0.51), Candidate(b" eb", -2.81)])
    assert table(render.candidates, result, 2) == [
        "span   #   fill    P(fill)   logprob",
        "────────────────────────────────────",
        "1 @4   1   \" ab\"     60.0%    -0.510",
        "       2   \" eb\"      6.0%    -2.810",
    ]


def test_choice_candidates_table_has_the_score_in_its_own_labelled_column():
    # a mean score of -2.08 is exp 12.5%; the word's own probability is exp(-6.24) = 0.2%
    result = span_of(b" ab", [-0.01, -3.0, -3.23], [Candidate(b" ab", -6.24, -2.08, "sum-mean"),
                                                     Candidate(b" eb", -8.67, -2.89, "sum-mean")])
    lines = table(render.candidates, result, 2)
    assert lines == [
        "span   #   fill    score (sum-mean)   P(fill)   logprob",
        "───────────────────────────────────────────────────────",
        "1 @4   1   \" ab\"             -2.080      0.2%    -6.240",
        "       2   \" eb\"             -2.890     <0.1%    -8.670",
    ]
    assert render.percent(math.exp(-2.08)) == "12.5%" and "12.5%" not in "\n".join(lines)


# -- end to end: the example -------------------------------------------------------


def test_choice_explain_on_a_terminal_spells_the_chosen_word(filler):
    args = ["--device", "cpu", "--threads", "1", "--choice", "mat", "--choice", "dog", "-k", "3", "--explain",
            "The cat sat on the [MASK]."]
    result = invoke(SMALL, *args, env={"FORCE_COLOR": "1", "NO_COLOR": "1", "COLUMNS": "100"})
    assert result.exit_code == 0, result.stderr
    lines = [line.rstrip() for line in re.sub(r"\x1b\[[0-9;]*m", "", result.stdout).splitlines()]
    want = filler.fill("The cat sat on the [MASK].", choices=("mat", "dog")).spans[0]
    assert want.data == b" mat"
    header = next(k for k, line in enumerate(lines) if line.startswith("span") and "chosen" in line)
    rows = lines[header + 2 : header + 2 + len(want.data)]
    for i, (row, b, lp) in enumerate(zip(rows, want.data, want.byte_logprobs, strict=True)):
        cell = f"{render.show_byte(b)} {render.percent(math.exp(lp))}"  # the filled byte, not the model's best
        at = re.search(rf" {i + 1}   {re.escape(cell)}( |$)", row)
        assert at, (row, cell)
        assert f"{render.show_byte(b)} " not in row[at.end():]  # not repeated among the others
    table_head = next(line for line in lines if "fill" in line and "P(fill)" in line)
    assert "score (sum-mean)" in table_head
    best = next(line for line in lines if '" mat"' in line)
    assert render.percent(math.exp(want.logprob)) in best and f"{want.candidates[0].score:.3f}" in best
