"""What `perceiver serve` shows its operators (observe.py, openapi.py): request ids and
timing headers on every answer, the access log, Prometheus metrics, the API document, CORS
and the warm-up; on a real server (a child process on 127.0.0.1) and a real client."""

from __future__ import annotations

import json
import re
import socket

import pytest

from perceiver_cli.observe import Metrics, Timing, access_line, escape, request_id
from perceiver_cli.openapi import document
from tests.serving import SMALL, Server

HEADERS = ("x-request-id", "x-queue-time", "x-inference-time", "x-total-time")
LINE = re.compile(r"(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<id>\S+) (?P<method>[A-Z]+) (?P<path>\S+) "
                  r"(?P<status>\d{3}) (?P<bytes>\d+)B total=(?P<total>[\d.]+)ms queue=(?P<queue>[\d.]+)ms "
                  r"compute=(?P<compute>[\d.]+)ms inputs=(?P<inputs>\d+)")


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    served = Server(tiny_checkpoint, tmp_path_factory.mktemp("observe"))
    yield served
    assert served.stop() == 0


def log_lines(server: Server) -> list[str]:
    return b"".join(server.stderr).decode().splitlines()


def log_of(server: Server, rid: str) -> str:
    """The access-log line of the request with id `rid` (waiting for it: the line is written
    once the answer has gone)."""
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = [line for line in log_lines(server) if f" {rid} " in line or f'"id": "{rid}"' in line]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no access-log line for {rid}: {log_lines(server)}")


# -- ids, headers, the log line: the parts ------------------------------------------------------


def test_a_sane_request_id_is_kept_and_any_other_replaced():
    assert request_id(b"abc-123_x.y:z") == "abc-123_x.y:z"
    for bad in (None, b"", b"a b", b"a\x1bb", b"x" * 129, "é".encode(), b"a\nb", b"\xff"):
        new = request_id(bad)
        assert re.fullmatch(r"[0-9a-f]{32}", new), (bad, new)
    assert request_id(None) != request_id(None)


def test_escape_writes_every_unprintable_character_as_an_escape():
    assert escape("/v1/fill") == "/v1/fill"
    assert escape("/a\x1b[31mb\n\x7f\u202e\\") == "/a\\x1b[31mb\\x0a\\x7f\\u202e\\\\"
    assert escape("/caf\u00e9") == "/caf\u00e9"


def test_an_access_line_holds_every_field_in_both_formats():
    timing = Timing("rid", queue_s=0.0015, compute_s=0.25, inputs=4)
    text = access_line("text", at=0.0, request_id="r\x1bid", method="POST", path="/v1/\nfill", status=200,
                       size=1234, timing=timing, total_s=0.2625)
    assert text == ("1970-01-01T00:00:00.000Z r\\x1bid POST /v1/\\x0afill 200 1234B total=262.5ms queue=1.5ms "
                    "compute=250.0ms inputs=4")
    line = access_line("json", at=0.0, request_id="rid", method="POST", path="/a\x1b", status=400, size=10,
                       timing=timing, total_s=0.3)
    assert "\n" not in line and "\x1b" not in line
    assert json.loads(line) == {"time": "1970-01-01T00:00:00.000Z", "id": "rid", "method": "POST", "path": "/a\\x1b",
                                "status": 400, "bytes": 10, "total_ms": 300.0, "queue_ms": 1.5, "compute_ms": 250.0,
                                "inputs": 4}


def test_a_computation_is_counted_once_and_shared_by_its_requests():
    metrics = Metrics({"model": "m", "device": "cpu"}, lambda: 7)
    a, b = Timing("a"), Timing("b")
    metrics.computed([a, b, None], [0.01, 0.002, 0.5], texts=3, inputs=6, seconds=0.2)
    metrics.computed([b], [9.0], texts=1, inputs=2, seconds=0.1)  # b run again alone: its wait is its first
    assert (a.queue_s, a.compute_s, a.inputs) == (0.01, 0.2, 6)
    assert (b.queue_s, b.compute_s, b.inputs) == (0.002, pytest.approx(0.3), 8)
    text = metrics.exposition().decode()
    assert "perceiver_inference_duration_seconds_count 2.0" in text
    assert "perceiver_batch_texts_sum 4.0" in text and "perceiver_batch_inputs_sum 8.0" in text
    assert "perceiver_queue_duration_seconds_count 2.0" in text  # a and b; the third had no request
    assert "perceiver_queue_depth 7.0" in text


def test_the_log_writer_never_waits_for_its_stream_and_says_what_it_dropped():
    import threading

    from perceiver_cli.observe import LineWriter

    writing, release, written = threading.Event(), threading.Event(), []

    def slow(text: str) -> None:  # a stream nobody reads, until `release`
        writing.set()
        release.wait()
        written.append(text)

    log = LineWriter(slow, backlog=3)
    log("line 0")
    assert writing.wait(10)  # the writer holds line 0, stuck in the stream
    for k in range(1, 10):
        log(f"line {k}")  # returns at once: 3 lines wait, 6 are dropped
    release.set()
    log.close()
    assert written == ["line 0\n", "access log: 6 lines dropped (stderr took them too slowly)\n",
                       "line 1\n", "line 2\n", "line 3\n"]


def test_the_batcher_reports_each_computation_with_its_requests_tags():
    import asyncio

    from perceiver_cli.batcher import Batcher

    seen = []

    def compute(jobs, before_pass):
        before_pass(2 * len(jobs))
        if "bad" in jobs and len(jobs) > 1:
            raise ValueError("fails merged")  # then each job runs alone
        return [j.upper() for j in jobs]

    def observe(items, inputs, started, seconds):
        seen.append(([w.tag for w in items], inputs, [started - w.queued for w in items], seconds))

    async def main():
        b = Batcher(compute, key=lambda job: 0, max_batch=16, batch_wait=0.2, queue_size=8, max_inputs=100,
                    observe=observe)
        b.start()
        answers = await asyncio.gather(*(b.submit(job, 1, tag=f"t-{job}") for job in ("a", "bad", "c")))
        b.close()
        return answers

    assert asyncio.run(main()) == ["A", "BAD", "C"]
    assert [(tags, inputs) for tags, inputs, _, _ in seen] == [
        (["t-a", "t-bad", "t-c"], 6),  # the merged computation that failed, reported too
        (["t-a"], 2), (["t-bad"], 2), (["t-c"], 2),  # each alone
    ]
    assert all(w >= 0 for _, _, waits, _ in seen for w in waits) and all(s >= 0 for *_, s in seen)


# -- on a real server -----------------------------------------------------------------------------


REQUESTS = [
    ("GET", "/health", None, None, 200),
    ("GET", "/info", None, None, 200),
    ("GET", "/metrics", None, None, 200),
    ("GET", "/openapi.json", None, None, 200),
    ("GET", "/docs", None, None, 200),
    ("GET", "/", None, {"Accept": "text/html"}, 200),
    ("GET", "/", None, None, 405),
    ("POST", "/", {"inputs": "a [MASK] b"}, None, 200),
    ("POST", "/v1/fill", {"text": "a [MASK] b"}, None, 200),
    ("POST", "/v1/fill", {"text": "no marker"}, None, 400),
    ("GET", "/nowhere", None, None, 404),
]


@pytest.mark.parametrize("method,path,body,headers,status", REQUESTS, ids=[f"{r[0]} {r[1]} {r[4]}" for r in REQUESTS])
def test_every_answer_carries_its_request_id_and_timing_headers(server, method, path, body, headers, status):
    got, answer_headers, payload, answer = server.request(method, path, body, headers={**(headers or {}),
                                                                                       "X-Request-ID": "req-1"})
    assert got == status, payload
    lower = {k.lower(): v for k, v in answer_headers.items()}
    assert lower["x-request-id"] == "req-1"
    for name in HEADERS[1:]:
        assert float(lower[name]) >= 0
    if status >= 400 and isinstance(answer, dict):
        assert answer["request_id"] == "req-1"  # an error names the id to quote


def test_model_work_reports_its_queue_and_inference_time(server):
    _, headers, _, _ = server.request("POST", "/v1/fill", {"text": "some words are [MASK:4] here"})
    lower = {k.lower(): v for k, v in headers.items()}
    assert float(lower["x-inference-time"]) > 0
    assert float(lower["x-total-time"]) >= float(lower["x-inference-time"]) + float(lower["x-queue-time"]) - 0.2
    _, headers, _, _ = server.request("GET", "/health")
    lower = {k.lower(): v for k, v in headers.items()}
    assert float(lower["x-inference-time"]) == 0 and float(lower["x-queue-time"]) == 0


def test_a_new_id_for_each_request_without_a_sane_one(server):
    ids = set()
    for given in (None, "has space", "x" * 200):
        _, headers, _, _ = server.request("GET", "/health", headers={"X-Request-ID": given} if given else {})
        ids.add({k.lower(): v for k, v in headers.items()}["x-request-id"])
    assert len(ids) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_one_access_log_line_per_request(server):
    server.request("POST", "/v1/fill", {"text": "a [MASK:3] b"}, headers={"X-Request-ID": "log-1"})
    match = LINE.fullmatch(log_of(server, "log-1"))
    assert match, log_of(server, "log-1")
    assert (match["id"], match["method"], match["path"], match["status"]) == ("log-1", "POST", "/v1/fill", "200")
    assert int(match["bytes"]) > 0 and int(match["inputs"]) > 0 and float(match["compute"]) > 0
    server.request("GET", "/nowhere?x=1", headers={"X-Request-ID": "log-2"})
    assert LINE.fullmatch(log_of(server, "log-2"))["status"] == "404"
    assert " /nowhere?x=1 " in log_of(server, "log-2")


def test_a_clients_control_characters_never_reach_the_log_raw(server):
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(b"GET /a%1b%0a HTTP/1.1\r\nHost: x\r\nX-Request-ID: evil\x1b[2J\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 404")
    rid = re.search(rb"x-request-id: ([0-9a-f]{32})", answer, re.I).group(1).decode()  # replaced
    line = log_of(server, rid)
    assert " /a%1b%0a 404 " in line
    assert "\x1b" not in "".join(log_lines(server))


def test_a_browser_gets_the_page_and_any_other_client_the_answer_it_always_got(server):
    status, headers, payload, answer = server.request("GET", "/")
    assert (status, answer) == (405, {"error": "GET is not allowed on /", "request_id": answer.get("request_id")})
    assert {k.lower(): v for k, v in headers.items()}["content-type"] == "application/json"
    status, headers, page, _ = server.request("GET", "/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert status == 200 and b"<textarea" in page and b"{{CONFIG}}" not in page
    assert {k.lower(): v for k, v in headers.items()}["content-type"].startswith("text/html")
    for asset in ("/page/page.js", "/page/page.css", "/page/docs.js"):
        assert server.request("GET", asset)[0] == 200
    assert server.request("GET", "/page/nothing.js")[0] == 404


# -- metrics ----------------------------------------------------------------------------------------


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_count_requests_time_and_batches(server):
    before = samples(server.request("GET", "/metrics")[2].decode())
    for _ in range(2):
        server.request("POST", "/v1/fill", {"texts": ["a [MASK] b", "c [MASK:2] d"]})
    server.request("POST", "/", {"inputs": "x [MASK] y"})
    server.request("POST", "/v1/fill", {"text": "no marker"})
    server.request("GET", "/no/such/path")
    status, headers, payload, _ = server.request("GET", "/metrics")
    assert status == 200 and {k.lower(): v for k, v in headers.items()}["content-type"].startswith("text/plain")
    after = samples(payload.decode())

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert grew('perceiver_requests_total{method="POST",route="/v1/fill",status="200"}') == 2
    assert grew('perceiver_requests_total{method="POST",route="/v1/fill",status="400"}') == 1
    assert grew('perceiver_requests_total{method="POST",route="/",status="200"}') == 1
    assert grew('perceiver_requests_total{method="GET",route="other",status="404"}') == 1  # a client's path is no label
    assert grew('perceiver_request_duration_seconds_count{route="/v1/fill"}') == 3
    # each request alone (one client: no other waits with it); the text without a marker is the filler's to refuse
    assert grew("perceiver_inference_duration_seconds_count") == 4
    assert grew("perceiver_queue_duration_seconds_count") == 4
    assert grew("perceiver_batch_texts_sum") == 6
    assert grew("perceiver_batch_inputs_sum") > 0
    assert after["perceiver_queue_depth"] == 0
    assert after["perceiver_requests_in_flight"] == 1  # this request
    info = [k for k in after if k.startswith("perceiver_model_info{")]
    assert len(info) == 1 and 'device="cpu"' in info[0] and 'dtype="float32"' in info[0]
    assert all(k.startswith("perceiver_") for k in after)


def test_open_routes_need_no_key_and_the_rest_do(tiny_checkpoint, tmp_path):
    keyed = Server(tiny_checkpoint, tmp_path, env={"PERCEIVER_API_KEY": "k3y"})
    try:
        for path, headers in (("/health", {}), ("/metrics", {}), ("/openapi.json", {}), ("/docs", {}),
                              ("/page/page.js", {}), ("/", {"Accept": "text/html"})):
            assert keyed.request("GET", path, headers=headers)[0] == 200, path
        for method, path in (("GET", "/info"), ("GET", "/"), ("POST", "/"), ("POST", "/v1/fill"), ("GET", "/x")):
            status, headers, _, answer = keyed.request(method, path, {} if method == "POST" else None,
                                                       headers={"X-Request-ID": "k-1"})
            assert status == 401 and answer["error"].startswith("missing API key"), (method, path)
            assert answer["request_id"] == "k-1" and {k.lower(): v for k, v in headers.items()}["x-request-id"] == "k-1"
    finally:
        assert keyed.stop() == 0


# -- the log's flags, CORS ------------------------------------------------------------------------


def test_json_log_format_and_no_access_log(tiny_checkpoint, tmp_path):
    as_json = Server(tiny_checkpoint, tmp_path, "--log-format", "json")
    quiet = Server(tiny_checkpoint, tmp_path, "--no-access-log")
    try:
        as_json.request("POST", "/v1/fill", {"text": "a [MASK] b"}, headers={"X-Request-ID": "j-1"})
        record = json.loads(log_of(as_json, "j-1"))
        assert set(record) == {"time", "id", "method", "path", "status", "bytes", "total_ms", "queue_ms",
                               "compute_ms", "inputs"}
        assert (record["id"], record["path"], record["status"]) == ("j-1", "/v1/fill", 200) and record["inputs"] > 0
        assert quiet.request("POST", "/v1/fill", {"text": "a [MASK] b"})[0] == 200
        assert quiet.request("GET", "/health")[0] == 200
    finally:
        assert as_json.stop() == 0 and quiet.stop() == 0
    assert b"".join(quiet.stderr) == b""


def test_cors_answers_the_allowed_origin_only(tiny_checkpoint, tmp_path, server):
    allowed = "http://example.org:8080"
    cors = Server(tiny_checkpoint, tmp_path, "--cors-origin", allowed, "--cors-origin", "https://other.example")
    try:
        preflight = {"Origin": allowed, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}
        status, headers, _, _ = cors.request("OPTIONS", "/v1/fill", headers=preflight)
        lower = {k.lower(): v for k, v in headers.items()}
        assert status == 200 and lower["access-control-allow-origin"] == allowed
        assert "authorization" in lower["access-control-allow-headers"].lower()
        status, headers, _, _ = cors.request("POST", "/v1/fill", {"text": "a [MASK] b"}, headers={"Origin": allowed})
        lower = {k.lower(): v for k, v in headers.items()}
        assert status == 200 and lower["access-control-allow-origin"] == allowed
        assert "x-request-id" in lower["access-control-expose-headers"].lower()
        status, headers, _, _ = cors.request("OPTIONS", "/v1/fill", headers={**preflight, "Origin": "http://evil.example"})
        assert status == 400 and "access-control-allow-origin" not in {k.lower() for k in headers}
    finally:
        assert cors.stop() == 0
    _, headers, _, _ = server.request("POST", "/v1/fill", {"text": "a [MASK] b"}, headers={"Origin": allowed})
    assert "access-control-allow-origin" not in {k.lower() for k in headers}  # none by default


@pytest.mark.parametrize("args,message", [
    (["--cors-origin", "http://example.org/path"], "--cors-origin must be * or an origin"),
    (["--log-format", "xml"], "--log-format must be one of text, json"),
])
def test_bad_flags_are_one_line_exit_2(tmp_path, args, message):
    from tests.serving import perceiver, server_env

    result = perceiver(["serve", "-m", str(SMALL), "--port", "0", *args], server_env(tmp_path))
    assert result.returncode == 2 and message in result.stderr.decode() and result.stderr.count(b"\n") == 1


# -- the API document --------------------------------------------------------------------------------


def test_the_document_is_valid_openapi_and_served_as_built():
    from openapi_spec_validator import validate

    validate(document())


def test_the_document_names_every_route_of_the_app(server, tiny_checkpoint):
    from starlette.routing import Route

    from perceiver_cli import serve
    from perceiver_cli.filler import MaskFiller
    from perceiver_cli.options import ServeOptions

    served = json.loads(server.request("GET", "/openapi.json")[2])
    assert served == json.loads(json.dumps(document()))
    app = serve.build_app(MaskFiller.from_pretrained(str(tiny_checkpoint), device="cpu"), ServeOptions())
    routes = {(m.lower(), r.path) for r in app.routes if isinstance(r, Route) and not r.path.startswith("/page/")
              for m in r.methods - {"HEAD"}}
    documented = {(m, p) for p, item in served["paths"].items() for m in item}
    assert documented == routes


def schema_of(name: str):
    from jsonschema import Draft202012Validator

    doc = json.loads(json.dumps(document()))
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": doc["components"]})


ANSWERS = [
    ("POST", "/v1/fill", {"text": "a [MASK] b [MASK:2]", "options": {"top_k": 3, "explain": True}}, "FillAnswer"),
    ("POST", "/v1/fill", {"text": "a [MASK] b", "options": {"choices": [" x", " yz"]}}, "FillAnswer"),
    ("POST", "/v1/fill", {"texts": ["a [MASK] b", "no marker"], "detail": True}, "FillAnswer"),
    ("POST", "/v1/fill", {"text": "a [MASK] b", "detail": True, "options": {"top_k": 2, "explain": True}}, "WireResult"),
    ("POST", "/v1/fill", {"text": "a [MASK] b", "options": {"top_k": 2}}, "FillResult"),
    ("POST", "/", {"inputs": "a [MASK] b", "parameters": {"top_k": 3}}, "FillMaskAnswer"),
    ("POST", "/", {"inputs": "a [MASK] b [MASK]"}, "FillMaskAnswer"),
    ("GET", "/info", None, "Info"),
    ("POST", "/v1/fill", {"text": "a [MASK]", "options": {"top_k": 0}}, "Error"),
    ("POST", "/", {"inputs": "no mask"}, "Error"),
]


@pytest.mark.parametrize("method,path,body,schema", ANSWERS, ids=[f"{a[0]} {a[1]} {a[3]}" for a in ANSWERS])
def test_real_answers_follow_the_documents_schemas(server, method, path, body, schema):
    _, _, _, answer = server.request(method, path, body)
    errors = [e.message for e in schema_of(schema).iter_errors(answer)]
    assert errors == [], (answer, errors)


def test_requests_follow_the_documents_schemas():
    validator = schema_of("FillRequest")
    assert not list(validator.iter_errors({"text": "a [MASK]", "options": {"strategy": "beam", "top_k": 3}}))
    assert list(validator.iter_errors({"text": "a [MASK]", "options": {"no_such_option": 1}}))
    assert list(validator.iter_errors({"text": "a", "texts": ["b"]}))


# -- warm-up ----------------------------------------------------------------------------------------


def test_warm_up_runs_one_forward_pass(filler):
    from perceiver_cli.serve import warm_up

    passes = []
    filler.runner.before_pass = passes.append
    try:
        warm_up(filler)
    finally:
        filler.runner.before_pass = None
    assert passes == [1]
