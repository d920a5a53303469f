"""Batch throughput: our `fill_many` vs the reference run in batches the usual way.

    python scripts/bench_batch.py [--runs 5] [--batch-size 8] [--lines 64]
    python scripts/bench_batch.py --dry-run      # tiny random model, one run: checks the script works
    python scripts/bench_batch.py --int8         # also ours with --quantize int8

On full-size random weights (saved by the reference, loaded by our loader), for N lines of
40-200 bytes with one `[MASK:n]` each (n = 3..8), in one run:

- ours: `MaskFiller.fill_many(lines, strategy="oneshot")` (one pass and the argmax, as the
  reference; the library's default, iterative, runs two passes for better fills): our batching (windows sorted by length, padding
  only to the longest of a batch, the encoder mask making it exact, decoding only the
  masked positions);
- reference: `PerceiverForMaskedLM` in batches of --batch-size lines in input order, as
  the model card would be scaled up: tokenizer-style encoding padded to the longest line
  of the batch with an attention mask, masked positions set to [MASK], the model on the
  batch, argmax over the byte ids at the masked positions.

Runs of the two alternate, so background load hits both alike. Reported: medians, lines
per second, ours/reference throughput, and the FLOP floor: the matrix-product FLOPs of the
work (every line unpadded, only its masked positions decoded) divided by this machine's
measured fp32 matrix-product rate. The fills of both must agree (counted in the output).
Needs the test extras (`transformers` is the reference). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_forward import FULL_SIZE, matmul_rate, model_flops  # noqa: E402
from bench_lines import WORDS  # noqa: E402

from perceiver_cli import masks, tokenizer  # noqa: E402
from perceiver_cli.checkpoint import load_model  # noqa: E402
from perceiver_cli.filler import MaskFiller  # noqa: E402

# --dry-run: a tiny random model that differs from the full size in every dimension
TINY = dict(num_latents=8, d_latents=32, d_model=16, num_blocks=1, num_self_attends_per_block=2,
            num_self_attention_heads=2, num_cross_attention_heads=2, qk_channels=16, v_channels=32,
            max_position_embeddings=64)



def make_lines(n: int, seed: int = 0, lo: int = 40, hi: int = 200) -> list[str]:
    """n English-looking lines of lo-hi bytes, each with one [MASK:k] (k = 3..8) after a space."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        target = rng.randint(lo, hi)
        words: list[str] = []
        while len(" ".join(words)) < target - 12:
            words.append(rng.choice(WORDS))
        k = rng.randint(3, 8)
        words.insert(rng.randrange(1, len(words)), f"[MASK:{k}]")
        line = " ".join(words) + "."
        line = line[0].upper() + line[1:]
        lines.append(line)
    return lines


def reference_inputs(lines: list[str]) -> list[tuple[str, list[int]]]:
    """Per line: its text with the span's bytes as placeholders, and the masked positions
    in the reference tokenizer's `[CLS] bytes [SEP]` ids."""
    out = []
    for line in lines:
        t = masks.parse(line)
        (span,) = t.spans
        text = (t.pieces[0] + b"_" * span.length + t.pieces[1]).decode()
        start = 1 + len(t.pieces[0])
        out.append((text, list(range(start, start + span.length))))
    return out


def reference_batches(ref, tok, inputs: list[tuple[str, list[int]]], batch_size: int) -> list[bytes]:
    """The usual way: the tokenizer pads each batch to its longest line (attention mask),
    the masked positions become [MASK], the model runs, argmax at the masked positions."""
    fills = []
    for b in range(0, len(inputs), batch_size):
        chunk = inputs[b : b + batch_size]
        enc = tok([text for text, _ in chunk], padding="longest", return_tensors="pt")
        ids = enc.input_ids
        for row, (_, positions) in enumerate(chunk):
            ids[row, positions] = tok.mask_token_id
        logits = ref(inputs=ids, attention_mask=enc.attention_mask).logits
        for row, (_, positions) in enumerate(chunk):
            fills.append(bytes(logits[row, positions, tokenizer.NUM_SPECIAL :].argmax(-1).tolist()))
    return fills


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs of each (the median is reported)")
    ap.add_argument("--batch-size", type=int, default=8, help="lines per forward pass, ours and the reference's")
    ap.add_argument("--lines", type=int, default=64)
    ap.add_argument("--weights", type=Path, default=Path(tempfile.gettempdir()) / "perceiver-bench-full",
                    help="where the random full-size weights are saved (created once, then reused)")
    ap.add_argument("--int8", action="store_true", help="also time ours with int8 matrix products (quantize.py)")
    ap.add_argument("--dry-run", action="store_true",
                    help="a tiny random model, one run, 8 lines of 20-55 bytes: checks that the script works")
    args = ap.parse_args()
    from transformers import PerceiverConfig as RefConfig
    from transformers import PerceiverForMaskedLM, PerceiverTokenizer

    if args.dry_run:
        args.runs, args.lines = 1, 8
        config, directory = TINY, Path(tempfile.mkdtemp(prefix="perceiver-bench-tiny-"))
    else:
        config, directory = FULL_SIZE, args.weights
    if not (directory / "model.safetensors").is_file():
        torch.manual_seed(0)
        PerceiverForMaskedLM(RefConfig(**config)).save_pretrained(directory)
    ref = PerceiverForMaskedLM.from_pretrained(directory).eval()
    tok = PerceiverTokenizer()
    ours = MaskFiller(load_model(directory), batch_size=args.batch_size)

    lines = make_lines(args.lines, lo=20, hi=55) if args.dry_run else make_lines(args.lines)
    inputs = reference_inputs(lines)
    cases = {
        "ours: fill_many": lambda: [r.spans[0].data for r in ours.fill_many(lines, strategy="oneshot")],
        "reference, padded batches": lambda: reference_batches(ref, tok, inputs, args.batch_size),
    }
    if args.int8:
        from perceiver_cli.quantize import quantize_int8

        int8_model = load_model(directory)
        quantize_int8(int8_model, None)  # in memory, no cache
        int8 = MaskFiller(int8_model, batch_size=args.batch_size)
        cases["ours: fill_many, int8"] = lambda: [r.spans[0].data for r in int8.fill_many(lines, strategy="oneshot")]
    with torch.inference_mode():
        fills = {name: fn() for name, fn in cases.items()}  # warm-up, and the fills to compare
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, fn in cases.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    rate = matmul_rate(max(args.runs, 3)) * 1e9  # FLOP/s
    work = sum(model_flops(ours.model.cfg, len(text.encode()) + 2, len(positions)) for text, positions in inputs)
    floor = work / rate
    med = {name: statistics.median(t) for name, t in times.items()}
    ours_s = med["ours: fill_many"]
    agree = sum(a == b for a, b in zip(fills["ours: fill_many"], fills["reference, padded batches"]))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{'tiny dry-run' if args.dry_run else 'full-size'} random weights, {args.lines} lines "
          f"of {'20-55' if args.dry_run else '40-200'} bytes, "
          f"batch size {args.batch_size}, median of {args.runs} runs")
    print(f"fp32 matmul rate {rate / 1e9:.0f} GFLOP/s; the work = {work / 1e9:.1f} GFLOP; "
          f"fills identical to the reference's: {agree}/{args.lines}"
          + (f"; int8 fills equal to fp32's: {sum(a == b for a, b in zip(fills['ours: fill_many'], fills['ours: fill_many, int8']))}/{args.lines}"
             if args.int8 else "") + "\n")
    print("| what | median | lines/s | vs reference | vs FLOP floor |")
    print("|---|---|---|---|---|")
    ref_s = med["reference, padded batches"]
    for name, m in med.items():
        vs_ref = f"{ref_s / m:.2f}x throughput"
        print(f"| {name} | {m:.2f} s | {args.lines / m:.1f} | {vs_ref} | {m / floor:.2f}x the floor's time |")
    print(f"| FLOP floor (work / matmul rate) | {floor:.2f} s | {args.lines / floor:.1f} | | 1.00x |")
    print(f"\nours/reference throughput: {ref_s / ours_s:.2f}; ours reaches {floor / ours_s:.0%} of the floor's speed")


if __name__ == "__main__":
    main()
