"""Windows: the model inputs that cover the spans of one text.

A model input holds at most `window` = max_position_embeddings - 2 document bytes between
`[CLS]` and `[SEP]`. A document that fits is one window: exactly the reference's input.
A longer one gets a window per group of nearby spans (grouped left to right: a span joins
the current group while the group, it included, fits in a window), centred on the group
and holding as much context as fits.

`Layout` is a text at given span lengths. Auto length scores each candidate length of each
`[MASK]` with its own pass: `Layout.job_of(s, n)` gives the window span s would be in at
length n, exactly as a new layout would, but in time of the window's size rather than
the document's: rebuilding whole documents made length choice quadratic in the number of
markers (a 12 KB document of 500 `[MASK]` sentences took 3.6 s, 2.7 s of it rebuilding).
"""

from __future__ import annotations

from .masks import Template
from .strategies import Job
from .tokenizer import CLS, MASK, SEP, byte_ids


class Layout:
    def __init__(self, template: Template, lengths: list[int], window: int):
        self.template, self.lengths, self.window = template, list(lengths), window
        ids: list[int] = []
        starts: list[int] = []  # where each span begins in the masked document
        for piece, n in zip(template.pieces, lengths):
            ids += byte_ids(piece)
            starts.append(len(ids))
            ids += [MASK] * n
        ids += byte_ids(template.pieces[-1])
        self.ids, self.starts = ids, starts
        self.groups: list[list[int]] = []
        self.group_of: list[int] = []  # span -> index in groups
        for s in range(len(lengths)):
            if self.groups and starts[s] + lengths[s] - starts[self.groups[-1][0]] <= window:
                self.groups[-1].append(s)
            else:
                self.groups.append([s])
            self.group_of.append(len(self.groups) - 1)

    def jobs(self) -> list[Job]:
        """One job per window, covering every span once."""
        return [self._job(group, self.starts, self.lengths, len(self.ids), lambda a, b: self.ids[a:b])
                for group in self.groups]

    def job_of(self, s: int, n: int) -> Job:
        """The job holding span `s` if its length were `n`, the others unchanged: what
        `Layout(template, lengths with n at s, window).jobs()` gives for `s`."""
        delta = n - self.lengths[s]
        lengths = self.lengths[:s] + [n] + self.lengths[s + 1 :]
        starts = self.starts[: s + 1] + [p + delta for p in self.starts[s + 1 :]]
        group = [s]
        if s > 0:  # spans before s are grouped as they are now; s may join the group of s - 1
            before = self.groups[self.group_of[s - 1]]
            if starts[s] + n - starts[before[0]] <= self.window:
                group = [k for k in before if k < s] + [s]
        for k in range(s + 1, len(lengths)):
            if starts[k] + lengths[k] - starts[group[0]] > self.window:
                break
            group.append(k)
        cut, end = self.starts[s], self.starts[s] + self.lengths[s]  # the span's bytes in self.ids

        def ids(a: int, b: int) -> list[int]:  # bytes a..b of the document with span s at length n
            head = self.ids[min(a, cut) : min(b, cut)]
            masked = [MASK] * max(0, min(b, cut + n) - max(a, cut))
            tail = self.ids[max(a - delta, end) : max(b - delta, end)]
            return head + masked + tail

        return self._job(group, starts, lengths, len(self.ids) + delta, ids)

    def _job(self, group: list[int], starts: list[int], lengths: list[int], total: int, ids) -> Job:
        first, last = group[0], group[-1]
        lo, hi = starts[first], starts[last] + lengths[last]
        begin = max(0, min(lo - (self.window - (hi - lo)) // 2, total - self.window))
        return Job(
            ids=[CLS, *ids(begin, begin + self.window), SEP],
            spans=[(starts[k] - begin + 1, lengths[k]) for k in group],
            targets=list(group),
        )
