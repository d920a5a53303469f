"""Windowing (windows.Layout) on its own: which model inputs a long document becomes.

A model input holds at most `window` = max_position_embeddings - 2 document bytes between
[CLS] and [SEP]. Spans close enough to share a window share one, centred on them; every
other byte of a window is the document's own byte at that place.
"""

from __future__ import annotations

import random

import pytest
import torch

from perceiver_cli import masks, tokenizer
from perceiver_cli.filler import MaskFiller
from perceiver_cli.model import PerceiverConfig, PerceiverMaskedLM
from perceiver_cli.windows import Layout

MAX_POSITIONS = 34  # a window of 32 bytes


@pytest.fixture(scope="module")
def window_filler() -> MaskFiller:
    """A random model whose window holds 32 bytes: the layouts depend on its window only."""
    cfg = PerceiverConfig(num_latents=4, d_latents=16, d_model=8, num_self_attends_per_block=1,
                          num_self_attention_heads=2, num_cross_attention_heads=2, qk_channels=8, v_channels=16,
                          max_position_embeddings=MAX_POSITIONS)
    torch.manual_seed(0)
    return MaskFiller(PerceiverMaskedLM(cfg).eval())


def document(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghij ") for _ in range(n))


def check_windows(filler: MaskFiller, text: str, lengths: list[int]):
    template = masks.parse(text)
    jobs = Layout(template, lengths, filler.window).jobs()
    doc_ids: list[int] = []  # the whole document, spans masked
    starts = []
    for piece, n in zip(template.pieces, lengths):
        doc_ids += tokenizer.byte_ids(piece)
        starts.append(len(doc_ids))
        doc_ids += [tokenizer.MASK] * n
    doc_ids += tokenizer.byte_ids(template.pieces[-1])
    covered = []
    for job in jobs:
        assert job.ids[0] == tokenizer.CLS and job.ids[-1] == tokenizer.SEP
        body = job.ids[1:-1]
        assert len(body) <= filler.window == MAX_POSITIONS - 2
        # the window is one contiguous stretch of the document
        first_span, (first_pos, _) = job.targets[0], job.spans[0]
        begin = starts[first_span] - (first_pos - 1)
        assert body == doc_ids[begin : begin + len(body)]
        assert len(body) == min(filler.window, len(doc_ids))
        for s, (pos, n) in zip(job.targets, job.spans):
            assert job.ids[pos : pos + n] == [tokenizer.MASK] * n and n == lengths[s]
            assert pos - 1 + begin == starts[s]
        covered += job.targets
    assert sorted(covered) == list(range(len(lengths)))  # every span in exactly one window
    return jobs


def test_a_document_that_fits_is_one_window_holding_all_of_it(window_filler):
    jobs = check_windows(window_filler, "ab [MASK:3] cd [MASK:2] e", [3, 2])
    assert len(jobs) == 1 and len(jobs[0].ids) == len(b"ab") + 3 + len(b" cd") + 2 + len(b" e") + 2


def test_far_apart_spans_get_windows_of_their_own_centred_on_them(window_filler):
    text = document(100, 1) + " [MASK:4] " + document(100, 2) + " [MASK:4] " + document(100, 3)
    jobs = check_windows(window_filler, text, [4, 4])
    assert len(jobs) == 2
    for job in jobs:
        (pos, n), = job.spans
        before, after = pos - 1, window_filler.window - (pos - 1 + n)
        assert abs(before - after) <= 1  # as much context on each side


def test_nearby_spans_share_a_window(window_filler):
    text = document(60, 4) + " [MASK:3] ab [MASK:3] " + document(60, 5)
    jobs = check_windows(window_filler, text, [3, 3])
    assert len(jobs) == 1 and jobs[0].targets == [0, 1]


def test_a_span_at_the_very_start_or_end_gets_the_context_on_its_one_side(window_filler):
    text = "[MASK:2]" + document(200, 6) + " [MASK:5]"
    jobs = check_windows(window_filler, text, [2, 5])
    assert [job.spans[0][0] for job in jobs] == [1, window_filler.window - 5 + 1]


@pytest.mark.parametrize("seed", range(5))
def test_random_documents_and_spans(window_filler, seed):
    rng = random.Random(seed)
    parts, lengths = [], []
    for _ in range(rng.randint(1, 6)):
        parts.append(document(rng.randint(0, 80), seed * 10 + len(parts)))
        n = rng.randint(1, 12)
        parts.append(f"[MASK:{n}]")
        lengths.append(n)
    parts.append(document(rng.randint(0, 80), seed))
    check_windows(window_filler, "".join(parts), lengths)


@pytest.mark.parametrize("seed", range(8))
def test_the_window_of_one_changed_span_is_the_window_a_whole_new_layout_gives(seed):
    """Layout.job_of(s, n), used to score candidate lengths, equals rebuilding everything."""
    rng = random.Random(seed)
    parts, lengths = [], []
    for k in range(rng.randint(1, 12)):
        parts.append(document(rng.randint(0, 40), seed * 100 + k))
        parts.append("[MASK]")
        lengths.append(rng.randint(1, 16))
    parts.append(document(rng.randint(0, 40), seed))
    template = masks.parse("".join(parts))
    base = Layout(template, lengths, 32)
    for s in range(len(lengths)):
        for n in range(1, 17):
            trial = lengths[:s] + [n] + lengths[s + 1 :]
            want = next(job for job in Layout(template, trial, 32).jobs() if s in job.targets)
            got = base.job_of(s, n)
            assert (got.ids, got.spans, got.targets) == (want.ids, want.spans, want.targets)
