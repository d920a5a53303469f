"""Peak memory and time of the five request bodies of issue 21, filled in-process.

    python scripts/bench_budget.py CASE [--timeout S] [--memory-mb MB]
    python scripts/bench_budget.py all          # each case in its own process
    python scripts/bench_budget.py CASE --unbounded  # the budget lifted: what the lazy passes hold

A tiny random model with the real model's 2048-byte window (the bookkeeping per input is
the real model's; the passes themselves are cheap) fills the case's texts through
`MaskFiller.fill_many`, as the server does. Each case runs in a fresh process under a
memory ceiling (RLIMIT_AS) and a time limit, and prints one JSON line: the case, what came
of it (filled, refused with the error, out of memory, out of time), seconds, peak RSS and
the size of the answer in JSON (encoded as the server would, inside the measured time).
Runs on any checkout of this repo (it measured the code before and after the budget).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CASES = {  # name -> (texts, FillOptions fields); the bodies of issue 21
    "masks-20000": (["w [MASK] " * 20_000], {}),
    "topk-256": (["[MASK:2000]"] * 2, {"top_k": 256}),
    "max-span-2046": (["a [MASK] b [MASK] c [MASK] d [MASK] e"], {"max_span": 2046, "length_candidates": None}),
    "choices-pll": (["x [MASK] y [MASK] z [MASK] w [MASK]."],
                    {"choices": tuple(f"{k:02d}" + "c" * 1998 for k in range(64)), "choice_score": "pll"}),
    "explain-1000": (["[MASK:2046]" * 1000], {"strategy": "oneshot", "explain": True}),
    "oneshot-topk-120x20": (["[MASK:120] " * 20], {"strategy": "oneshot", "top_k": 256}),
}


def tiny_filler():
    import torch

    from perceiver_cli.filler import MaskFiller
    from perceiver_cli.model import PerceiverConfig, PerceiverMaskedLM

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = PerceiverConfig.from_dict(dict(
        num_latents=8, d_latents=32, d_model=16, num_blocks=1, num_self_attends_per_block=2,
        num_self_attention_heads=2, num_cross_attention_heads=2, qk_channels=16, v_channels=32,
        max_position_embeddings=2048))
    model = PerceiverMaskedLM(cfg).eval()
    with torch.no_grad():  # the reference's initialisation: normal(0, 0.02), LayerNorms at 1 and 0
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("weight") and p.dim() == 1 else
                    torch.zeros_like(p) if p.dim() == 1 else torch.randn_like(p) * 0.02)
    return MaskFiller(model, batch_size=8)


def run_case(name: str, unbounded: bool = False) -> dict:
    from perceiver_cli.filler import FillOptions

    texts, fields = CASES[name]
    filler = tiny_filler()
    if unbounded:  # what the lazy passes hold when a caller lifts the budget
        from perceiver_cli.options import Budget

        filler.budget = Budget(max_inputs=10**9, max_search=10**9, max_memory_mb=10**9, max_answer_mb=10**9)
    t0 = time.perf_counter()
    try:
        options = FillOptions(**fields)
        results = filler.fill_many(texts, options, return_errors=True)
        errors = [str(r) for r in results if isinstance(r, Exception)]
        outcome = f"refused: {errors[0]}" if errors else "filled"
        answer = sum(len(json.dumps(r.to_dict(options.top_k, options.explain)))  # as the server answers
                     for r in results if not isinstance(r, Exception))
    except MemoryError:
        outcome, answer = "out of memory", 0
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import perceiver_cli

    return {"case": name, "outcome": outcome, "seconds": round(seconds, 2), "peak_mb": round(peak),
            "answer_mb": round(answer / 2**20, 1),
            "code": str(Path(perceiver_cli.__file__).parent.parent)}


def _peak_mb(pid: int) -> int:
    """The peak resident memory of a running process (VmHWM), in MB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def main(argv: list[str]) -> int:
    name = argv[0] if argv else "all"
    timeout = float(argv[argv.index("--timeout") + 1]) if "--timeout" in argv else 300
    ceiling = int(argv[argv.index("--memory-mb") + 1]) if "--memory-mb" in argv else 8192
    if name != "all":
        resource.setrlimit(resource.RLIMIT_AS, (ceiling << 20, ceiling << 20))
        print(json.dumps(run_case(name, "--unbounded" in argv)), flush=True)
        return 0
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    for case in CASES:
        t0 = time.perf_counter()
        flags = ["--unbounded"] if "--unbounded" in argv else []
        child = subprocess.Popen([sys.executable, __file__, case, "--memory-mb", str(ceiling), *flags], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak = 0
        while child.poll() is None and time.perf_counter() - t0 < timeout:
            peak = max(peak, _peak_mb(child.pid))
            time.sleep(0.2)
        if child.poll() is None:  # out of time: what it held so far
            peak = max(peak, _peak_mb(child.pid))
            child.kill()
            child.communicate()
            print(json.dumps({"case": case, "outcome": f"out of time (> {timeout:.0f} s)", "seconds": timeout,
                              "peak_mb": peak}), flush=True)
            continue
        out, err = child.communicate()
        if out.strip():
            print(out.strip().splitlines()[-1], flush=True)
        else:
            last = err.strip().splitlines()[-1] if err.strip() else f"exit {child.returncode}"
            what = "out of memory" if "allocate memory" in last or "MemoryError" in last else f"died: {last[:200]}"
            print(json.dumps({"case": case, "outcome": what, "seconds": round(time.perf_counter() - t0, 2),
                              "peak_mb": peak}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
