"""Does torch.compile (Inductor, CPU) pay for a warm process? Full-size random weights.

    python scripts/bench_compile.py [--runs 7] [--modes float32,bfloat16]

For each mode (float32; bfloat16 = the mixed CPU mode, precision.py), the eager model and
`torch.compile(model)` (Inductor's default mode, `dynamic=False`) run one forward pass of
the model card's sentence (9 decoded positions): the compile time (the first call),
then steady-state passes, eager and compiled interleaved in one process (background load
hits them alike), medians and the ratio. A second input length shows what a new shape
costs a compiled model (a recompile). `--dynamic`: torch.compile's default instead
(`dynamic=None`: the second input length compiles a dynamic-shape graph), timed at a third
length, as a server meets them: every text has its own length.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from precision_study import random_full_size  # noqa: E402

from perceiver_cli import tokenizer  # noqa: E402
from perceiver_cli.precision import to_mixed  # noqa: E402


def inputs(text: str, masked: range):
    ids = [tokenizer.CLS, *(b + tokenizer.NUM_SPECIAL for b in text.encode()), tokenizer.SEP]
    for p in masked:
        ids[p] = tokenizer.MASK
    return torch.tensor([ids]), None, torch.tensor([list(masked)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--modes", default="float32,bfloat16")
    ap.add_argument("--dynamic", action="store_true", help="dynamic shapes (torch.compile's default)")
    args = ap.parse_args()
    x = inputs("This is an incomplete sentence where some words are missing.", range(52, 61))
    x2 = inputs("A second sentence of another length, so that its shape is new to the graph.", range(10, 15))
    x3 = inputs("A third one, shorter still, of a third length.", range(3, 9))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.runs} interleaved runs\n")
    print("| mode | eager | compiled | compiled / eager | first call (compile) | new input length |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        eager = random_full_size()
        if mode == "bfloat16":
            to_mixed(eager)
        compiled = torch.compile(eager, dynamic=None if args.dynamic else False)
        with torch.inference_mode():
            t = time.perf_counter()
            compiled(*x)
            first = time.perf_counter() - t
            for _ in range(2):
                compiled(*x), eager(*x)
            times = {"eager": [], "compiled": []}
            for _ in range(args.runs):
                for name, fn in (("eager", eager), ("compiled", compiled)):
                    t = time.perf_counter()
                    fn(*x)
                    times[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            compiled(*x2)
            new_shape = time.perf_counter() - t
            if args.dynamic:  # steady state of the dynamic graph, at a length it has not seen
                times = {"eager": [], "compiled": []}
                compiled(*x3)
                for _ in range(args.runs):
                    for name, fn in (("eager", eager), ("compiled", compiled)):
                        t = time.perf_counter()
                        fn(*x3)
                        times[name].append(time.perf_counter() - t)
        e, c = (statistics.median(times[k]) for k in ("eager", "compiled"))
        print(f"| {mode} | {e * 1000:.0f} ms | {c * 1000:.0f} ms | {c / e:.2f}x | {first:.1f} s | {new_shape:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
