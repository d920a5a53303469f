"""`perceiver ray-fill` with 1 and 2 actors against `perceiver fill --batch` on the same file.

    python scripts/bench_ray.py [--lines 64] [--strategy oneshot] [--weights DIR]
    python scripts/bench_ray.py --dry-run      # the small test model, 8 lines: checks the script works

On full-size random weights in the reference layout (bench_forward's, saved by the
reference; a local directory, so no Hub), in one run, on this machine's CPUs, fp32:

(a) `perceiver fill --batch FILE --json -o OUT` (torch's default threads: every core);
(b) `perceiver ray-fill FILE -o DIR --actors 1`: a local Ray started by the command, one
    actor with every core (the command's default on a local Ray: its CPUs / --actors);
(c) the same with `--actors 2`: two model copies with half the cores each.

Each command runs as a user would run it, a fresh process: its wall time includes
starting Python (and Ray: a local cluster, then the actors importing torch and loading the
model). So each command also runs on a one-line file, and the table gives both the whole
run's lines/s and the rate past that fixed cost: (N - 1) / (wall(N lines) - wall(1 line)).
The records of (b) and (c) must equal (a)'s (fills identical, log-probabilities within
1e-4), counted in the output. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "tests" / "assets" / "perceiver-small"
from bench_lines import make_lines  # noqa: E402


def full_size_weights(directory: Path) -> Path:
    """bench_forward's random full-size weights (made once, in a child process)."""
    make = "import sys; from pathlib import Path; from bench_forward import full_size_weights; full_size_weights(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", make, str(directory)], cwd=ROOT / "scripts", check=True)
    return directory


def timed(cmd: list[str], env: dict) -> float:
    """Wall seconds of one command, which must exit 0."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.decode(errors='replace')}")
    return wall


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def same(got: dict, want: dict) -> bool:
    """A ray-fill record equals the batch record: fills identical, log-probabilities within 1e-4."""
    got = {k: v for k, v in got.items() if k != "file"}
    if got.keys() != want.keys() or got.get("text") != want.get("text"):
        return False
    for g, w in zip(got.get("spans", []), want.get("spans", [])):
        if g["bytes"] != w["bytes"] or abs(g["logprob"] - w["logprob"]) > 1e-4:
            return False
    return len(got.get("spans", [])) == len(want.get("spans", []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--strategy", default="oneshot")
    ap.add_argument("--weights", type=Path, default=Path(tempfile.gettempdir()) / "perceiver-bench-full")
    ap.add_argument("--dry-run", action="store_true", help="the small test model and 8 lines")
    args = ap.parse_args()
    if args.dry_run:
        model, what, args.lines = SMALL, "the small test model (tests/assets/perceiver-small)", 8
    else:
        model, what = full_size_weights(args.weights), "full-size random weights (201M parameters)"
    work = Path(tempfile.mkdtemp(prefix="perceiver-bench-ray-"))
    try:
        lines = make_lines(args.lines)
        big = work / "lines.txt"
        big.write_text("".join(line + "\n" for line in lines))
        one = work / "one.txt"
        one.write_text(lines[0] + "\n")
        env = {**os.environ, "HF_HOME": str(work / "hf_home"), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
        env.pop("RAY_ADDRESS", None)
        perceiver = [sys.executable, "-m", "perceiver_cli"]
        common = ["-m", str(model), "--strategy", args.strategy, "--batch-size", str(args.batch_size)]
        sides = {
            "fill --batch": lambda src, out: [*perceiver, "fill", "--batch", str(src), "--json", "-o", str(out), *common],
            "ray-fill, 1 actor": lambda src, out: [*perceiver, "ray-fill", str(src), "-o", str(out), "--actors", "1", *common],
            "ray-fill, 2 actors": lambda src, out: [*perceiver, "ray-fill", str(src), "-o", str(out), "--actors", "2", *common],
        }
        results = {}
        for name, command in sides.items():
            out_one, out_big = work / f"{len(results)}-one", work / f"{len(results)}-big"
            if name == "fill --batch":
                out_one, out_big = out_one.with_suffix(".jsonl"), out_big.with_suffix(".jsonl")
            t1 = timed(command(one, out_one), env)
            tn = timed(command(big, out_big), env)
            got = records(out_big if out_big.is_file() else next(out_big.iterdir()))
            results[name] = (t1, tn, got)
            print(f"{name}: 1 line {t1:.1f} s, {args.lines} lines {tn:.1f} s", file=sys.stderr, flush=True)
        reference = results["fill --batch"][2]
        print(f"{date.today()}: {args.lines} lines of 40-200 bytes, one [MASK:n] each (n = 3..8), --strategy "
              f"{args.strategy}, --batch-size {args.batch_size}; {what}; {os.cpu_count()} CPUs "
              f"({platform.processor() or platform.machine()}), Python {platform.python_version()}.\n")
        print("| what | 1 line | {} lines | lines/s, whole run | lines/s past the fixed cost | vs fill --batch | records equal to fill --batch |".format(args.lines))
        print("|---|---|---|---|---|---|---|")
        base = None
        for name, (t1, tn, got) in results.items():
            steady = (args.lines - 1) / (tn - t1) if tn - t1 > 1 else None  # too few lines to tell: n/a
            base = base or steady
            equal = sum(same(g, w) for g, w in zip(got, reference)) if len(got) == len(reference) else 0
            rate = f"{steady:.2f}" if steady else "n/a"
            ratio = f"{steady / base:.2f}x" if steady and base else "n/a"
            print(f"| {name} | {t1:.1f} s | {tn:.1f} s | {args.lines / tn:.2f} | {rate} | {ratio} | {equal}/{len(reference)} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
