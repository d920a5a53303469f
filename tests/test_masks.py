"""The marker grammar (masks.py) on its own: what a text's markers become, and what is refused."""

from __future__ import annotations

import pytest

from perceiver_cli.errors import InputError
from perceiver_cli.masks import Span, Template, parse, to_bytes


def test_sized_and_auto_markers_become_spans_around_literal_pieces():
    t = parse("a[MASK:3]b[MASK]c")
    assert t.pieces == (b"a", b"b", b"c")
    assert t.spans == (Span(start=1, length=3, space=False), Span(start=10, length=None, space=False))


def test_a_marker_after_a_space_takes_that_one_space_and_n_counts_it():
    t = parse("some words are [MASK:9]")  # the model card's ` missing.`: 9 bytes from the space
    assert t.pieces == (b"some words are", b"") and t.spans == (Span(start=15, length=9, space=True),)
    t = parse("two  [MASK:2]")  # only the one space right before the marker
    assert t.pieces == (b"two ", b"") and t.spans[0].space


def test_render_puts_fills_between_the_pieces_byte_for_byte():
    t = parse("x [MASK:2] y [MASK] z")
    assert t.render([b" ab", b" cd"]) == b"x ab y cd z"


def test_leading_zeros_of_n_do_not_count():
    assert parse(f"a [MASK:{'0' * 5000}3]").spans[0].length == 3


def test_a_head_without_its_close_is_ordinary_text():
    t = parse("[MASKED] and [MASK:1]")
    assert t.pieces == (b"[MASKED] and", b"")


@pytest.mark.parametrize("text, message", [
    ("no marker here", "no [MASK] marker in the text"),
    ("a [MASK:0] b", "masks no bytes: N must be >= 1"),
    ("a [MASK:x] b", "malformed mask marker '[MASK:x]' at character 2"),
    ("a [MASK:-3] b", "N must be a whole number"),
    ("a [MASK:٣] b", "N must be a whole number"),  # an Arabic-Indic digit is not a length
    ("a [MASK:3 b", "unterminated mask marker at character 2"),
    (f"a [MASK:{'9' * 5000}] b", "asks for a 5000-digit number of bytes"),  # int() would refuse to read it
])
def test_malformed_markers_are_input_errors_naming_the_place(text, message):
    with pytest.raises(InputError, match=None) as e:
        parse(text)
    assert message in str(e.value)


@pytest.mark.parametrize("token, text, pieces, lengths", [
    ("<mask>", "a <mask:2> b <mask> c", (b"a", b" b", b" c"), [2, None]),  # a closing bracket: `:N` goes inside
    ("@@", "a @@:3 b @@ c", (b"a", b" b", b" c"), [3, None]),  # no bracket: `:N` follows
    ("{x}", "{x:1}{x}", (b"", b"", b""), [1, None]),
])
def test_other_mask_literals(token, text, pieces, lengths):
    t = parse(text, token)
    assert t.pieces == pieces and [s.length for s in t.spans] == lengths


def test_an_empty_mask_token_is_refused():
    with pytest.raises(InputError, match="non-empty"):
        parse("a [MASK]", " ")


def test_bytes_that_are_not_utf8_survive_as_they_are():
    raw = b"caf\xe9 [MASK:2] \xff"
    text = raw.decode("utf-8", "surrogateescape")
    t = parse(text)
    assert to_bytes(text) == raw and t.render([b" xy"]) == b"caf\xe9 xy \xff"
    assert isinstance(t, Template)
