"""The one wire format (results.py): the JSON objects of `fill --json`, batch mode and
ray-fill, the one encoder and its surrogate policy, and the exact wire format the server
answers its own client with."""

from __future__ import annotations

import json
import math

import pytest

from perceiver_cli.results import (
    Candidate,
    FillResult,
    SpanResult,
    blank_record,
    dumps,
    encode,
    encode_list,
    error_record,
    file_record,
    json_line,
    line_record,
    result_from_wire,
    result_to_wire,
)


def span(data: bytes = b" cat", *, start: int = 4, logprob: float = -1.23456789, candidates=(), explain=(),
         from_choices: bool = False) -> SpanResult:
    return SpanResult(start=start, length=len(data), data=data, logprob=logprob,
                      byte_logprobs=[logprob / len(data)] * len(data), alternatives=[list(a) for a in explain],
                      candidates=list(candidates), from_choices=from_choices)


CANDIDATES = (Candidate(b" cat", -1.23456789), Candidate(b" dog", -2.5), Candidate(b" \xffow", -3.0000004))


# -- the objects of --json -----------------------------------------------------------------------


def test_a_fill_as_json_holds_text_and_spans_and_nothing_else_by_default():
    result = FillResult(b"The cat sat.", [span(candidates=CANDIDATES)], (b"The", b" sat."))
    assert result.to_dict() == {
        "text": "The cat sat.",
        "spans": [{"start": 4, "length": 4, "fill": " cat", "bytes": [32, 99, 97, 116], "logprob": -1.234568}],
    }


def test_candidates_with_top_k_and_alternatives_with_explain():
    alternatives = [[(32, -0.01), (10, -4.6051702)], [(99, -1.0)], [(97, -0.5)], [(116, -0.25)]]
    s = span(candidates=CANDIDATES, explain=alternatives)
    d = s.to_dict(top_k=2)
    assert d["candidates"] == [  # the best top_k, each a whole span
        {"fill": " cat", "bytes": [32, 99, 97, 116], "logprob": -1.234568},
        {"fill": " dog", "bytes": [32, 100, 111, 103], "logprob": -2.5},
    ]
    assert "alternatives" not in d
    assert "candidates" not in s.to_dict(top_k=1)
    assert [c["fill"] for c in s.to_dict(top_k=10)["candidates"]] == [" cat", " dog", " \ufffdow"]
    explained = s.to_dict(explain=True)
    assert "candidates" not in explained
    assert explained["alternatives"] == [
        [{"byte": 32, "logprob": -0.01}, {"byte": 10, "logprob": -4.60517}],
        [{"byte": 99, "logprob": -1.0}], [{"byte": 97, "logprob": -0.5}], [{"byte": 116, "logprob": -0.25}],
    ]


def test_choices_list_every_choice_whatever_top_k():
    s = span(candidates=CANDIDATES, from_choices=True)
    for top_k in (1, 2):
        assert [c["fill"] for c in s.to_dict(top_k=top_k)["candidates"]] == [" cat", " dog", " \ufffdow"]
    assert list(s.to_dict()) == ["start", "length", "fill", "bytes", "logprob", "candidates"]


def test_a_fill_that_is_not_utf8_is_shown_replaced_and_kept_as_bytes():
    s = span(b" \xff\xfe", start=0)
    result = FillResult(b"a \xff\xfe b", [s], (b"a", b" b"))
    assert (result.text, s.fill) == ("a \ufffd\ufffd b", " \ufffd\ufffd")
    assert result.to_dict()["spans"][0]["bytes"] == [32, 255, 254]


def test_batch_and_ray_fill_records():
    result = FillResult(b"The cat sat.", [span(candidates=CANDIDATES)], (b"The", b" sat."))
    record = line_record(3, result, top_k=2)
    assert record == {"line": 3, **result.to_dict(top_k=2)} and list(record)[0] == "line"
    assert error_record(4, "no [MASK] marker in the text") == {"line": 4, "error": "no [MASK] marker in the text"}
    assert blank_record(5, "   ") == {"line": 5, "text": "   ", "spans": []}
    filed = file_record("in/a.txt", error_record(4, "bad"))
    assert filed == {"file": "in/a.txt", "line": 4, "error": "bad"} and list(filed) == ["file", "line", "error"]


# -- one encoder ---------------------------------------------------------------------------------


def test_dumps_is_one_line_of_utf8_with_non_ascii_kept():
    obj = {"text": "naïve 中文 🙂", "spans": [], "note": "two\nlines"}
    assert dumps(obj) == '{"text": "naïve 中文 🙂", "spans": [], "note": "two\\nlines"}'.encode()
    assert json_line(obj) == dumps(obj) + b"\n" and json_line(obj).count(b"\n") == 1
    assert json.loads(dumps(obj)) == obj


def test_a_lone_surrogate_is_written_as_its_escape_and_reads_back_to_the_raw_byte():
    record = error_record(1, "no \udcff marker")  # an error quoting a text read with surrogateescape
    line = json_line(record)
    assert line == b'{"line": 1, "error": "no \\udcff marker"}\n'
    line.decode("utf-8")  # valid UTF-8: no UnicodeEncodeError on the way out, none on the way in
    back = json.loads(line)
    assert back == record and back["error"].encode("utf-8", "surrogateescape") == b"no \xff marker"
    raw = b"caf\xe9 \xff\xfe"  # Latin-1 and stray bytes, as read from a file
    text = raw.decode("utf-8", "surrogateescape")
    assert json.loads(dumps({"text": text}))["text"].encode("utf-8", "surrogateescape") == raw
    assert dumps({"text": "\ud800"}) == b'{"text": "\\ud800"}'  # any lone surrogate: its escape


# -- the exact wire format -----------------------------------------------------------------------


def exact_result() -> FillResult:
    """A result whose bytes are not UTF-8 and whose floats need every digit."""
    fills = span(b" \xff\xc3", start=2, logprob=0.1 + 0.2 - 10, candidates=(
        Candidate(b" \xff\xc3", 0.1 + 0.2 - 10), Candidate(b"\x00\x80\n", -math.pi), Candidate(b" ok", -5e-324)),
        explain=[[(255, -1 / 3), (32, -2 / 3)], [(195, -1e-17)], [(10, -123456.789012345678)]])
    choice = span(b" cat", start=9, logprob=-2.000000000001, candidates=(
        Candidate(b" cat", -2.000000000001), Candidate(b" \xe9l\xe9phant", -7.25)), from_choices=True)
    return FillResult(b"ab \xff\xc3 c\xe9 cat.", [fills, choice], (b"ab", b" c\xe9", b"."))


def test_the_wire_format_round_trips_every_byte_and_float_exactly():
    result = exact_result()
    line = dumps(result_to_wire(result))
    line.decode("ascii")  # bytes travel as base64, numbers as Python's float repr
    back = result_from_wire(json.loads(line))
    assert back == result  # every field of every span and candidate, floats to the last bit
    assert back.data == b"ab \xff\xc3 c\xe9 cat." and back.spans[0].candidates[1].data == b"\x00\x80\n"
    assert back.spans[0].logprob == 0.1 + 0.2 - 10 and back.spans[0].candidates[2].logprob == -5e-324
    assert back.spans[1].from_choices and not back.spans[0].from_choices
    assert back.to_dict(top_k=3, explain=True) == result.to_dict(top_k=3, explain=True)


@pytest.mark.parametrize("damage, error", [
    (lambda d: d.pop("spans"), KeyError),
    (lambda d: d["spans"][0].pop("byte_logprobs"), KeyError),
    (lambda d: d.update(data="not base64!"), ValueError),
    (lambda d: d["spans"][0].update(logprob="high"), ValueError),
    (lambda d: d["spans"][0].update(alternatives=5), TypeError),
])
def test_wire_data_of_another_shape_is_an_error(damage, error):
    wire = result_to_wire(exact_result())
    damage(wire)
    with pytest.raises(error):
        result_from_wire(wire)


def test_answers_are_encoded_as_the_one_encoder_encodes_them():
    nested = {"a": [1, 2.5, -0.0, 1e-7, None, True], "b\udcff": {"c": [[], {}, [[{"x": "\ud800 \x01 é"}]]]}}
    for obj in (nested, [nested, nested, []], [], {}, "text", [[{"score": 0.1, "sequence": "[CLS] a"}] * 3] * 2):
        for depth in (0, 1, 4, 9):
            assert encode(obj, depth) == dumps(obj)
        if isinstance(obj, list):
            assert encode_list(x for x in obj) == dumps(obj)  # items built as they are encoded
