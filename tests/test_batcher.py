"""The batcher (perceiver_cli/batcher.py) in-process, driven by a fake compute: answers in
order, batching, gone clients, the per-request input budget, a failed merged batch, a full
queue, close and abort. No model, no HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest

from perceiver_cli.batcher import Batcher, Cancelled, QueueFull, TooMuchWork

WAIT = 10.0  # seconds a test waits for something that happens at once


@dataclass(frozen=True)
class Job:
    name: str
    key: str = "a"
    inputs: int = 1  # what one pass of it takes
    passes: int = 1
    fails: bool = False  # its computation raises, with whatever it is batched with


class Fake:
    """A compute that records what it was given, answers each job with its name in capitals,
    and can be held at its start (`hold`) or made slow (`pass_s`)."""

    def __init__(self, pass_s: float = 0.0):
        self.calls: list[list[str]] = []
        self.passes = 0
        self.pass_s = pass_s
        self.started = threading.Event()
        self.hold = threading.Event()
        self.hold.set()

    def __call__(self, jobs: list[Job], before_pass) -> list:
        self.calls.append([j.name for j in jobs])
        self.started.set()
        assert self.hold.wait(WAIT)
        for _ in range(max(j.passes for j in jobs)):
            before_pass(sum(j.inputs for j in jobs))
            self.passes += 1
            time.sleep(self.pass_s)
        if any(j.fails for j in jobs):
            raise ValueError("a job in this batch fails")
        return [j.name.upper() for j in jobs]


def batcher(compute, **changes) -> Batcher:
    knobs = dict(key=lambda job: job.key, max_batch=16, batch_wait=0.01, queue_size=64, max_inputs=1000)
    b = Batcher(compute, **{**knobs, **changes})
    b.start()
    return b


async def outcome(b: Batcher, job: Job, gone=None):
    """The job's answer, or the exception its submission raised."""
    try:
        return await b.submit(job, 1, gone)
    except Exception as e:  # noqa: BLE001 - the test looks at it
        return e


async def until(condition) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def queued_behind(b: Batcher, fake: Fake, jobs: list[Job], gone: dict | None = None) -> list:
    """Submit a job "first" and, while the fake holds it at its start, `jobs` (with the `gone`
    of their name): they wait in the queue together. The futures of their outcomes, first's
    first; the fake still holds."""
    fake.hold.clear()
    futures = [asyncio.ensure_future(outcome(b, Job("first")))]
    await until(fake.started.is_set)
    futures += [asyncio.ensure_future(outcome(b, job, (gone or {}).get(job.name))) for job in jobs]
    await until(lambda: b.waiting == len(jobs))
    return futures


def test_each_request_gets_its_own_answer():
    fake = Fake()

    async def main():
        b = batcher(fake, max_batch=5)
        jobs = [Job(f"job{i}", key="ab"[i % 2]) for i in range(40)]
        answers = await asyncio.gather(*(outcome(b, j) for j in jobs))
        b.close()
        return jobs, answers

    jobs, answers = asyncio.run(main())
    assert answers == [j.name.upper() for j in jobs]
    assert sorted(n for call in fake.calls for n in call) == sorted(j.name for j in jobs)  # each computed once
    assert len(fake.calls) < len(jobs)  # and they shared computations


def test_requests_that_arrive_together_run_together_up_to_max_batch():
    fake = Fake()

    async def main():
        b = batcher(fake, max_batch=4, batch_wait=0.05)
        futures = await queued_behind(b, fake, [Job(f"n{i}", key="ab"[i in (1, 2)]) for i in range(6)])
        fake.hold.set()
        answers = await asyncio.gather(*futures)
        await until(lambda: b.batches == 3)  # counted once its answers are out
        b.close()
        return answers

    answers = asyncio.run(main())
    assert answers == ["FIRST", "N0", "N1", "N2", "N3", "N4", "N5"]
    # the second batch takes 4 requests (max_batch), a computation per key in the order they came
    assert fake.calls == [["first"], ["n0", "n3"], ["n1", "n2"], ["n4", "n5"]]


def test_the_work_of_a_client_gone_before_it_starts_is_dropped():
    fake = Fake()

    async def main():
        b = batcher(fake)
        hung_up = asyncio.Event()
        first, gone, stays = await queued_behind(b, fake, [Job("gone"), Job("stays")], {"gone": hung_up.wait})
        hung_up.set()
        assert isinstance(await gone, Cancelled)
        fake.hold.set()
        answers = await first, await stays
        b.close()
        return answers

    assert asyncio.run(main()) == ("FIRST", "STAYS")
    assert fake.calls == [["first"], ["stays"]]


def test_work_whose_clients_have_all_gone_stops_between_passes():
    fake = Fake(pass_s=0.01)

    async def main():
        b = batcher(fake)
        hung_up = asyncio.Event()
        long = asyncio.ensure_future(outcome(b, Job("long", passes=100_000), hung_up.wait))
        await until(lambda: fake.passes >= 3)
        hung_up.set()
        assert isinstance(await long, Cancelled)
        await until(lambda: b.running == 0)
        stopped_at = fake.passes
        assert await outcome(b, Job("next")) == "NEXT"  # the worker is free again
        b.close()
        return stopped_at

    stopped_at = asyncio.run(main())
    assert stopped_at < 1000


def test_work_goes_on_while_one_of_its_clients_remains():
    fake = Fake(pass_s=0.005)

    async def main():
        b = batcher(fake)
        hung_up = asyncio.Event()
        first, gone, stays = await queued_behind(b, fake, [Job("gone", passes=20), Job("stays", passes=20)],
                                                 {"gone": hung_up.wait})
        fake.hold.set()
        await until(lambda: fake.passes >= 3)
        hung_up.set()
        answers = await first, await gone, await stays
        b.close()
        return answers

    first, gone, stays = asyncio.run(main())
    assert (first, stays) == ("FIRST", "STAYS") and isinstance(gone, Cancelled)
    assert fake.calls == [["first"], ["gone", "stays"]]


def test_a_request_over_the_input_budget_fails_alone_and_merged_ones_are_rerun_with_their_own():
    fake = Fake()

    async def main():
        b = batcher(fake, max_inputs=10)
        # 4 + 4 + 11 + 4 together: over 10. Alone, only the one of 11 is.
        futures = await queued_behind(b, fake, [Job(name, inputs=n) for name, n in
                                                (("a", 4), ("b", 4), ("costly", 11), ("c", 4))])
        fake.hold.set()
        answers = [await f for f in futures]
        b.close()
        return answers

    first, a, b_, costly, c = asyncio.run(main())
    assert (first, a, b_, c) == ("FIRST", "A", "B", "C")
    assert isinstance(costly, TooMuchWork) and costly.limit == 10 and "more than 10 model inputs" in str(costly)
    assert fake.calls == [["first"], ["a", "b", "costly", "c"], ["a"], ["b"], ["costly"], ["c"]]


def test_the_budget_counts_every_pass_of_a_request():
    async def main():
        b = batcher(Fake(), max_inputs=10)
        answers = await outcome(b, Job("fits", inputs=2, passes=5)), await outcome(b, Job("over", inputs=2, passes=6))
        b.close()
        return answers

    fits, over = asyncio.run(main())
    assert fits == "FITS" and isinstance(over, TooMuchWork)


def test_a_failed_merged_batch_is_rerun_one_by_one():
    fake = Fake()

    async def main():
        b = batcher(fake)
        first, *later = await queued_behind(b, fake, [Job(n, fails=n == "bad") for n in ("x", "bad", "y")])
        fake.hold.set()
        answers = [await f for f in later]
        await first
        b.close()
        return answers

    x, bad, y = asyncio.run(main())
    assert (x, y) == ("X", "Y") and isinstance(bad, ValueError)
    assert fake.calls == [["first"], ["x", "bad", "y"], ["x"], ["bad"], ["y"]]


def test_a_full_queue_refuses_at_once():
    fake = Fake()

    async def main():
        b = batcher(fake, queue_size=2)
        futures = await queued_behind(b, fake, [Job("q0"), Job("q1")])
        with pytest.raises(QueueFull):
            await b.submit(Job("one too many"), 1)
        fake.hold.set()
        answers = [await f for f in futures]
        assert await outcome(b, Job("after")) == "AFTER"  # room again
        b.close()
        return answers

    assert asyncio.run(main()) == ["FIRST", "Q0", "Q1"]


def test_close_finishes_the_queued_work_then_the_worker_ends():
    fake = Fake()

    async def main():
        b = batcher(fake)
        futures = await queued_behind(b, fake, [Job("j1"), Job("j2")])
        b.close()
        fake.hold.set()
        answers = [await f for f in futures]
        await until(lambda: b.finished)
        return answers, b

    answers, b = asyncio.run(main())
    assert answers == ["FIRST", "J1", "J2"]
    b.thread.join(WAIT)
    assert not b.thread.is_alive()


def test_abort_stops_the_running_work_at_its_next_pass_and_drops_the_queued():
    fake = Fake(pass_s=0.01)

    async def main():
        b = batcher(fake)
        running = asyncio.ensure_future(outcome(b, Job("long", passes=100_000)))
        await until(lambda: fake.passes >= 3)
        queued = asyncio.ensure_future(outcome(b, Job("queued")))
        await until(lambda: b.waiting == 1)
        b.abort()
        assert b.finished
        return await running, await queued, b

    running, queued, b = asyncio.run(main())
    assert isinstance(running, Cancelled) and isinstance(queued, Cancelled)
    b.thread.join(WAIT)
    assert not b.thread.is_alive() and fake.calls == [["long"]] and fake.passes < 1000


def test_the_worker_outlives_a_compute_that_answers_wrongly():
    async def main():
        b = batcher(lambda jobs, before_pass: [])
        answer = await outcome(b, Job("x"))
        alive = b.thread.is_alive()
        b.close()
        return answer, alive

    answer, alive = asyncio.run(main())
    assert isinstance(answer, RuntimeError) and "answered 0 jobs of 1" in str(answer) and alive


def test_the_batcher_imports_nothing_of_the_server_http_or_torch():
    import subprocess
    import sys

    code = ("import sys, perceiver_cli.batcher; print(sorted(m for m in ('torch', 'starlette', 'uvicorn', "
            "'perceiver_cli.serve', 'perceiver_cli.filler') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
