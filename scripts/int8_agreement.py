"""How often `--quantize int8` fills agree with fp32 fills, on the small trained model.

    python scripts/int8_agreement.py [--model tests/assets/perceiver-small]
                                     [--cases tests/assets/eval/test.jsonl]
                                     [--variant int8|bfloat16|float16]

`--variant bfloat16` / `float16` compares those weight dtypes for the whole model (what
`--device cuda` may run) with fp32 instead, here on the CPU. The CPU's `--dtype bfloat16`
(the mixed mode) and every group of layers in bfloat16 or int8: scripts/precision_study.py.

For every evaluation case (one masked word per sentence), the fill with int8 matrix
products is compared with the fp32 fill, for `oneshot` and the default strategy at the
true length (`[MASK:N]`), and for `[MASK]` with the defaults (auto length).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from eval_fill import load_cases, text_of  # noqa: E402

from perceiver_cli.checkpoint import load_model  # noqa: E402
from perceiver_cli.filler import DTYPES, MaskFiller  # noqa: E402
from perceiver_cli.quantize import quantize_int8  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "tests/assets/perceiver-small"))
    ap.add_argument("--cases", default=str(ROOT / "tests/assets/eval/test.jsonl"))
    ap.add_argument("--variant", default="int8", choices=["int8", "bfloat16", "float16"])
    args = ap.parse_args()
    cases = load_cases(args.cases, None)
    fp32 = MaskFiller(load_model(args.model))
    if args.variant == "int8":
        int8_model = load_model(args.model)
        quantize_int8(int8_model, None)  # in memory, no cache
        other = MaskFiller(int8_model)
    else:
        other = MaskFiller(load_model(args.model, dtype=DTYPES[args.variant]))
    print(f"{len(cases)} cases from {args.cases}, model {args.model}, torch {torch.__version__}\n")
    print(f"| fill | {args.variant} = fp32 |")
    print("|---|---|")
    for label, sized, strategy in [("oneshot, `[MASK:N]`", True, "oneshot"),
                                   ("default strategy, `[MASK:N]`", True, None),
                                   ("defaults, `[MASK]` (auto length)", False, None)]:
        texts = [text_of(c, sized) for c in cases]
        options = {"strategy": strategy} if strategy else {}
        a = fp32.fill_many(texts, **options)
        b = other.fill_many(texts, **options)
        same = sum(x.data == y.data for x, y in zip(a, b))
        print(f"| {label} | {same}/{len(cases)} = {same / len(cases):.1%} |")


if __name__ == "__main__":
    main()
