"""Mask markers: parse `[MASK]` / `[MASK:N]` in a text into byte spans.

Syntax (for the default marker literal `[MASK]`):

- `[MASK]`    a span whose byte length the filler chooses (auto length);
- `[MASK:N]`  exactly N masked bytes, N >= 1;
- a marker right after a space takes that one space into its span, and N counts it:
  in `words are [MASK:9]` the span is the 9 bytes starting at the space, as the model
  was trained on spans that start with a space.

Another literal can be chosen (`mask_token`). When it ends with a closing bracket
(`]`, `>`, `}` or `)`) the sized form puts `:N` before that bracket (`<mask:3>`);
otherwise `:N` follows the literal (`@@:3`).

Text is handled as bytes: a text that is not valid UTF-8 is read with
`surrogateescape`, so every byte outside the spans comes back out unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InputError

DEFAULT_MASK_TOKEN = "[MASK]"
_CLOSERS = "]>})"
MAX_DIGITS = 9  # digits of N beyond its leading zeros: more is refused before int() reads them


@dataclass(frozen=True)
class Span:
    start: int  # character offset of the marker in the input text
    length: int | None  # bytes, counting an absorbed space; None = auto length
    space: bool  # the span took in the space just before its marker


@dataclass(frozen=True)
class Template:
    """A text cut at its spans: `pieces[0] span0 pieces[1] span1 ... pieces[-1]`."""

    pieces: tuple[bytes, ...]
    spans: tuple[Span, ...]

    def render(self, fills: list[bytes]) -> bytes:
        out = [self.pieces[0]]
        for fill, piece in zip(fills, self.pieces[1:]):
            out += [fill, piece]
        return b"".join(out)


def to_bytes(text: str, at: int = 0) -> bytes:
    """The text's bytes; `InputError` for a lone surrogate that stands for no byte (one
    from JSON's `"\\ud800"`: not a character, and nothing a byte-level model can read),
    named by its place (`at`: where `text` starts in the whole text)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        raise InputError(f"the text holds a lone surrogate (U+{ord(text[e.start]):04X}) at character "
                         f"{at + e.start}: not a character") from None


def parse(text: str, mask_token: str = DEFAULT_MASK_TOKEN) -> Template:
    """Split `text` at its markers. Raises `InputError` for malformed markers or none."""
    if not mask_token or mask_token.isspace():
        raise InputError("the mask token must be a non-empty literal")
    if mask_token[-1] in _CLOSERS and len(mask_token) > 1:
        head, close = mask_token[:-1], mask_token[-1]
    else:
        head, close = mask_token, ""
    pieces: list[bytes] = []
    spans: list[Span] = []
    literal_start = 0  # start of the literal text not yet emitted
    i = text.find(head)
    while i != -1:
        after = i + len(head)
        if text.startswith(close, after) and (close or not text.startswith(":", after)):
            end, length = after + len(close), None
        elif text.startswith(":", after):
            stop = text.find(close, after + 1) if close else _digits_end(text, after + 1)
            if stop == -1:
                raise InputError(f"unterminated mask marker at character {i}: expected {head}:N{close}")
            number = text[after + 1 : stop]
            if not number.isascii() or not number.isdigit():
                shown = text[i : stop + len(close)]
                raise InputError(
                    f"malformed mask marker {shown!r} at character {i}: N must be a whole number, as in {head}:3{close}"
                )
            digits = number.lstrip("0") or "0"
            if len(digits) > MAX_DIGITS:  # no window is that long (and int() refuses 4,300+ digits)
                raise InputError(
                    f"mask marker {head}:{digits[:8]}...{close} at character {i} asks for a {len(digits)}-digit "
                    f"number of bytes: N must fit the model's window"
                )
            length = int(digits)
            if length < 1:
                raise InputError(f"mask marker {head}:{number}{close} at character {i} masks no bytes: N must be >= 1")
            end = stop + len(close)
        else:  # the head alone, e.g. "[MASKED]": ordinary text
            i = text.find(head, after)
            continue
        space = i > literal_start and text[i - 1] == " "
        pieces.append(to_bytes(text[literal_start : i - 1 if space else i], literal_start))
        spans.append(Span(start=i, length=length, space=space))
        literal_start = end
        i = text.find(head, end)
    if not spans:
        raise InputError(f"no {mask_token} marker in the text: put {mask_token} or {head}:N{close} where bytes are "
                         f"missing{_near_miss(text, head, close)}")
    pieces.append(to_bytes(text[literal_start:], literal_start))
    return Template(tuple(pieces), tuple(spans))


def _near_miss(text: str, head: str, close: str) -> str:
    """What the text probably meant, when it holds no marker: the marker's word in other
    brackets, case or spacing (`<mask>`, `[mask]`, `[MASK ]`, `[ MASK:3]`), as a hint."""
    word = head.lstrip("[<{(")
    if not any(c.isalpha() for c in word):
        return ""
    pattern = r"[\[<{(]\s*" + re.escape(word) + r"\s*(?::\s*(\d{1,%d})\s*)?[\]>})]" % MAX_DIGITS
    found = re.search(pattern, text, re.IGNORECASE)
    if found is None:
        return ""
    meant = f"{head}:{int(found.group(1))}{close}" if found.group(1) else head + close
    return f" (found {found.group(0)!r} at character {found.start()}: did you mean {meant}?)"


def _digits_end(text: str, j: int) -> int:
    """End of the run of ASCII digits from j (for literals without a closing bracket)."""
    while j < len(text) and text[j] in "0123456789":
        j += 1
    return j
