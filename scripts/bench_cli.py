"""Whole-process speed and memory: the model card's script vs `perceiver fill`.

    python scripts/bench_cli.py [--runs 5] [--weights DIR] [--baseline DIR]

Side by side on the same full-size random weights in the reference layout, each as a
fresh process with a warm page cache and a warm Hub cache: the weights sit in a Hugging Face
cache (HF_HOME of its own, offline) as `deepmind/language-perceiver`, so both sides load
the model by its repo id, as their users do: (1) the model card's inference script with
transformers (the reference), (2) `perceiver fill --strategy oneshot` in fp32 (one
forward pass, as the script), (3) the same with `--quantize int8`, plus `perceiver --help`
and, for context, `perceiver fill` with the defaults on `[MASK]` (iterative, auto length:
more passes than the script's one). One warm-up run each (it also builds the int8
cache), then `--runs` runs each, interleaved; the table gives median wall time and median
peak resident memory (the child's ru_maxrss) and their ratios to the reference.

`--baseline DIR` (a checkout of an earlier commit, e.g. `git worktree add /tmp/base
<commit>`) adds the same `perceiver fill` rows run from that tree, interleaved with the
others: a before/after comparison of cold start in one run.
"""

from __future__ import annotations

import argparse
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

TEXT = "This is an incomplete sentence where some words are missing."

# The model card's inference example (plus a device: argv[1], "cpu" by default).
MODEL_CARD = """
import sys
from transformers import PerceiverTokenizer, PerceiverForMaskedLM
import torch

device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
tokenizer = PerceiverTokenizer()
model = PerceiverForMaskedLM.from_pretrained("deepmind/language-perceiver").to(device)

text = "This is an incomplete sentence where some words are missing."
encoding = tokenizer(text, padding="max_length", return_tensors="pt")
# mask bytes corresponding to " missing.".
encoding["input_ids"][0, 52:61] = tokenizer.mask_token_id

with torch.no_grad():
    outputs = model(**encoding.to(device))
logits = outputs.logits
masked_tokens_predictions = logits[0, 52:61].argmax(dim=-1).tolist()
print(tokenizer.decode(masked_tokens_predictions))
"""


def run(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one process."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}")
    return wall, usage.ru_maxrss / 1024


def full_size_weights(directory: Path) -> Path:
    """bench_forward's random full-size weights, made in a child process: this process
    stays small, because a child's peak RSS (ru_maxrss) starts from its parent's size."""
    make = "import sys; from pathlib import Path; from bench_forward import full_size_weights; full_size_weights(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", make, str(directory)], cwd=ROOT / "scripts", check=True)
    return directory


def hub_cache(home: Path, weights: Path, repo: str = "deepmind/language-perceiver") -> None:
    """`weights`' files as `repo` at `main` in the Hugging Face cache under `home`, in the
    cache's own layout (refs/main names a commit; snapshots/<commit>/ links to the files)."""
    folder = home / "hub" / "--".join(["models", *repo.split("/")])
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (folder / "snapshots" / commit / name).symlink_to((weights / name).resolve())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--weights", type=Path, default=Path(tempfile.gettempdir()) / "perceiver-bench-full")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine: the reference in fp32 there, "
                    "ours in bf16/fp16, and no int8 (CPU only); peak RSS does not count GPU memory")
    ap.add_argument("--baseline", type=Path, default=None, help="an earlier checkout: its `perceiver fill` rows too")
    args = ap.parse_args()
    weights = full_size_weights(args.weights)
    home = Path(tempfile.mkdtemp(prefix="perceiver-bench-home-"))
    hub_cache(home, weights)
    # Bytecode for our modules, as `pip install` writes it: in an editable checkout under
    # PYTHONDONTWRITEBYTECODE=1 (this machine) every run would compile them again (~35 ms).
    for tree in (ROOT, args.baseline):
        if tree is not None:
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "perceiver_cli")], check=True)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    script = home / "model_card.py"
    script.write_text(MODEL_CARD)
    perceiver = [sys.executable, "-m", "perceiver_cli"]
    # --strategy oneshot: the same single forward pass as the model card's script.
    fill = [*perceiver, "fill", "--device", args.device, "--strategy", "oneshot", f"{TEXT[:51]} [MASK:9]"]
    cases = {
        "reference (model card script)": [sys.executable, str(script), args.device],
        f"perceiver fill --device {args.device}": fill,
        "perceiver fill --quantize int8": [*fill, "--quantize", "int8"],
        "perceiver --help": [*perceiver, "--help"],
        # what people type most: the default strategy and a span of the model's choosing
        # (more passes than the script's one; not the same work, so its ratio is context)
        "perceiver fill, defaults, `[MASK].`": [*perceiver, "fill", "--device", args.device, f"{TEXT[:51]} [MASK]."],
    }
    if args.device != "cpu":
        del cases["perceiver fill --quantize int8"]
    envs = {name: {**env, "PYTHONPATH": str(ROOT)} for name in cases}  # this tree's package, wherever it is
    if args.baseline is not None:  # the same commands, the package imported from the baseline tree
        for name in [n for n in cases if n.startswith("perceiver")]:
            cases[f"baseline: {name}"] = cases[name]
            envs[f"baseline: {name}"] = {**env, "PYTHONPATH": str(args.baseline.resolve())}
    for name, cmd in cases.items():  # warm-up: page cache, int8 cache, .pyc files
        run(cmd, envs[name])
    results = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, cmd in cases.items():
            results[name].append(run(cmd, envs[name]))
    med = {name: (statistics.median(w for w, _ in r), statistics.median(m for _, m in r)) for name, r in results.items()}
    ref_wall, ref_mem = med["reference (model card script)"]
    print(f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"device {args.device}, {args.runs} runs after a warm-up, warm page cache and Hub cache (the model by its repo id)\n")
    print("| command | wall (median) | vs reference | peak RSS (median) | vs reference |")
    print("|---|---|---|---|---|")
    for name, (wall, mem) in med.items():
        print(f"| {name} | {wall:.2f} s | {wall / ref_wall:.2f}x | {mem:.0f} MB | {mem / ref_mem:.2f}x |")


if __name__ == "__main__":
    main()
