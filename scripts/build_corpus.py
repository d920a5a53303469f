"""Build a small English corpus from text that Debian packages ship, split by document.

Sources (English prose, freely redistributable, fetched with the ordinary apt client):

- `python3.11-doc`: the reStructuredText sources of the Python documentation
  (`usr/share/doc/python3.11/html/_sources/**/*.rst.txt`); one document per file;
- `fortunes` and `fortunes-min`: the fortune cookie files (`usr/share/games/fortunes/*`,
  cookies separated by `%` lines); one document per cookie. ASCII-art files are skipped.

Fetch them without installing anything (as root, no sandbox needed):

    mkdir -p data/debs && cd data/debs
    apt-get update && apt-get download python3.11-doc fortunes fortunes-min
    for f in *.deb; do dpkg -x "$f" ../root; done

Then:

    python scripts/build_corpus.py --root data/root --out data/corpus \
        --cases-out tests/assets/eval

Writes `data/corpus/{train,valid,test}.txt`: one paragraph per line (markup removed,
whitespace collapsed, ASCII only). A document goes wholly to one split, chosen by a hash
of its name (90 / 5 / 5), so no sentence of the test split was seen in training.
With `--cases-out`, also writes the evaluation cases `{valid,test}.jsonl`: single
sentences with ONE masked word each (the word's leading space included in the span),
`{"prefix": ..., "answer": " word", "suffix": ...}`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from pathlib import Path

SKIP_FORTUNES = {"art", "ascii-art", "translate-me", "perl"}  # pictures, non-English, code
MAX_SENTENCE = 120  # bytes: an evaluation sentence must fit the small model's 126-byte window

# reST inline markup -> plain text
_ROLE_TARGET = re.compile(r":[\w:+-]+:`([^`<]*?)\s*<[^`>]*>`")  # :ref:`text <target>`
_ROLE = re.compile(r":[\w:+-]+:`!?~?([^`]*)`")  # :func:`name`
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`__?")  # `text <url>`_
_REF = re.compile(r"`([^`]+)`_{1,2}")  # `ref`_
_LITERAL = re.compile(r"``([^`]+)``")
_DEFAULT_ROLE = re.compile(r"`([^`]+)`")
_EMPH = re.compile(r"\*\*?([^*\s][^*]*?)\*\*?")
_SUBST = re.compile(r"\|([\w-]+)\|")
_FOOT = re.compile(r"\s*\[(#\w*|\d+|\*)\]_")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def split_of(name: str) -> str:
    h = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 100
    return "test" if h < 5 else "valid" if h < 10 else "train"


def clean_inline(text: str) -> str:
    text = _ROLE_TARGET.sub(r"\1", text)
    text = _ROLE.sub(lambda m: m.group(1).split(".")[-1] if m.group(0).find("~") >= 0 else m.group(1), text)
    text = _LINK.sub(r"\1", text)
    text = _REF.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _DEFAULT_ROLE.sub(r"\1", text)
    text = _EMPH.sub(r"\1", text)
    text = _SUBST.sub(r"\1", text)
    text = _FOOT.sub("", text)
    text = text.replace("::", ":")
    return re.sub(r"\s+", " ", text).strip()


def prose_ratio(text: str) -> float:
    return sum(c.isalpha() or c in " ,.;:'\"?!-()" for c in text) / max(1, len(text))


def rst_paragraphs(source: str) -> list[str]:
    """Prose paragraphs of a reST file: directives, code, tables and titles dropped."""
    out = []
    for block in re.split(r"\n\s*\n", source):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        indent = len(lines[0]) - len(lines[0].lstrip())
        first = lines[0].strip()
        if indent > 3 or first.startswith(("..", ">>>", "$", "+-", "|", "=", "-", "*" * 3, "#", "%")):
            continue
        if first.startswith(("* ", "- ", "#. ")):  # a list item: keep its text
            lines[0] = lines[0].lstrip()[2:]
        if len(lines) > 1 and set(lines[1].strip()) <= set("=-~^*#+\"'`"):  # a section title
            continue
        text = clean_inline(" ".join(line.strip() for line in lines))
        if len(text.split()) < 6 or prose_ratio(text) < 0.93 or not text.isascii():
            continue
        out.append(text)
    return out


def fortune_documents(path: Path) -> list[tuple[str, str]]:
    raw = path.read_text(encoding="utf-8", errors="replace")
    docs = []
    for i, cookie in enumerate(re.split(r"\n%\n", raw)):
        lines = [line.strip() for line in cookie.split("\n") if line.strip()]
        lines = [line for line in lines if not line.startswith("--")]  # attributions
        text = re.sub(r"\s+", " ", " ".join(lines)).strip()
        if len(text.split()) < 6 or prose_ratio(text) < 0.93 or not text.isascii():
            continue
        docs.append((f"fortunes/{path.name}/{i}", text))
    return docs


def sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(paragraph) if s.strip()]


_WORD = re.compile(r"(?<= )[A-Za-z]+(?![A-Za-z0-9_'-])")


def make_case(sentence: str, rng: random.Random) -> dict | None:
    """One masked word (with its leading space) of a plain-English sentence, or None."""
    if not 30 <= len(sentence) <= MAX_SENTENCE or prose_ratio(sentence) < 0.95:
        return None
    if not sentence[0].isupper() or sentence[-1] not in ".!?":
        return None
    words = [m for m in _WORD.finditer(sentence) if m.start() > 1 and len(m.group()) <= 15]
    if len(words) < 4:
        return None
    m = rng.choice(words)
    return {"prefix": sentence[: m.start() - 1], "answer": " " + m.group(), "suffix": sentence[m.end() :]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/root", help="where the .deb files were unpacked (dpkg -x)")
    ap.add_argument("--out", default="data/corpus")
    ap.add_argument("--cases-out", default=None, help="write {valid,test}.jsonl evaluation cases here")
    ap.add_argument("--cases", type=int, default=400, help="evaluation cases per split")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    root = Path(args.root)
    docs: list[tuple[str, list[str]]] = []
    for path in sorted((root / "usr/share/doc/python3.11/html/_sources").rglob("*.rst.txt")):
        paras = rst_paragraphs(path.read_text(encoding="utf-8", errors="replace"))
        if paras:
            docs.append((f"python-doc/{path.relative_to(root)}", paras))
    for path in sorted((root / "usr/share/games/fortunes").iterdir()):
        if path.suffix or path.is_dir() or path.name in SKIP_FORTUNES:
            continue
        docs += [(name, [text]) for name, text in fortune_documents(path)]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    ndocs = {k: 0 for k in splits}
    for name, paras in docs:
        splits[split_of(name)] += paras
        ndocs[split_of(name)] += 1
    for name, paras in splits.items():
        (out / f"{name}.txt").write_text("\n".join(paras) + "\n", encoding="utf-8")
        size = sum(len(p) + 1 for p in paras)
        print(f"{name}: {ndocs[name]} documents, {len(paras)} paragraphs, {size / 1e6:.2f} MB")

    if args.cases_out:
        cases_dir = Path(args.cases_out)
        cases_dir.mkdir(parents=True, exist_ok=True)
        for name in ("valid", "test"):
            rng = random.Random(f"{args.seed}-{name}")
            pool = sorted({s for p in splits[name] for s in sentences(p)})
            rng.shuffle(pool)
            cases = [c for c in (make_case(s, rng) for s in pool) if c][: args.cases]
            with open(cases_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for c in cases:
                    f.write(json.dumps(c) + "\n")
            print(f"{name} cases: {len(cases)} (from {len(pool)} sentences)")


if __name__ == "__main__":
    main()
