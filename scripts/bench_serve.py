"""`perceiver serve`: a fill through a warm server against cold processes, and batching
across concurrent requests against the library's own batching.

    python scripts/bench_serve.py [--runs 5] [--weights DIR]
    python scripts/bench_serve.py --dry-run     # the small test model, one run: checks the script works
    python scripts/bench_serve.py --modes       # (d)'s warm server throughput per CPU mode instead
    python scripts/bench_serve.py --baseline DIR   # (d)'s server side: this tree against DIR's

On full-size random weights in the reference layout (bench_cli's: a Hugging Face cache of
its own, offline, holding them as `deepmind/language-perceiver`, so every side loads the
model by its repo id), in one run, CPU, fp32, every process with torch's default threads:

(a) the model card's inference script, a fresh process (the reference);
(b) `perceiver fill --strategy oneshot "... [MASK:9]"`, a fresh process: cold, in-process
    (one forward pass, the model card's work);
(c) the same command with `--server URL`: the whole client process, against a server
    started once (`perceiver serve`, warm); (c') the same request sent by this process
    over a kept-alive connection: the server's part of (c);
(d) 16 lines (40-200 bytes, one `[MASK:n]` each, oneshot) as 16 requests to /v1/fill from 4
    concurrent clients (4 each, one after another), against the same 16 lines through one
    `MaskFiller.fill_many` call in a process that has the model loaded (warm).

(a), (b), (c) alternate after one warm-up each, and so do the two sides of (d); medians of
--runs. The fills of (b) and (c), and of both sides of (d), must be identical. Prints a
markdown table with the ratios and their targets: (c) <= 0.25x (a); (d) server <= 1.2x
in-process.

`--modes`: (d)'s server side only, for each CPU mode: three warm servers at once
(float32, `--dtype bfloat16`: the mixed mode, `--quantize int8`), their concurrent rounds
interleaved; lines per second (median of --runs) and the ratio to float32, and how many of
the 16 fills equal float32's.

`--baseline DIR` (a checkout of an earlier commit): (d)'s server side only, a server of
this tree against a server of DIR's, both warm at once, rounds interleaved: what a change
to the server costs in warm throughput.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_cli import MODEL_CARD, TEXT, full_size_weights, hub_cache, run  # noqa: E402

from bench_lines import make_lines  # noqa: E402

REPO = "deepmind/language-perceiver"

# (d)'s in-process side: loads the model once, then fills the lines each time it reads a line.
IN_PROCESS = r"""
import json, sys, time
from perceiver_cli.filler import MaskFiller
from perceiver_cli.options import FillOptions

lines = json.loads(sys.stdin.readline())
filler = MaskFiller.from_pretrained(sys.argv[1], device="cpu")
options = FillOptions(strategy="oneshot")
filler.fill_many(lines, options)  # warm-up
print(json.dumps({"ready": True}), flush=True)
for _ in sys.stdin:
    start = time.perf_counter()
    results = filler.fill_many(lines, options)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "fills": [r.text for r in results]}), flush=True)
"""


class Server:
    """`perceiver serve` on a free port, started once."""

    def __init__(self, env: dict, model: str, *flags: str):
        cmd = [sys.executable, "-m", "perceiver_cli", "serve", "-m", model, "--device", "cpu", "--port", "0", *flags]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        line = b""
        deadline = time.monotonic() + 600
        while not line.endswith(b"\n"):
            if not select.select([self.proc.stderr], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise SystemExit("the server did not start")
            chunk = os.read(self.proc.stderr.fileno(), 1)
            if not chunk:
                raise SystemExit(f"the server exited: {line.decode(errors='replace')}")
            line += chunk
        self.url = re.search(r"http://\S+:\d+", line.decode()).group(0)
        self.port = int(self.url.rsplit(":", 1)[1])

    def post(self, conn: http.client.HTTPConnection, body: dict) -> dict:
        conn.request("POST", "/v1/fill", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:
            raise SystemExit(f"the server answered {response.status}: {answer}")
        return answer

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def concurrent_round(server: Server, lines: list[str], clients: int = 4) -> tuple[float, list[str]]:
    """(wall seconds, fills in line order) of len(lines) requests from `clients` threads."""
    def client(k: int) -> list[tuple[int, str]]:
        conn = server.connect()
        conn.connect()
        out = []
        for i in range(k, len(lines), clients):
            out.append((i, server.post(conn, {"text": lines[i], "options": {"strategy": "oneshot"}})["text"]))
        conn.close()
        return out

    with ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        parts = list(pool.map(client, range(clients)))
        wall = time.perf_counter() - start
    fills = dict(pair for part in parts for pair in part)
    return wall, [fills[i] for i in range(len(lines))]


def output_of(cmd: list[str], env: dict) -> bytes:
    return subprocess.run(cmd, env=env, capture_output=True, check=True).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--weights", type=Path, default=Path(tempfile.gettempdir()) / "perceiver-bench-full")
    ap.add_argument("--dry-run", action="store_true", help="the small test model, one run: checks the script works")
    ap.add_argument("--modes", action="store_true", help="warm server throughput per CPU mode (float32, bfloat16, int8)")
    ap.add_argument("--baseline", type=Path, default=None, help="an earlier checkout: (d)'s server side against its server")
    args = ap.parse_args()
    if args.dry_run:
        weights, args.runs = ROOT / "tests" / "assets" / "perceiver-small", 1
    else:
        weights = full_size_weights(args.weights)
    home = Path(tempfile.mkdtemp(prefix="perceiver-bench-serve-"))
    hub_cache(home, weights)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "perceiver_cli")], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PERCEIVER_SERVER", "PERCEIVER_API_KEY", "PERCEIVER_MODEL")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", NO_COLOR="1", PYTHONPATH=str(ROOT))
    script = home / "model_card.py"
    # the small model of --dry-run has 128 positions: the script pads to the text, not to 2048
    script.write_text(MODEL_CARD.replace('padding="max_length"', 'padding="longest"') if args.dry_run else MODEL_CARD)
    lines = make_lines(16)
    if args.modes or args.baseline is not None:
        sides = MODES if args.modes else {"this tree": (), f"baseline ({args.baseline})": ()}
        envs = {name: env for name in sides}
        if args.baseline is not None and not args.modes:
            envs[f"baseline ({args.baseline})"] = {**env, "PYTHONPATH": str(args.baseline.resolve())}
        try:
            modes(envs, sides, lines, args.runs, 'the small test model (dry run)' if args.dry_run else 'full-size random weights')
        finally:
            shutil.rmtree(home, ignore_errors=True)
        return

    server = Server(env, REPO)
    helper = subprocess.Popen([sys.executable, "-c", IN_PROCESS, REPO], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        helper.stdin.write(json.dumps(lines) + "\n")
        helper.stdin.flush()
        assert json.loads(helper.stdout.readline())["ready"]

        fill = [sys.executable, "-m", "perceiver_cli", "fill", "--strategy", "oneshot", f"{TEXT[:51]} [MASK:9]"]
        cases = {
            "a": [sys.executable, str(script), "cpu"],
            "b": [*fill, "-m", REPO, "--device", "cpu"],
            "c": [*fill, "--server", server.url],
        }
        same_bc = output_of(cases["b"], env) == output_of(cases["c"], env)  # also the warm-up of b and c
        run(cases["a"], env)
        body = {"text": f"{TEXT[:51]} [MASK:9]", "options": {"strategy": "oneshot"}}
        server.post(server.connect(), body)
        concurrent_round(server, lines)  # warm-up of (d)
        walls: dict[str, list[float]] = {k: [] for k in ("a", "b", "c", "c'", "d server", "d in-process")}
        same_d = True
        for _ in range(args.runs):
            for key, cmd in cases.items():
                walls[key].append(run(cmd, env)[0])
            conn = server.connect()
            conn.connect()  # (idle kept-alive connections are closed by the server after 5 s)
            start = time.perf_counter()
            server.post(conn, body)
            walls["c'"].append(time.perf_counter() - start)
            conn.close()
            seconds, served = concurrent_round(server, lines)
            walls["d server"].append(seconds)
            helper.stdin.write("go\n")
            helper.stdin.flush()
            alone = json.loads(helper.stdout.readline())
            walls["d in-process"].append(alone["seconds"])
            same_d = same_d and served == alone["fills"]
    finally:
        code = server.stop()
        helper.stdin.close()
        helper.wait(60)
        shutil.rmtree(home, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in walls.items()}
    a, d_in = med["a"], med["d in-process"]
    print(f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"cpu, fp32, {args.runs} runs after a warm-up, {'the small test model (dry run)' if args.dry_run else 'full-size random weights'}; "
          f"(b) and (c) print the same: {same_bc}; (d) fills identical: {same_d}; the server exited {code}\n")
    print("| what | wall (median) | ratio | target |")
    print("|---|---|---|---|")
    print(f"| (a) model card script, cold process | {a:.2f} s | 1.00 | |")
    print(f"| (b) `perceiver fill --strategy oneshot`, cold process | {med['b']:.2f} s | {med['b'] / a:.2f}x (a) | |")
    print(f"| (c) the same `--server URL`, whole client process, warm server | {med['c']:.2f} s | {med['c'] / a:.2f}x (a) | <= 0.25x |")
    c_alone = med["c'"]
    print(f"| (c') its request alone, from a warm connection (the server's part) | {c_alone:.2f} s | {c_alone / a:.2f}x (a) | |")
    print(f"| (d) 16 lines: 16 requests from 4 concurrent clients | {med['d server']:.2f} s | {med['d server'] / d_in:.2f}x in-process | <= 1.2x |")
    print(f"| (d) 16 lines: one `MaskFiller.fill_many`, warm, in-process | {d_in:.2f} s | 1.00 | |")


MODES = {"float32": ("--no-access-log",), "bfloat16 (mixed)": ("--no-access-log", "--dtype", "bfloat16"),
         "int8": ("--no-access-log", "--quantize", "int8")}


def modes(envs: dict[str, dict], sides: dict[str, tuple], lines: list[str], runs: int, weights: str) -> None:
    """(d)'s server side for each of `sides` (a name: its server's flags, started in
    `envs[name]`), their rounds interleaved (see the docstring). The first side is the base
    of the ratios."""
    servers = {name: Server(envs[name], REPO, *flags) for name, flags in sides.items()}
    try:
        walls: dict[str, list[float]] = {name: [] for name in sides}
        fills = {name: concurrent_round(server, lines)[1] for name, server in servers.items()}  # warm-up
        for _ in range(runs):
            for name, server in servers.items():
                walls[name].append(concurrent_round(server, lines)[0])
    finally:
        codes = {name: server.stop() for name, server in servers.items()}
    first = next(iter(sides))
    base = statistics.median(walls[first])
    print(f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"{weights}, {runs} interleaved runs after a warm-up; servers exited {codes}\n")
    print(f"| server | 16 requests, 4 clients (median) | lines/s | vs {first} | fills equal {first}'s |")
    print("|---|---|---|---|---|")
    for name in sides:
        wall = statistics.median(walls[name])
        same = sum(a == b for a, b in zip(fills[name], fills[first]))
        print(f"| {name} | {wall:.2f} s | {len(lines) / wall:.1f} | {base / wall:.2f}x | {same}/{len(lines)} |")


if __name__ == "__main__":
    main()
