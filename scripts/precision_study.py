"""Which products of the model can run in bfloat16 (or int8) on the CPU: the per-group study.

    python scripts/precision_study.py --agreement     # the small trained model's 400 test cases
    python scripts/precision_study.py --speed --runs 7  # full-size random weights, one forward pass

Every row is a model whose listed groups (precision.GROUPS) run in bfloat16 (`BF16Linear`)
or int8 (`Int8Linear`, quantize.py), the rest float32.

`--agreement`: how often each row's fills equal the float32 fills, for oneshot and the
default strategy at the true length (`[MASK:N]`) and for `[MASK]` with the defaults, and
the largest difference of a span's log-probability where the fills are equal.
`--speed`: one forward pass of the model card's sentence (` missing.` masked, 9 decoded
positions) on full-size random weights, rows interleaved in one process (background load
hits them alike), medians and the ratio to float32.

`--groups`: each group's linear layers alone, at the shapes one forward pass of the model
card's sentence gives them (full-size weights), in float32, bfloat16 and int8, interleaved:
what the group costs per pass in each dtype. (Whole-model timings of one group changed at a
time differ by less than a loaded machine's noise; this measures the products themselves.)
`--batch N`: lines per second of `fill_many` over the first N test sentences (`[MASK:n]`,
oneshot, batches of 8) on full-size random weights, float32, the mixed mode and int8
interleaved (what `--batch`, the server's batches and ray-fill's actors run).
`--memory DIR`: the memory of a process that loads the checkpoint in DIR (full-size weights,
e.g. the one `scripts/bench_forward.py` writes) through `MaskFiller.from_pretrained` in
each mode and fills one sentence: peak and final resident memory, each mode a fresh process.

On a GPU (`--device cuda`, one call: `python scripts/precision_study.py --device cuda
--agreement --speed`) the rows are the whole model in float32, float16 (the CUDA default)
and bfloat16, compared with float32 on the same card.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from eval_fill import load_cases, text_of  # noqa: E402

from perceiver_cli import tokenizer  # noqa: E402
from perceiver_cli.checkpoint import load_model  # noqa: E402
from perceiver_cli.filler import MaskFiller  # noqa: E402
from perceiver_cli.model import PerceiverConfig, PerceiverMaskedLM  # noqa: E402
from perceiver_cli.precision import GROUPS, BF16Linear, to_mixed  # noqa: E402
from perceiver_cli.quantize import Int8Linear, quantize_int8  # noqa: E402

LATENT = ("latent q/k", "latent v", "latent o", "latent MLP")
# label -> {group: "bf16" | "int8"}, or the name of a dtype for the whole model
ROWS: dict[str, dict[str, str] | str] = {
    "float32": {},
    **{f"{g} bf16": {g: "bf16"} for g in GROUPS},
    **{f"{g} int8": {g: "int8"} for g in GROUPS},
    "latent v + MLP int8 (--quantize int8)": {"latent v": "int8", "latent MLP": "int8"},
    "latent v + MLP bf16": {"latent v": "bf16", "latent MLP": "bf16"},
    "latent v/o/MLP bf16 (default)": {"latent v": "bf16", "latent o": "bf16", "latent MLP": "bf16"},
    "latent bf16": {g: "bf16" for g in LATENT},
    "latent + decoder bf16": {**{g: "bf16" for g in LATENT}, "decoder": "bf16"},
    "all linear bf16": {g: "bf16" for g in GROUPS},
    "latent q/k/o bf16, v + MLP int8": {"latent q/k": "bf16", "latent o": "bf16", "latent v": "int8", "latent MLP": "int8"},
    "whole model bf16 (old --dtype bfloat16)": "bfloat16",
}
CUDA_ROWS = {"float32": "float32", "float16 (the CUDA default)": "float16", "bfloat16": "bfloat16"}

FILLS = [("oneshot `[MASK:N]`", True, {"strategy": "oneshot"}),
         ("default `[MASK:N]`", True, {}),
         ("defaults `[MASK]`", False, {})]


def build(loader, row, device: str = "cpu") -> PerceiverMaskedLM:
    """A fresh model from `loader()` with `row`'s groups swapped, on `device`."""
    if isinstance(row, str):
        return loader().to(device=device, dtype=getattr(torch, row))
    model = loader()
    for name, m in list(model.named_modules()):
        if not isinstance(m, nn.Linear):
            continue
        kind = next((k for g, k in row.items() if GROUPS[g](name)), None)
        if kind is None:
            continue
        new = BF16Linear.from_linear(m) if kind == "bf16" else Int8Linear.from_linear(m)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


def agreement(args, rows) -> None:
    cases = load_cases(args.cases, None)
    fp32 = MaskFiller(load_model(args.model, device=args.device), batch_size=64)
    want = {label: fp32.fill_many([text_of(c, sized) for c in cases], **opts) for label, sized, opts in FILLS}
    print(f"{len(cases)} cases from {args.cases}, model {args.model}, torch {torch.__version__}\n")
    print("| row | " + " | ".join(f"{label} = fp32" for label, *_ in FILLS) + " | oneshot |Δ logprob|, equal fills: median / max |")
    print("|---|" + "---|" * (len(FILLS) + 1))
    for label in rows:
        other = MaskFiller(build(lambda: load_model(args.model), rows[label], args.device), batch_size=64)
        cells, deltas = [], []
        for fill_label, sized, opts in FILLS:
            got = other.fill_many([text_of(c, sized) for c in cases], **opts)
            same = [a.data == b.data for a, b in zip(want[fill_label], got)]
            cells.append(f"{sum(same) / len(cases):.1%}")
            if opts.get("strategy") == "oneshot":  # the same single pass: its log-probabilities compare
                deltas = [abs(a.spans[0].logprob - b.spans[0].logprob) for a, b, s in zip(want[fill_label], got, same) if s]
        print(f"| {label} | " + " | ".join(cells) + f" | {statistics.median(deltas):.3f} / {max(deltas):.3f} |", flush=True)


def random_full_size() -> PerceiverMaskedLM:
    torch.manual_seed(0)
    model = PerceiverMaskedLM(PerceiverConfig())
    for p in model.parameters():
        nn.init.normal_(p, std=0.02)
    return model.eval().requires_grad_(False)


def speed(args, rows) -> None:
    base = random_full_size()

    def loader():
        return copy.deepcopy(base)

    x, positions = (t.to(args.device) for t in _sentence())
    models = {label: build(loader, rows[label], args.device) for label in rows}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = {label: [] for label in rows}
    with torch.inference_mode():
        for m in models.values():
            m(x, None, positions)
        for _ in range(args.runs):
            for label, m in models.items():
                sync()
                t = time.perf_counter()
                m(x, None, positions)
                sync()
                times[label].append(time.perf_counter() - t)
    base_t = statistics.median(times["float32"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.runs} interleaved runs\n")
    print("| row | forward (median) | vs float32 |\n|---|---|---|")
    for label in rows:
        m = statistics.median(times[label])
        print(f"| {label} | {m * 1000:.0f} ms | {m / base_t:.2f}x |", flush=True)


def groups(args) -> None:
    model = random_full_size()
    x, positions = _sentence()
    shapes: dict[str, tuple] = {}

    def record(name):
        def hook(module, inputs, output):
            shapes.setdefault(name, tuple(inputs[0].shape))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.inference_mode():
        model(x, None, positions)
    for hook in hooks:
        hook.remove()
    layers = {}  # group -> dtype -> [(layer, input)]
    for group, chosen in GROUPS.items():
        named = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and chosen(n)]
        layers[group] = {kind: [(make(m), torch.randn(shapes[n])) for n, m in named]
                         for kind, make in (("float32", lambda m: m), ("bf16", BF16Linear.from_linear),
                                            ("int8", Int8Linear.from_linear))}
    times = {(g, k): [] for g in layers for k in layers[g]}
    with torch.inference_mode():
        for _ in range(args.runs + 1):  # the first round warms up
            for g, kinds in layers.items():
                for k, pairs in kinds.items():
                    t = time.perf_counter()
                    for layer, inp in pairs:
                        layer(inp)
                    times[(g, k)].append(time.perf_counter() - t)
    flops = {g: sum(2 * inp.numel() * layer.weight.shape[0] for layer, inp in kinds["float32"]) for g, kinds in layers.items()}
    total = sum(flops.values())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.runs} interleaved runs; one pass of the"
          f" model card's sentence: {total / 1e9:.1f} GFLOP in linear layers\n")
    print("| group | GFLOP (share) | float32 | bf16 | int8 | bf16 / fp32 | int8 / fp32 |\n|---|---|---|---|---|---|---|")
    for g in layers:
        f32, bf, i8 = (statistics.median(times[(g, k)][1:]) for k in ("float32", "bf16", "int8"))
        print(f"| {g} | {flops[g] / 1e9:.1f} ({flops[g] / total:.0%}) | {f32 * 1000:.1f} ms | {bf * 1000:.1f} ms |"
              f" {i8 * 1000:.1f} ms | {bf / f32:.2f}x | {i8 / f32:.2f}x |", flush=True)


def _sentence():
    """The model card's sentence, ` missing.` masked: (ids, mask, positions) of one pass."""
    text = "This is an incomplete sentence where some words are missing."
    ids = [tokenizer.CLS, *(b + tokenizer.NUM_SPECIAL for b in text.encode()), tokenizer.SEP]
    ids[52:61] = [tokenizer.MASK] * 9
    return torch.tensor([ids]), torch.tensor([list(range(52, 61))])


def batch(args) -> None:
    base = random_full_size()
    models = {"float32": base, "bfloat16 (mixed)": to_mixed(copy.deepcopy(base))}
    models["int8 (--quantize int8)"] = copy.deepcopy(base)
    quantize_int8(models["int8 (--quantize int8)"], None)
    fillers = {label: MaskFiller(m, batch_size=8) for label, m in models.items()}
    texts = [text_of(c, True) for c in load_cases(args.cases, args.batch)]
    times = {label: [] for label in fillers}
    fills = {label: f.fill_many(texts, strategy="oneshot") for label, f in fillers.items()}  # warm-up
    for _ in range(args.runs):
        for label, f in fillers.items():
            t = time.perf_counter()
            f.fill_many(texts, strategy="oneshot")
            times[label].append(time.perf_counter() - t)
    base_t = statistics.median(times["float32"])
    print(f"{len(texts)} lines, batches of 8, oneshot, {args.runs} interleaved runs, {torch.get_num_threads()} threads\n")
    print("| mode | median | lines/s | vs float32 | fills = float32's (random weights) |\n|---|---|---|---|---|")
    for label, t in times.items():
        m = statistics.median(t)
        same = sum(a.data == b.data for a, b in zip(fills["float32"], fills[label]))
        print(f"| {label} | {m:.2f} s | {len(texts) / m:.2f} | {base_t / m:.2f}x throughput | {same}/{len(texts)} |", flush=True)


MEMORY_MODES = {"float32": {}, "bfloat16 (mixed)": {"dtype": "bfloat16"}, "int8": {"quantize": "int8"}}
CHILD = """
import json, sys
from perceiver_cli.filler import MaskFiller
filler = MaskFiller.from_pretrained(sys.argv[1], device="cpu", offline=True, **json.loads(sys.argv[2]))
filler.fill("This is an incomplete sentence where some words are [MASK:9]", strategy="oneshot")
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print(*(int(status[k].split()[0]) * 1024 for k in ("VmHWM", "VmRSS")))  # this process's own peak and now
"""


def memory(args) -> None:
    import json
    import os
    import subprocess
    import tempfile

    print("| mode | peak RSS | RSS after the fill | vs float32: peak | after |\n|---|---|---|---|---|")
    base = None
    env = {**os.environ, "HF_HOME": tempfile.mkdtemp()}  # a fresh int8 cache: the first run's cost
    for mode, changes in MEMORY_MODES.items():
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.memory), json.dumps(changes)], env=env,
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
        peak, now = int(out[0]) / 2**20, int(out[1]) / 2**20
        base = base or (peak, now)
        print(f"| {mode} | {peak:.0f} MB | {now:.0f} MB | {peak / base[0]:.2f}x | {now / base[1]:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "tests/assets/perceiver-small"))
    ap.add_argument("--cases", default=str(ROOT / "tests/assets/eval/test.jsonl"))
    ap.add_argument("--agreement", action="store_true")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--rows", default=None, help="semicolon-separated row labels (default: all)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU's rows")
    ap.add_argument("--groups", action="store_true", help="each group's products alone, per dtype")
    ap.add_argument("--batch", type=int, default=0, help="lines of the fill_many throughput rows")
    ap.add_argument("--memory", type=Path, default=None, help="a full-size checkpoint directory")
    args = ap.parse_args()
    table = ROWS if args.device == "cpu" else CUDA_ROWS
    labels = args.rows.split(";") if args.rows else list(table)
    rows = {"float32": table["float32"], **{label: table[label] for label in labels}}
    if args.speed:
        speed(args, rows)
    if args.agreement:
        agreement(args, rows)
    if args.groups:
        groups(args)
    if args.batch:
        batch(args)
    if args.memory:
        memory(args)


if __name__ == "__main__":
    main()
