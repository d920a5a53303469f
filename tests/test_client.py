"""The server's client (client.py, README.md: Serving, From the CLI): how few round trips
a fill takes, what it reads and retries, how a batch loses only what fails, and what its
errors show. Against the real `perceiver serve` on the small model, through a recording
proxy in front of it, and against small stand-in servers for answers a real one never
gives (a huge answer, a malformed Retry-After, an /info that is not an object).
"""

from __future__ import annotations

import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from perceiver_cli.cli import app
from perceiver_cli.client import MAX_ANSWER, AnswerTooLarge, Client, ServerError, retry_after, shown
from perceiver_cli.errors import InputError
from perceiver_cli.options import FillOptions, OptionError

from .serving import SMALL, Server, assert_close, perceiver, server_env

CLEAN = {"PERCEIVER_API_KEY": None, "PERCEIVER_MODEL": None, "PERCEIVER_SERVER": None, "PERCEIVER_DEBUG": None}


def fill(*args: str, env: dict | None = None):
    """`perceiver fill ARGS` in this process (the client path: quick)."""
    return CliRunner().invoke(app, ["fill", *args], prog_name="perceiver", env={**CLEAN, **(env or {})})


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    server = Server(SMALL, tmp_path_factory.mktemp("server"))
    yield server
    assert server.stop() == 0


class Stub:
    """A stand-in HTTP server on 127.0.0.1: `answer(handler, method, path, body)` returns
    (status, headers, body bytes) or None to hang up without an answer; every request is
    recorded as (method, path, body, raw Authorization header)."""

    def __init__(self, answer):
        self.requests: list[tuple[str, str, bytes, bytes | None]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self, method: str):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = self.headers.get("Authorization")
                stub.requests.append((method, self.path, body, None if key is None else key.encode("latin-1")))
                got = answer(self, method, self.path, body)
                if got is None:
                    self.close_connection = True
                    return
                status, headers, payload = got
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", "Content-Length": str(len(payload)),
                                    **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                self.handle_one("GET")

            def do_POST(self):
                self.handle_one("POST")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self) -> list[tuple[str, str]]:
        return [(method, path) for method, path, _, _ in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def proxy(target: Server, fills_answered: int | None = None) -> Stub:
    """A recording proxy in front of `target`; after `fills_answered` POSTs it hangs up on
    every request (a server lost mid-run)."""
    import http.client

    def forward(handler, method, path, body):
        posts = sum(1 for m, _, _, _ in stub.requests if m == "POST")
        if fills_answered is not None and posts > fills_answered:
            return None
        conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=300)
        headers = {k: v for k, v in handler.headers.items() if k.lower() in ("content-type", "authorization")}
        conn.request(method, path, body=body or None, headers=headers)
        response = conn.getresponse()
        payload = response.read()
        conn.close()
        return response.status, {}, payload

    stub = Stub(forward)
    return stub


def info_answer(**extra) -> bytes:
    return json.dumps({"model": "stub/model", "revision": "main", "commit": None, "max_position_embeddings": 128,
                       "max_body": 4 << 20, **extra}).encode()


# -- round trips --------------------------------------------------------------------------------


def test_a_fill_asks_info_once_and_then_fills(small_server):
    recorder = proxy(small_server)
    try:
        for args in (["-m", str(SMALL), "a [MASK:2]."], ["a [MASK:2]."], ["--json", "-k", "2", "b [MASK] c"]):
            recorder.requests.clear()
            result = fill("--server", recorder.url, *args)
            assert result.exit_code == 0, result.stderr
            assert recorder.paths() == [("GET", "/info"), ("POST", "/v1/fill")], args
        recorder.requests.clear()
        batch = CliRunner().invoke(app, ["fill", "--server", recorder.url, "--batch", "-", "--json"],
                                   input="a [MASK:2].\nb [MASK] c\nno marker\n", env=CLEAN, prog_name="perceiver")
        assert batch.exit_code == 1 and len(batch.stdout.splitlines()) == 3
        assert recorder.paths() == [("GET", "/info"), ("POST", "/v1/fill")]
    finally:
        recorder.close()


def test_options_are_judged_by_the_servers_window_as_the_model_judges_them(small_server):
    from perceiver_cli.filler import MaskFiller

    model = MaskFiller.from_pretrained(str(SMALL), device="cpu")
    recorder = proxy(small_server)
    try:
        for options in (FillOptions(max_span=model.window + 1), FillOptions(choices=("x" * (model.window + 1),))):
            with pytest.raises(OptionError) as local:
                model.check(options)
            with pytest.raises(OptionError) as served:
                Client(recorder.url).check(options)
            assert str(served.value) == str(local.value)
        assert Client(recorder.url).check(FillOptions(max_span=model.window)).max_span == model.window
        assert recorder.paths() == [("GET", "/info")] * 3  # no fill was sent to be judged
        result = fill("--server", recorder.url, "--max-span", str(model.window + 1), "a [MASK]")
        assert result.exit_code == 2 and result.stderr == (
            f"error: --max-span must be between 1 and {model.window} bytes, this model's window "
            f"(got {model.window + 1})\n")
    finally:
        recorder.close()


def test_the_model_mismatch_names_where_the_model_came_from(small_server):
    by_option = fill("--server", small_server.url, "-m", "x/y", "a [MASK:2].")
    assert by_option.exit_code == 2 and by_option.stderr == (
        f"error: --model x/y is not the model of the server at {small_server.url}, which serves {SMALL}: "
        "drop --model (or --server), or start a server with that model\n")
    by_env = fill("--server", small_server.url, "a [MASK:2].", env={"PERCEIVER_MODEL": "x/y"})
    assert by_env.exit_code == 2 and by_env.stderr == (
        f"error: PERCEIVER_MODEL=x/y is not the model of the server at {small_server.url}, which serves {SMALL}: "
        "unset PERCEIVER_MODEL (or --server), or start a server with that model\n")


# -- batches lose only what fails -----------------------------------------------------------------


def test_a_batch_refused_for_its_size_is_split_down_to_the_line_that_fails(tmp_path):
    """A server with a tiny --max-body-mb and --max-inputs: every line that fits alone is
    filled as in-process; a line whose body, or whose model inputs, are over the limit
    alone is that line's error, and the run ends as an in-process run with a failed line."""
    server = Server(SMALL, tmp_path, "--max-inputs", "30", "--max-body-mb", "0.002")
    recorder = proxy(server)
    try:
        ok = ["The capital of France is [MASK:6].", "She went to the [MASK] yesterday.", "a [MASK:3] b",
              "caf\u00e9 [MASK:2] na\u00efve", "We [MASK:4] home.", "It was a [MASK] day."]
        wide = "x" * 2500 + " [MASK:3]"  # a request body over 2 KiB on its own
        lines = ok + [wide] + ok[:3]
        source = tmp_path / "in.txt"
        source.write_text("\n".join(lines) + "\n")
        env = server_env(tmp_path)
        args = ["--batch", str(source), "--json", "--batch-size", "2"]
        served = perceiver(["fill", "--server", recorder.url, *args], env)
        alone = perceiver(["fill", "-m", str(SMALL), "--device", "cpu", "--threads", "1", *args], env)
        assert alone.returncode == 0, alone.stderr
        got = [json.loads(x) for x in served.stdout.splitlines()]
        want = [json.loads(x) for x in alone.stdout.splitlines()]
        assert len(got) == len(lines) and [n for n, r in enumerate(got) if "error" in r] == [6]
        assert "larger than the server's limit" in got[6]["error"]
        assert_close(got[:6] + got[7:], want[:6] + want[7:])  # fills equal; batched otherwise: floats within noise
        posts = [body for method, _, body, _ in recorder.requests if method == "POST"]
        assert max(len(body) for body in posts if b"xxxx" not in body) <= 2097  # split before sending
        # the same summary and exit status as an in-process run whose line 7 fails
        source.write_text("\n".join(ok + ["no marker here"] + ok[:3]) + "\n")
        in_process = perceiver(["fill", "-m", str(SMALL), "--device", "cpu", "--threads", "1", *args], env)
        assert served.returncode == in_process.returncode == 1
        assert served.stderr == in_process.stderr == b"9 filled, 1 failed\n"

        # a request over --max-inputs (one model input a masked byte, here) is split the same way
        options = FillOptions(iterative_passes=None)
        texts = [f"line {n} [MASK:2]." for n in range(20)]  # 2 inputs each, 38 together: over 30
        texts[5] = "a [MASK:40] b"  # 40 inputs alone
        recorder.requests.clear()
        results = Client(recorder.url).fill_many(texts, options, return_errors=True)
        assert isinstance(results[5], InputError) and re.search(r"max[-_]inputs", str(results[5]))
        from perceiver_cli.filler import MaskFiller

        model = MaskFiller.from_pretrained(str(SMALL), device="cpu")
        expected = model.fill_many(texts[:5] + texts[6:], options)
        assert_close([r.to_dict() for r in results[:5] + results[6:]], [r.to_dict() for r in expected])
        assert len(recorder.requests) >= 3  # refused whole, then in halves
    finally:
        recorder.close()
        assert server.stop() == 0


def test_a_server_lost_mid_batch_says_to_resume_and_the_resumed_file_is_whole(small_server, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("".join(f"line {n} has a [MASK:3] in it\n" for n in range(12)))
    env = server_env(tmp_path)
    whole = perceiver(["fill", "--server", small_server.url, "--batch", str(source), "--json", "--batch-size", "1"], env)
    assert whole.returncode == 0, whole.stderr
    dying = proxy(small_server, fills_answered=1)  # answers the first request of 4 lines, then is gone
    try:
        lost = perceiver(["fill", "--server", dying.url, "--batch", str(source), "--json", "--batch-size", "1",
                          "-o", "out.jsonl"], env, cwd=tmp_path)
    finally:
        dying.close()
    assert lost.returncode == 1
    line = lost.stderr.decode()
    assert line.count("\n") == 1 and line.startswith(f"error: cannot reach the server at {dying.url}: ")
    assert line.endswith(" (4 lines written to out.jsonl; run again with --resume to go on)\n")
    again = perceiver(["fill", "--server", small_server.url, "--batch", str(source), "--json", "--batch-size", "1",
                       "-o", "out.jsonl", "--resume"], env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "out.jsonl").read_bytes() == whole.stdout


# -- what the client reads --------------------------------------------------------------------------


def test_an_answer_longer_than_the_client_reads_is_refused_unread():
    def answer(handler, method, path, body):
        if path == "/info":
            return 200, {}, info_answer()
        if b"chunked" in body:  # no length said: the client counts what comes
            return 200, {"Content-Length": "5000"}, b"[" + b" " * 4998 + b"]"
        handler.send_response(200)  # a length no client should read, and nothing sent
        handler.send_header("Content-Length", str(10**12))
        handler.end_headers()
        handler.close_connection = True
        return None

    stub = Stub(answer)
    try:
        result = fill("--server", stub.url, "a [MASK:2] b")
        assert result.exit_code == 1 and result.stdout == ""
        assert result.stderr == (f"error: the server at {stub.url} answered more than {MAX_ANSWER:,} bytes, "
                                 "the most this client reads: ask for less at a time\n")
        small = Client(stub.url, max_answer=1000)
        with pytest.raises(AnswerTooLarge):
            small.fill("chunked [MASK]")
        stub.requests.clear()
        got = small.fill_many(["chunked [MASK]", "chunked [MASK:2]"], return_errors=True)
        assert [type(r) for r in got] == [InputError, InputError] and "more than 1,000 bytes" in str(got[0])
        assert len(stub.requests) == 3  # both, then each alone
    finally:
        stub.close()


def test_malformed_retry_after_and_an_info_that_is_not_an_object():
    assert [retry_after(v) for v in ("\u00b2", "-5", "1e999", "nan", "3", "100", None, "Wed, 21 Oct 2015 07:28:00 GMT",
                                     " 0.5 ")] == [1.0, 0.05, 1.0, 1.0, 3.0, 5.0, 1.0, 1.0, 0.5]
    busy = iter(["\u00b2", "-1", "1e999"])

    def answer(handler, method, path, body):
        if path == "/info":
            return 200, {}, b"[1, 2]"
        after = next(busy, None)
        if after is not None:
            return 503, {"Retry-After": after}, b'{"error": "busy"}'
        return 200, {}, b"[]"

    stub = Stub(answer)
    try:
        client = Client(stub.url)
        assert client.request("POST", "/v1/fill", {"texts": []}) == []  # after three busy answers
        assert client.check(FillOptions()) == FillOptions()  # the server's fill will judge
        with pytest.raises(ServerError, match="does not say which model it serves"):
            client.check(FillOptions(), model="stub/model")
        with pytest.raises(ServerError, match="answered /info with something that is not a perceiver server's"):
            client.info()
    finally:
        stub.close()


# -- what errors show, and the key ------------------------------------------------------------------


def test_errors_never_show_credentials_of_the_url():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = fill("--server", f"http://user:s3cret@127.0.0.1:{port}", "a [MASK:2]")
    assert down.exit_code == 1 and "s3cret" not in down.stderr and "user" not in down.stderr
    assert down.stderr.startswith(f"error: cannot reach the server at http://127.0.0.1:{port}: ")
    bad = fill("--server", "http://user:s3cret@[::1", "a [MASK:2]")
    assert bad.exit_code == 2 and "s3cret" not in bad.stderr and "[::1" in bad.stderr
    assert shown("user:pw@host:8000/x@y") == "host:8000/x@y" and shown("https://a@b/c") == "https://b/c"
    stub = Stub(lambda handler, method, path, body: (401, {}, b'{"error": "wrong API key"}'))
    try:
        with pytest.raises(ServerError) as refused:
            Client(stub.url.replace("://", "://me:pw@")).info()
        assert ":pw@" not in str(refused.value) and stub.url in str(refused.value)
    finally:
        stub.close()


def test_the_key_is_sent_as_utf8_and_a_blank_one_is_refused(tmp_path):
    stub = Stub(lambda handler, method, path, body: (200, {}, info_answer()))
    try:
        for key in ("plain-key", "cl\u00e9-\u043a\u043b\u044e\u0447-\U0001f511"):  # Latin-1, and far beyond it
            Client(stub.url, key).info()
            assert stub.requests[-1][3] == b"Bearer " + key.encode("utf-8")
    finally:
        stub.close()
    blank = fill("--server", "http://127.0.0.1:9", "a [MASK:2]", env={"PERCEIVER_API_KEY": "   "})
    assert blank.exit_code == 2
    assert blank.stderr == "error: PERCEIVER_API_KEY is blank: an API key must hold printable characters\n"
    key = "cl\u00e9-\u043a\u043b\u044e\u0447"
    server = Server(SMALL, tmp_path, env={"PERCEIVER_API_KEY": key})
    try:
        env = server_env(tmp_path, PERCEIVER_SERVER=server.url)
        ok = perceiver(["fill", "Hello [MASK:3] world"], {**env, "PERCEIVER_API_KEY": key})
        assert ok.returncode == 0 and ok.stdout.startswith(b"Hello"), ok.stderr
        wrong = perceiver(["fill", "Hello [MASK:3] world"], {**env, "PERCEIVER_API_KEY": "cl\u00e9"})
        assert wrong.returncode == 1 and b"refused" in wrong.stderr
    finally:
        assert server.stop() == 0

