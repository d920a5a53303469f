"""CPU threads under load: `perceiver fill --batch` with torch's default threads, with
`--threads 1`, and with the CLI's thread policy (`perceiver_cli.runtime`), each on a quiet
machine and beside one busy process.

    python scripts/bench_threads.py [--runs 5] [--lines 50] [--full] [--candidates]

Why: torch runs its CPU kernels on an OpenMP pool (libgomp), one thread per CPU, whose idle
threads spin between parallel regions. When another process holds one of the cores, the
thread that lost its core makes the others spin at every barrier, and a batch that takes
2 s with one thread took 20-25 s with two.

Each case is a fresh process (`python -m perceiver_cli fill --batch FILE` on the shipped
small model, tests/assets/perceiver-small; `--full` adds one `[MASK:9]` oneshot fill on
full-size random weights, which needs transformers to make them). "busy" runs beside a
`python -c 'while True: pass'` child started for that block and killed after it. The
cases run interleaved (`--runs` rounds, each round every case quiet, then every case busy,
in a rotating order) and the table gives medians. On a machine shared with other work the
quiet numbers are noisy: compare the ratios of one run.

The cases:
- `default`: what the CLI did before the policy: torch's default thread count and
  libgomp's default waiting (GOMP_SPINCOUNT=300000 is exactly libgomp's default when
  OMP_WAIT_POLICY is unset, and it stays the default when the CLI applies its policy,
  which leaves a user's GOMP_SPINCOUNT alone).
- `--threads 1`: the same with one thread.
- `policy`: the variables `runtime.configure_threads()` sets (what `perceiver` sets before
  it imports torch) and no `--threads`.
- with `--candidates`, the other policies tried: a short spin (GOMP_SPINCOUNT=10000) and
  the policy with `--threads 1`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from perceiver_cli import runtime  # noqa: E402  (no torch imported)

SMALL = ROOT / "tests" / "assets" / "perceiver-small"
EVAL = ROOT / "tests" / "assets" / "eval" / "test.jsonl"
TEXT = "This is an incomplete sentence where some words are [MASK:9]."
OUR_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def batch_file(directory: Path, lines: int) -> Path:
    """`lines` sentences of the small model's test split, each with its answer masked."""
    out = []
    with EVAL.open(encoding="utf-8") as f:
        for row in map(json.loads, f):
            out.append(f"{row['prefix']}[MASK:{len(row['answer'].encode())}]{row['suffix']}")
            if len(out) == lines:
                break
    path = directory / "lines.txt"
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def policy_environment() -> dict[str, str]:
    """The variables `runtime.configure_threads()` sets when the user has set none of them
    (what `perceiver` does before it imports torch)."""
    saved = dict(os.environ)
    try:
        for name in OUR_VARIABLES:
            os.environ.pop(name, None)
        before = dict(os.environ)
        runtime.configure_threads(None)
        return {k: v for k, v in os.environ.items() if before.get(k) != v}
    finally:
        os.environ.clear()
        os.environ.update(saved)


def cases(candidates: bool) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (extra `perceiver fill` arguments, environment variables set for it)."""
    default = {"GOMP_SPINCOUNT": "300000"}  # libgomp's own default, and the CLI leaves it alone
    policy = policy_environment()
    out = {
        "default (torch's threads, libgomp spins)": ([], default),
        "--threads 1": (["--threads", "1"], default),
        f"policy ({' '.join(f'{k}={v}' for k, v in policy.items()) or 'no variables'})": ([], policy),
    }
    if candidates:
        out["GOMP_SPINCOUNT=10000"] = ([], {"GOMP_SPINCOUNT": "10000"})
        out["policy + --threads 1"] = (["--threads", "1"], policy)
    return out


def run(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.decode(errors='replace')}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="interleaved rounds (medians over them)")
    ap.add_argument("--lines", type=int, default=50, help="lines in the --batch file")
    ap.add_argument("--full", action="store_true", help="also one fill on full-size random weights (needs transformers)")
    ap.add_argument("--weights", type=Path, default=Path(tempfile.gettempdir()) / "perceiver-bench-full")
    ap.add_argument("--candidates", action="store_true", help="also the other policies tried")
    ap.add_argument("--no-busy", action="store_true", help="quiet runs only (the busy column is left out)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="perceiver-bench-threads-"))
    lines = batch_file(work, args.lines)
    base = {k: v for k, v in os.environ.items() if k not in OUR_VARIABLES}
    base.update(NO_COLOR="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_HOME=str(work / "hf"))
    perceiver = [sys.executable, "-m", "perceiver_cli", "fill"]
    workloads = {f"--batch, {args.lines} lines, small model": [*perceiver, "-m", str(SMALL), "--batch", str(lines)]}
    if args.full:
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench_cli import full_size_weights

        weights = full_size_weights(args.weights)
        workloads["one [MASK:9] oneshot fill, full size"] = [*perceiver, "-m", str(weights), "--strategy", "oneshot", TEXT]
    variants = cases(args.candidates)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "perceiver_cli")], check=True)

    keys = [(w, v) for w in workloads for v in variants]
    loads = ("quiet",) if args.no_busy else ("quiet", "busy")
    times: dict[tuple[str, str, str], list[float]] = {(w, v, load): [] for w, v in keys for load in loads}

    def block(load: str, order: list[tuple[str, str]]) -> None:
        for w, v in order:
            extra, env = variants[v]
            times[w, v, load].append(run([*workloads[w], *extra], {**base, **env}))

    for w, v in keys:  # warm-up: page cache, bytecode
        run([*workloads[w], *variants[v][0]], {**base, **variants[v][1]})
    samples = [os.getloadavg()[0]]  # 1-minute load average, before each round and at the end
    for r in range(args.runs):
        samples.append(os.getloadavg()[0])
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        block("quiet", order)
        if args.no_busy:
            print(f"round {r + 1}/{args.runs} done", file=sys.stderr)
            continue
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.2)
            block("busy", order)
        finally:
            busy.kill()
            busy.wait()
        print(f"round {r + 1}/{args.runs} done", file=sys.stderr)

    samples.append(os.getloadavg()[0])
    print(f"{date.today()}, {platform.machine()}, {os.cpu_count()} CPUs ({runtime.available_cpus()} available), "
          f"python {platform.python_version()}, {args.runs} interleaved rounds, medians; 1-minute load average "
          f"{min(samples):.2f}-{max(samples):.2f} during the run (what else ran; this script's own busy child adds 1)")
    for w in workloads:
        med = {(v, load): statistics.median(times[w, v, load]) for v in variants for load in loads}
        first = next(iter(variants))
        print(f"\n{w}\n")
        if args.no_busy:
            print("| threads | quiet | quiet vs default |")
            print("|---|---|---|")
            for v in variants:
                print(f"| {v} | {med[v, 'quiet']:.2f} s | {med[v, 'quiet'] / med[first, 'quiet']:.2f}x |")
            continue
        print("| threads | quiet | busy (1 spinning process) | busy / quiet | quiet vs default | busy vs default |")
        print("|---|---|---|---|---|---|")
        for v in variants:
            q, b = med[v, "quiet"], med[v, "busy"]
            print(f"| {v} | {q:.2f} s | {b:.2f} s | {b / q:.2f}x | {q / med[first, 'quiet']:.2f}x "
                  f"| {b / med[first, 'busy']:.2f}x |")


if __name__ == "__main__":
    main()
