"""Forward-pass speed of our model vs the reference, on full-size random weights.

    python scripts/bench_forward.py [--runs 7] [--weights DIR]

In one run, for one ~60-byte text (the model card's sentence, ` missing.` masked):
(a) ours: encoder + decoder at the 9 masked positions,
(b) the reference padded to 2048 positions, as in the model card,
(c) the reference on the unpadded text,
plus the time our loader takes to load the weights from the page cache, and the floor:
the model's FLOPs for (a) divided by this machine's measured fp32 matrix-product rate.
The faster modes of (a) run in the same loop: (a-bf16) `--dtype bfloat16` on the CPU (the
mixed mode, precision.py) and (a-int8) `--quantize int8`; each gets its own floor, its
products' FLOPs at the measured rate of their dtype (bf16 and int8 products of the same
shape as the fp32 rate's), and its share of it.
Then the cost of fill quality: (d) a whole `[MASK]` fill with the library's defaults
(auto length + the default strategy) against (e) a `--strategy oneshot` `[MASK:9]` fill,
with the forward passes each ran.
Runs of (a), (b), (c) are interleaved so that background load hits them alike; the
table gives medians and ratios. Needs the test extras (transformers is the reference).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from perceiver_cli import tokenizer  # noqa: E402
from perceiver_cli.checkpoint import load_model  # noqa: E402
from perceiver_cli.filler import MaskFiller  # noqa: E402
from perceiver_cli.model import DECODER_QK_CHANNELS, PerceiverConfig  # noqa: E402
from perceiver_cli.precision import BF16Linear, to_mixed  # noqa: E402
from perceiver_cli.quantize import Int8Linear, quantize_int8  # noqa: E402

TEXT = "This is an incomplete sentence where some words are missing."
MASKED = range(52, 61)  # ` missing.`, as in the model card

FULL_SIZE = PerceiverConfig().to_dict()  # its defaults are the config.json of deepmind/language-perceiver


def full_size_weights(directory: Path) -> Path:
    """Random full-size weights saved by the reference (created once, then reused)."""
    if not (directory / "model.safetensors").is_file():
        from transformers import PerceiverConfig as RefConfig
        from transformers import PerceiverForMaskedLM

        torch.manual_seed(0)
        PerceiverForMaskedLM(RefConfig(**FULL_SIZE)).save_pretrained(directory)
    return directory


def linear_flops(tokens: int, n_in: int, n_out: int) -> int:
    return 2 * tokens * n_in * n_out


def attention_flops(q_tokens, kv_tokens, q_dim, kv_dim, qk, v, out) -> int:
    return (linear_flops(q_tokens, q_dim, qk) + linear_flops(kv_tokens, kv_dim, qk) + linear_flops(kv_tokens, kv_dim, v)
            + 2 * q_tokens * kv_tokens * (qk + v) + linear_flops(q_tokens, v, out))


def model_flops(cfg: PerceiverConfig, n_inputs: int, n_decoded: int) -> int:
    """Matrix-product FLOPs of one forward pass (the rest is negligible)."""
    L, D, C = cfg.num_latents, cfg.d_latents, cfg.d_model
    enc = attention_flops(L, n_inputs, D, C, cfg.encoder_cross_qk, cfg.encoder_cross_v, D)
    enc += 2 * linear_flops(L, D, D * cfg.cross_attention_widening_factor)
    layer = attention_flops(L, L, D, D, cfg.self_qk, cfg.self_v, cfg.self_v)
    layer += 2 * linear_flops(L, D, D * cfg.self_attention_widening_factor)
    dec = attention_flops(n_decoded, L, C, D, DECODER_QK_CHANNELS, C, C) + 2 * linear_flops(n_decoded, C, C)
    dec += linear_flops(n_decoded, C, cfg.vocab_size)
    return enc + cfg.num_blocks * cfg.num_self_attends_per_block * layer + dec


def matmul_rate(runs: int, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of the model's typical product, (256 x 1280) @ (1280 x 1280), in `dtype`
    (int8: int8 x int8 -> int32, `torch._int_mm`, as quantize.py runs it)."""
    if dtype == torch.int8:
        a, b = torch.randint(-127, 128, (256, 1280), dtype=torch.int8), torch.randint(-127, 128, (1280, 1280), dtype=torch.int8)
        product = torch._int_mm
    else:
        a, b = torch.randn(256, 1280, dtype=dtype), torch.randn(1280, 1280, dtype=dtype)
        product = torch.mm
    for _ in range(3):
        product(a, b)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(20):
            product(a, b)
        times.append((time.perf_counter() - t) / 20)
    return linear_flops(256, 1280, 1280) / statistics.median(times) / 1e9


def product_flops(model, run) -> dict[torch.dtype, int]:
    """FLOPs of the linear layers `run()` calls in `model`, by the dtype of their products."""
    kinds = {BF16Linear: torch.bfloat16, Int8Linear: torch.int8, torch.nn.Linear: torch.float32}
    flops = {dtype: 0 for dtype in kinds.values()}

    def count(module, inputs, output):
        dtype = next(d for k, d in kinds.items() if isinstance(module, k))
        flops[dtype] += 2 * output.numel() * inputs[0].shape[-1]

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, tuple(kinds))]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--weights", type=Path, default=Path(tempfile.gettempdir()) / "perceiver-bench-full")
    args = ap.parse_args()
    from transformers import PerceiverForMaskedLM

    directory = full_size_weights(args.weights)
    ref = PerceiverForMaskedLM.from_pretrained(directory).eval()
    load_times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        ours = load_model(directory)
        load_times.append(time.perf_counter() - t)

    ids = [tokenizer.CLS, *(b + tokenizer.NUM_SPECIAL for b in TEXT.encode()), tokenizer.SEP]
    for p in MASKED:
        ids[p] = tokenizer.MASK
    x = torch.tensor([ids])
    padded = torch.nn.functional.pad(x, (0, 2048 - len(ids)), value=tokenizer.PAD)
    padded_mask = (padded != tokenizer.PAD).long()
    positions = torch.tensor([list(MASKED)])

    mixed = to_mixed(load_model(directory))
    int8 = load_model(directory)
    quantize_int8(int8, None)
    cases = {
        "(a) ours": lambda: ours(x, None, positions),
        "(a-bf16) ours, `--dtype bfloat16` (mixed)": lambda: mixed(x, None, positions),
        "(a-int8) ours, `--quantize int8`": lambda: int8(x, None, positions),
        "(b) reference, padded to 2048": lambda: ref(inputs=padded, attention_mask=padded_mask).logits,
        "(c) reference, unpadded": lambda: ref(inputs=x).logits,
    }
    with torch.inference_mode():
        for fn in cases.values():  # warm-up
            fn()
        times = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, fn in cases.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        got = ours(x, None, positions)[0]
        want = ref(inputs=padded, attention_mask=padded_mask).logits[0, list(MASKED)]
    filler = MaskFiller(ours)
    fills = {
        "(d) ours, `[MASK]` fill, defaults": lambda: filler.fill(f"{TEXT[:51]} [MASK]"),
        "(e) ours, `[MASK:9]` fill, oneshot": lambda: filler.fill(f"{TEXT[:51]} [MASK:9]", strategy="oneshot"),
    }
    fill_times, passes = {name: [] for name in fills}, {}
    for name, fn in fills.items():
        before = filler.runner.passes, filler.runner.rows
        fn()  # warm-up, and the count of forward passes
        passes[name] = (filler.runner.passes - before[0], filler.runner.rows - before[1])
    for _ in range(args.runs):
        for name, fn in fills.items():
            t = time.perf_counter()
            fn()
            fill_times[name].append(time.perf_counter() - t)
    rates = {dtype: matmul_rate(args.runs, dtype) for dtype in (torch.float32, torch.bfloat16, torch.int8)}
    rate = rates[torch.float32]
    flops = model_flops(ours.cfg, len(ids), len(MASKED))
    floors = {}  # each mode's products at their dtype's rate; what no linear layer computes (attention) at fp32's
    for name, model in (("(a) ours", ours), ("(a-bf16) ours, `--dtype bfloat16` (mixed)", mixed),
                        ("(a-int8) ours, `--quantize int8`", int8)):
        with torch.inference_mode():
            by_dtype = product_flops(model, lambda m=model: m(x, None, positions))
        rest = flops - sum(by_dtype.values())
        floors[name] = (sum(n / rates[d] for d, n in by_dtype.items()) + rest / rate) / 1e9
    med = {name: statistics.median(t) for name, t in times.items()}
    a, b, c = med["(a) ours"], med["(b) reference, padded to 2048"], med["(c) reference, unpadded"]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{args.runs} runs, max |logit diff| vs reference {float((got - want).abs().max()):.2e}")
    print(f"matmul rate: fp32 {rate:.0f}, bf16 {rates[torch.bfloat16]:.0f}, int8 {rates[torch.int8]:.0f} GFLOP/s"
          f" ((256 x 1280) @ (1280 x 1280)); one forward of ours = {flops / 1e9:.1f} GFLOP\n")
    print("| what | median | ratio |")
    print("|---|---|---|")
    for name, m in med.items():
        print(f"| {name} | {m * 1000:.0f} ms | {m / a:.2f}x ours |")
    print(f"| ours / (b) | | {a / b:.2f} (target <= 0.75) |")
    print(f"| ours / (c) | | {a / c:.2f} (target <= 0.9) |")
    print(f"| floor: FLOPs / matmul rate | {flops / rate / 1e6:.0f} ms | ours at {flops / rate / 1e9 / a:.0%} of the floor's speed |")
    for name, floor in floors.items():
        if name != "(a) ours":
            print(f"| floor of {name[:name.index(')') + 1]}: its products at their dtype's rate | {floor * 1000:.0f} ms |"
                  f" {name[:name.index(')') + 1]} at {floor / med[name]:.0%} of its floor's speed |")
    print(f"| our weight load (page cache) | {statistics.median(load_times) * 1000:.0f} ms | target <= 500 ms |")
    d, e = (statistics.median(t) for t in fill_times.values())
    for name, t in fill_times.items():
        print(f"| {name} | {statistics.median(t) * 1000:.0f} ms | {passes[name][0]} batched passes over {passes[name][1]} texts |")
    print(f"| (d) / (e) | | {d / e:.2f} (target <= 4) |")


if __name__ == "__main__":
    main()
