"""/v1/fill's request bodies and answers apart from HTTP (perceiver_cli/fillrequest.py),
in-process: the answer-size estimate bounds the real answers it is made for, and refuses
what would pass the cap before anything is filled."""

from __future__ import annotations

import pytest

from perceiver_cli.errors import InputError
from perceiver_cli.fillrequest import MAX_FILL_ANSWER, answer_bytes, check_answer_size, fill_job, result_json
from perceiver_cli.results import dumps

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_filler(tiny_checkpoint):
    from perceiver_cli.filler import MaskFiller

    return MaskFiller.from_pretrained(str(tiny_checkpoint), device="cpu")


TEXTS = ["a [MASK:3] b", "[MASK] and [MASK:7]", "no marker", "caf\u00e9 [MASK:2] na\u00efve \x01\x02 [MASK]",
         "x\udcff\udcfe [MASK:20]", "[MASK:60]", "The [MASK] sat on the [MASK].", "\x00[MASK]\udcff"]
OPTIONS = [{}, {"top_k": 5}, {"explain": True}, {"strategy": "oneshot", "top_k": 9, "explain": True},
           {"choices": ["cat", "elephant", "a"]}, {"max_span": 30, "strategy": "beam"}]


@pytest.mark.parametrize("detail", [False, True], ids=["objects", "detail"])
@pytest.mark.parametrize("options", OPTIONS, ids=[str(o) for o in OPTIONS])
def test_the_estimate_bounds_the_real_answer_closely(tiny_filler, options, detail):
    job = fill_job({"texts": TEXTS, "options": options, "detail": detail})
    results = tiny_filler.fill_many(job.texts, job.options, return_errors=True)
    assert len(dumps([result_json(r, job) for r in results])) <= answer_bytes(job)
    close = 0
    for text, result in zip(TEXTS, results):  # and text by text: within a few times what it is when
        alone = fill_job({"text": text, "options": options, "detail": detail})  # the lengths are known
        real = len(dumps(result_json(result, alone)))
        assert real <= answer_bytes(alone), text
        known = "choices" in options or "[MASK]" not in text  # a [MASK] is counted at max_span bytes
        if known and not isinstance(result, Exception):
            close += 1
            assert answer_bytes(alone) <= 8 * real + 400, (text, real, answer_bytes(alone))
    assert close >= 2


def test_an_answer_over_the_cap_is_refused_naming_what_to_ask_for():
    job = fill_job({"texts": ["[MASK:60]"] * 20_000, "options": {"explain": True, "top_k": 8}})  # 260 KB asks 370 MB
    assert answer_bytes(job) > MAX_FILL_ANSWER
    with pytest.raises(InputError, match=r"the answer would take about \d+ MiB, over the 64 MiB a /v1/fill") as e:
        check_answer_size(job)
    assert "fewer texts" in str(e.value) and "top_k" in str(e.value) and "explain off" in str(e.value)
    check_answer_size(fill_job({"texts": ["[MASK:60]"] * 20_000}))  # the same texts, plainly: fine


def test_the_answer_cap_is_the_budgets_max_answer_mb():
    from perceiver_cli.options import Budget

    assert MAX_FILL_ANSWER == Budget.max_answer_mb << 20  # one rule: the default, and the server's --max-answer-mb
    job = fill_job({"texts": ["[MASK:60]"] * 100, "options": {"explain": True}})
    assert 1 << 20 < answer_bytes(job) < MAX_FILL_ANSWER
    check_answer_size(job)
    with pytest.raises(InputError, match=r"over the 1 MiB a /v1/fill answer may take \(perceiver serve --max-answer-mb\)"):
        check_answer_size(job, Budget(max_answer_mb=1).max_answer_mb << 20)
