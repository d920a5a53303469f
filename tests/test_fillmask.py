"""The fill-mask task emulation (perceiver_cli/fillmask.py), in-process: its tokenizer equals
transformers' PerceiverTokenizer, and its answers, on our filler's log-probabilities, equal
transformers' pipeline("fill-mask") on the same random weights."""

from __future__ import annotations

import sys

import pytest

from perceiver_cli.errors import InputError
from perceiver_cli.fillmask import HF_TOP_K, hf_answer, hf_decode, hf_encode, hf_job, hf_target_ids

pytestmark = pytest.mark.usefixtures("one_thread")

TRICKY = [
    "plain [MASK] text", "[MASK]", "[[MASK]]", "a[MASK][MASK]b", "[mask] [MASK ] [MASK]",
    "café [MASK] naïve € 😀", "[CLS]x[SEP][PAD][BOS][EOS][MASK:3]", "tab\t\nnew[MASK]line\r\n", "",
    "[MASK][CLS", "\x00\x7f[MASK]",
]


@pytest.mark.parametrize("text", TRICKY)
def test_hf_tokenizer_emulation_matches_perceiver_tokenizer(text):
    from transformers import PerceiverTokenizer

    tok = PerceiverTokenizer()
    ids = tok(text)["input_ids"]
    assert hf_encode(text) == ids
    for skip in (False, True):
        assert hf_decode(ids, skip) == tok.decode(ids, skip_special_tokens=skip)
    for i in range(262):
        assert hf_decode([i]) == tok.decode([i])


@pytest.fixture(scope="module")
def pipeline(tiny_reference):
    from transformers import PerceiverTokenizer, pipeline

    return pipeline("fill-mask", model=tiny_reference, tokenizer=PerceiverTokenizer(), device="cpu")


@pytest.fixture(scope="module")
def filler(tiny_checkpoint):
    from perceiver_cli.filler import MaskFiller

    return MaskFiller.from_pretrained(str(tiny_checkpoint), device="cpu")


def test_target_ids_follow_the_pipeline(pipeline):
    for targets in (["a"], ["a", "b", "a"], ["zz", "é", "€", "[MASK]", " x"], ["", "q"], ["\u00ff", "\x00"]):
        assert hf_target_ids(targets) == list(pipeline.get_target_ids(targets))


def answer(filler, body: dict) -> list:
    job = hf_job(body, filler.model.cfg.max_position_embeddings)
    return hf_answer(job, filler.logprobs([(job.ids, job.positions)])[0])


def assert_same(ours, theirs) -> None:
    """Our answer against the pipeline's: one list, or a list of lists; scores within 1e-5."""
    assert type(ours) is list and len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        if isinstance(b, list):
            assert_same(a, b)
            continue
        assert set(a) == {"score", "token", "token_str", "sequence"}
        assert (a["token"], a["token_str"], a["sequence"]) == (b["token"], b["token_str"], b["sequence"])
        assert abs(a["score"] - b["score"]) < 1e-5


PARAMETERS = [{}, {"top_k": 1}, {"top_k": 9}, {"top_k": 262}, {"targets": ["a", "[SEP]", "zz", "é", "\x00"]},
              {"targets": "q", "top_k": 3}, {"targets": ["w", "W"], "top_k": 5}]


@pytest.mark.parametrize("text", [t for t in TRICKY if "[MASK]" in t] + ["Hello [MASK][MASK]rld, [PAD][MASK]ood bye."])
@pytest.mark.parametrize("params", PARAMETERS, ids=[str(p) for p in PARAMETERS])
def test_answers_equal_the_pipeline(filler, pipeline, text, params):
    ours = answer(filler, {"inputs": text, "parameters": params})
    theirs = pipeline(text, **params)
    assert_same(ours, theirs)
    masks = text.count("[MASK]")
    targets = params.get("targets")
    targets = [targets] if isinstance(targets, str) else targets
    per_mask = min(params.get("top_k", HF_TOP_K), 262 if targets is None else len(hf_target_ids(targets)))
    rows = ours if masks > 1 else [ours]
    assert len(rows) == masks and all(len(row) == per_mask for row in rows)


def test_scores_are_probabilities_best_first(filler):
    rows = answer(filler, {"inputs": "a [MASK] b [MASK]", "parameters": {"top_k": 262}})
    for row in rows:
        scores = [c["score"] for c in row]
        assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4


def test_a_fill_mask_answer_too_large_is_refused_before_any_work():
    with pytest.raises(InputError, match="the answer would hold 33012 candidates"):
        hf_job({"inputs": "[MASK]" * 126, "parameters": {"top_k": 262}}, 128)  # 28 MB of JSON
    assert len(hf_job({"inputs": "[MASK]" * 126, "parameters": {"top_k": 5}}, 128).positions) == 126


def test_the_emulation_imports_no_torch_and_nothing_of_http():
    import subprocess

    code = ("import sys, perceiver_cli.fillmask; "
            "print(sorted(m for m in ('torch', 'starlette', 'uvicorn', 'perceiver_cli.serve') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
