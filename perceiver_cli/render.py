"""Terminal rendering of fill results with rich.

Used only when stdout is a terminal (rich's `Console.is_terminal`, which also honours
`FORCE_COLOR`, `TTY_COMPATIBLE` and `NO_COLOR`). Piped output never comes here: the CLI
writes the filled document's raw bytes.

- `document`: the filled text, every fill underlined and each of its characters coloured
  by the model's confidence (the product of its bytes' probabilities);
- `legend`: what the colours mean (only when the console has colour);
- `candidates`: the top-k whole-span candidates, each with its probability as a whole
  (`P(fill)`, exp of its summed log-probability); choices add, in a column of its own,
  the score that ranked them under its rule (`score (sum-mean)`);
- `explain`: per masked byte, the byte filled there and its probability, then the most
  probable other bytes at that position.

Text is always passed to rich as `Text` objects, never as markup, so a `[bold]` in the
user's text stays literal.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table
from rich.cells import cell_len
from rich.text import Text

if TYPE_CHECKING:  # rendering runs after the model, but importing this module must not load torch
    from .filler import FillResult

# Confidence bands of a filled character: (lowest probability, colour, label).
CONFIDENCE = (
    (0.9, "green", ">=90%"),
    (0.5, "yellow", ">=50%"),
    (0.2, "dark_orange", ">=20%"),
    (0.0, "red", "<20%"),
)
FILL_STYLE = "bold underline"  # marks a fill even without colour (NO_COLOR)


def confidence_colour(p: float) -> str:
    for lowest, colour, _ in CONFIDENCE:
        if p >= lowest:
            return colour
    return CONFIDENCE[-1][1]


def percent(p: float) -> str:
    """A probability for people, always in percent so a column reads one way: `41.2%`,
    `<0.1%` when it rounds to nothing."""
    return f"{100 * p:.1f}%" if p >= 0.0005 else "<0.1%"


# Bidirectional controls: a right-to-left override would reorder the rest of the terminal line.
_BIDI = frozenset([0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)])


def show_fill(s: str) -> str:
    """A fill as a quoted string with its spaces visible, and control characters and
    bidirectional controls escaped."""
    return "".join(f"\\u{ord(c):04x}" if ord(c) in _BIDI else c for c in json.dumps(s, ensure_ascii=False))


def show_byte(b: int) -> str:
    """One byte: `'a'`, `' '`, `'\\n'`, or `\\xe2` for a non-ASCII or control byte."""
    if 32 <= b < 127:
        return repr(chr(b))
    return {9: r"'\t'", 10: r"'\n'", 13: r"'\r'"}.get(b, f"\\x{b:02x}")


def utf8_chars(data: bytes) -> list[tuple[str, int, int]]:
    """Cut bytes into characters: (text, first byte, end byte); an invalid byte is U+FFFD."""
    out, i = [], 0
    while i < len(data):
        b = data[i]
        n = 1 if b < 0x80 else 2 if 0xC2 <= b <= 0xDF else 3 if 0xE0 <= b <= 0xEF else 4 if 0xF0 <= b <= 0xF4 else 0
        if n > 1:
            try:
                out.append((data[i : i + n].decode("utf-8"), i, i + n))
                i += n
                continue
            except UnicodeDecodeError:
                pass
        out.append((data[i : i + 1].decode("utf-8", "replace"), i, i + 1))
        i += 1
    return out


def _visible(ch: str) -> str:
    """A filled character as it may be shown on a terminal: control characters become
    their Unicode pictures, C1 and bidirectional controls U+FFFD (the model can emit any
    byte, and an ESC would drive the terminal)."""
    o = ord(ch)
    if ch in "\n\t":
        return ch
    if o < 32:
        return chr(0x2400 + o)
    if o == 127:
        return "\u2421"
    if 0x80 <= o < 0xA0 or o in _BIDI:
        return "\ufffd"
    return ch


def document(result: FillResult, console: Console, *, end_newline: bool = True) -> None:
    """The filled text with each fill highlighted by confidence."""
    text = Text(no_wrap=False, end="")
    pieces = result.pieces or (result.data,)
    text.append(pieces[0].decode("utf-8", "replace"))
    for span, piece in zip(result.spans, pieces[1:]):
        run, colour = "", None  # characters of one confidence band share one style
        for ch, a, b in utf8_chars(span.data):
            c = confidence_colour(math.exp(sum(span.byte_logprobs[a:b])))
            if c != colour and run:
                text.append(run, style=f"{FILL_STYLE} {colour}")
                run = ""
            run, colour = run + _visible(ch), c
        if run:
            text.append(run, style=f"{FILL_STYLE} {colour}")
        text.append(piece.decode("utf-8", "replace"))
    if end_newline and not text.plain.endswith("\n"):
        text.append("\n")
    console.print(text, end="", soft_wrap=True, highlight=False, markup=False, emoji=False)


def legend(console: Console) -> None:
    """What the colours of `document` mean; nothing when the console has no colour."""
    if console.no_color or console.color_system is None:
        return
    line = Text.assemble(("fill confidence: ", "dim"))
    for _, colour, label in CONFIDENCE:
        line.append("\u25a0 ", style=colour)
        line.append(label + "  ", style="dim")
    line.rstrip()
    console.print(line, soft_wrap=True, highlight=False, markup=False, emoji=False)


def _span_label(k: int, span) -> str:
    return f"{k + 1} @{span.start}"


def candidates(result: FillResult, console: Console, top_k: int) -> None:
    """A compact table of the top-k candidates of every span, best first: each one's
    probability as a whole fill, and for choices the score that ranked them, apart."""
    rule = next((c.score_rule for span in result.spans for c in span.candidates if c.score is not None), None)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("span", style="dim", no_wrap=True)
    table.add_column("#", justify="right", style="dim")
    table.add_column("fill", no_wrap=True)
    if rule is not None:
        table.add_column(f"score ({rule})", justify="right")
    table.add_column("P(fill)", justify="right")
    table.add_column("logprob", justify="right", style="dim")
    for k, span in enumerate(result.spans):
        for rank, c in enumerate(span.candidates[:top_k]):
            p = math.exp(c.logprob)
            score = [] if rule is None else ["" if c.score is None else f"{c.score:.3f}"]
            table.add_row(
                _span_label(k, span) if rank == 0 else "",
                str(rank + 1),
                Text(show_fill(c.fill), style="bold" if rank == 0 else ""),
                *score,
                Text(percent(p), style=confidence_colour(p)),
                f"{c.logprob:.3f}",
                end_section=rank == min(top_k, len(span.candidates)) - 1,
            )
    console.print(table)


def filled_and_others(span, i: int) -> tuple[tuple[int, float], list[tuple[int, float]]]:
    """Masked byte `i` of `span`: (the byte filled there, its log-probability) and the most
    probable other bytes at that position, as many as `alternatives` shows beside the best
    one. The filled byte is the model's best only where the fill took the best (oneshot):
    a search or a choice may fill another byte."""
    filled = span.data[i]
    alts = span.alternatives[i]
    return (filled, span.byte_logprobs[i]), [a for a in alts if a[0] != filled][: max(len(alts) - 1, 0)]


def explain(result: FillResult, console: Console) -> None:
    """Per masked byte: the byte filled there and the most probable other ones. On a
    narrow terminal the span, byte and chosen columns stay whole and the alternatives
    shown are the whole ones that fit (most probable first), never one cut short."""
    rows = []
    for k, span in enumerate(result.spans):
        for i in range(len(span.alternatives)):
            (b, lp), rest = filled_and_others(span, i)
            chosen = Text.assemble(f"{show_byte(b)} ", (percent(math.exp(lp)), confidence_colour(math.exp(lp))))
            rows.append((_span_label(k, span) if i == 0 else "", str(i + 1), chosen, rest, i == len(span.alternatives) - 1))
    widths = [max([len(title)] + [cell_len(str(row[c])) for row in rows]) for c, title in enumerate(("span", "byte", "chosen"))]
    room = console.width - sum(widths) - 2 * len(widths)  # each column is padded by one space a side
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    table.add_column("span", style="dim", no_wrap=True, min_width=widths[0])
    table.add_column("byte", justify="right", style="dim", no_wrap=True, min_width=widths[1])
    table.add_column("chosen", no_wrap=True, min_width=widths[2])
    table.add_column("alternatives", no_wrap=True, overflow="crop")
    for label, number, chosen, rest, last in rows:
        cell = Text()
        for b, lp in rest:
            piece = f"{show_byte(b)} {percent(math.exp(lp))}"
            if cell.cell_len + 3 * bool(cell) + cell_len(piece) > room:
                break
            if cell:
                cell.append("   ")
            cell.append(f"{show_byte(b)} ")
            cell.append(percent(math.exp(lp)), style="dim")
        table.add_row(label, number, chosen, cell, end_section=last)
    console.print(table)
