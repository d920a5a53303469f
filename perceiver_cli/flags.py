"""The command-line flags of the options groups, each declared once: the commands of cli.py
take them as their parameters' defaults, and `build` makes the options dataclass from what
was parsed.

    def fill(ctx: typer.Context, model: str = ModelOpt, top_k: int = TopKOpt, ...):
        load, options = build(LoadOptions, ctx), build(FillOptions, ctx)

Every default shown by `--help` is the dataclass's (options.py), never typed here; a
parameter is named as its field, so `build` needs no table. This module imports typer and
options.py only (no torch).
"""

from __future__ import annotations

from dataclasses import fields

import typer

from .options import (CHOICE_SCORES, DEVICES, DTYPES, MAX_BATCH_SIZE, MAX_TOP_K, MODEL_ENV, QUANTIZE, STRATEGIES,
                      Budget, FillOptions, LoadOptions)


def completer(values):
    return lambda incomplete: [v for v in values if v.startswith(incomplete.lower())]


def build(cls, ctx: typer.Context, **fixed):
    """An options dataclass (`cls`) from the command's parsed parameters of its fields'
    names, plus `fixed`; a parameter left unset (None) keeps the field's default. The
    dataclass validates the values (`OptionError`: exit 2)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in ctx.params.items() if k in names and v is not None}, **fixed)


# -- the options, each declared once; every default is the dataclass's (options.py) -----

# loading a model: fill, serve, ray-fill, info, download
ModelOpt = typer.Option(LoadOptions.model, "--model", "-m", envvar=MODEL_ENV, help="Hub repo id or local checkpoint directory.")
RevisionOpt = typer.Option(LoadOptions.revision, "--revision", help="Hub branch, tag or commit.")
OfflineOpt = typer.Option(LoadOptions.offline, "--offline", help="Never use the network: the cache or a local directory only.")
DeviceOpt = typer.Option(LoadOptions.device, "--device", help="auto, cpu, cuda (cuda:N) or mps.", autocompletion=completer(DEVICES))
DtypeOpt = typer.Option(LoadOptions.dtype, "--dtype", help="auto (float16 on CUDA, else float32: exact), float32, bfloat16 (on a CPU: mixed, the big products in bfloat16) or float16.",
                        autocompletion=completer(DTYPES))
QuantizeOpt = typer.Option(LoadOptions.quantize, "--quantize", help="int8: faster CPU matrix products, fills close to fp32's (none: exact).",
                           autocompletion=completer(QUANTIZE))
ThreadsOpt = typer.Option(LoadOptions.threads, "--threads", help="torch's CPU threads (default: the CPUs this process may use).")
BatchSizeOpt = typer.Option(LoadOptions.batch_size, "--batch-size",
                            help=f"Texts per forward pass (1-{MAX_BATCH_SIZE}); --batch and ray-fill send 4x as many lines at a time.")

# filling: fill, ray-fill (each ray-fill record is the object `fill --batch --json` writes)
StrategyOpt = typer.Option(FillOptions.strategy, "--strategy", autocompletion=completer(STRATEGIES),
                           help="How spans are filled: iterative, beam, or oneshot (one pass: exactly the reference's argmax).")
TopKOpt = typer.Option(FillOptions.top_k, "--top-k", "-k",
                       help=f"Candidates per span, at most {MAX_TOP_K} (a table on a terminal; 'candidates' in JSON).")
MaxSpanOpt = typer.Option(FillOptions.max_span, "--max-span", help="Longest span [MASK] may choose, in bytes.")
MaskTokenOpt = typer.Option(FillOptions.mask_token, "--mask-token", help="The marker literal.")
ExplainOpt = typer.Option(FillOptions.explain, "--explain", help="Show each masked byte's top candidates ('alternatives' in JSON).")
ChoiceOpt = typer.Option(None, "--choice", metavar="WORD",
                         help="Fill every [MASK] with the best of these words (repeat --choice; any lengths). "
                              "-k N shows the N best, JSON lists them all with their scores.")
ChoiceScoreOpt = typer.Option(FillOptions.choice_score, "--choice-score", autocompletion=completer(CHOICE_SCORES),
                              help=f"How a --choice is scored: {', '.join(CHOICE_SCORES)} (README: Choices).")

# the work budget, what one text may cost, estimated before any of it is built (budget.py):
# fill (in-process), ray-fill, serve (whose --max-inputs is its own: ServeOptions'). Over a
# limit the text is refused (exit 2; its line's error with --batch; a 400), naming the flag.
MaxInputsOpt = typer.Option(Budget.max_inputs, "--max-inputs",
                            help="Most model inputs one text may take (a window in one pass: ~1 s each on the full model's CPU).")
MaxSearchOpt = typer.Option(Budget.max_search, "--max-search",
                            help="Most scores one text's search may handle outside the passes, in millions (k-best, beams, length scoring).")
MaxMemoryOpt = typer.Option(Budget.max_memory_mb, "--max-memory-mb",
                            help="Most memory one text may take at its peak, in MiB, estimated; a batch's texts are filled in groups under it.")
MaxAnswerOpt = typer.Option(Budget.max_answer_mb, "--max-answer-mb",
                            help="Largest JSON answer of one text, in MiB, estimated (serve: also of one /v1/fill answer).")
